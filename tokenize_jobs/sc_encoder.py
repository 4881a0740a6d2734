"""SC encoder: concatenated semantic + collaborative vectors -> MLP -> L2-normalised SC embedding.

Users and items have separate towers (their inputs differ), trained together with the U2I
sampled-softmax loss of PAPER.md section 1:
    L_U2I = -mean log( exp(u.v+ / T) / (exp(u.v+ / T) + sum_{j in N_u} exp(u.v_j / T)) )
where N_u holds the other positives of the batch (in-batch negatives) and a set of uniformly
sampled items shared by the batch. Embeddings are unit vectors, so u.v is a cosine and the
temperature T sets the sharpness.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from a3gr.config import SCConfig
from tokenize_jobs.rqvae import load_weights, mlp, save_weights


class SCEncoder(nn.Module):
    """input_dim -> hidden -> dim MLP with an L2-normalised output."""

    def __init__(self, input_dim: int, hidden: int, dim: int):
        super().__init__()
        self.net = mlp(input_dim, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class SCTowers(nn.Module):
    """One SC encoder for users and one for items, mapping into the same `cfg.dim` space."""

    def __init__(self, user_in: int, item_in: int, cfg: SCConfig):
        super().__init__()
        self.user_in, self.item_in, self.cfg = int(user_in), int(item_in), cfg
        self.user = SCEncoder(self.user_in, cfg.hidden, cfg.dim)
        self.item = SCEncoder(self.item_in, cfg.hidden, cfg.dim)

    def save(self, directory: str | Path) -> None:
        """model.safetensors + config.json (input sizes and the SCConfig fields)."""
        save_weights(directory, self, {"user_in": self.user_in, "item_in": self.item_in,
                                       **dataclasses.asdict(self.cfg)})

    @classmethod
    def load(cls, directory: str | Path) -> "SCTowers":
        state, config = load_weights(directory)
        user_in, item_in = config.pop("user_in"), config.pop("item_in")
        model = cls(user_in, item_in, SCConfig(**config))
        model.load_state_dict(state)
        return model.eval()


def u2i_loss(u: torch.Tensor, v_pos: torch.Tensor, v_neg_sampled: torch.Tensor, temperature: float,
             pos_ids: torch.Tensor | None = None, neg_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax over [own positive, other rows' positives, sampled negatives].

    u, v_pos: [B, d] (row i is a user and its positive item); v_neg_sampled: [S, d].
    pos_ids / neg_ids (optional item ids) mask negatives that are the row's own positive item,
    so a popular item that is the positive of two rows is not pushed away from either.
    """
    candidates = torch.cat([v_pos, v_neg_sampled], dim=0)
    logits = u @ candidates.T / temperature
    target = torch.arange(u.shape[0], device=u.device)
    if pos_ids is not None:
        cand_ids = torch.cat([pos_ids, neg_ids]) if neg_ids is not None else \
            torch.cat([pos_ids, pos_ids.new_full((v_neg_sampled.shape[0],), -1)])
        false_negative = cand_ids[None, :] == pos_ids[:, None]
        false_negative[target, target] = False
        logits = logits.masked_fill(false_negative, float("-inf"))
    return F.cross_entropy(logits, target)


@torch.no_grad()
def u2i_auc(u: torch.Tensor, v_pos: torch.Tensor, v_neg: torch.Tensor) -> float:
    """Fraction of (positive, negative) pairs ranked correctly (ties count half).

    u, v_pos: [n, d]; v_neg: [n, d] (one negative per row) or [n, k, d].
    """
    pos = (u * v_pos).sum(-1)
    neg = (u * v_neg).sum(-1) if v_neg.dim() == 2 else torch.einsum("nd,nkd->nk", u, v_neg)
    if neg.dim() == 1:
        neg = neg[:, None]
    wins = (pos[:, None] > neg).float() + 0.5 * (pos[:, None] == neg).float()
    return float(wins.mean())
