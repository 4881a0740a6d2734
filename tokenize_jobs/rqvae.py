"""Residual-quantisation VAE (RQ-VAE): a vector -> `levels` discrete codes, and back.

encoder MLP -> latent z (code_dim) -> level 1 picks the nearest code of codebook 1, level 2 the
nearest code to the residual z - c1, and so on; the decoder MLP reconstructs the input from the
sum of the chosen codes (straight-through gradient). Losses are per-row squared L2 distances
averaged over the batch (not per-element means), so their scale does not shrink with the width of
the input and stays comparable with the U2I loss they are added to:
    recon_loss  = mean ||decoder(zq) - x||^2
    commit_loss = sum over levels of mean ||sg(r_l) - c_l||^2 + beta * mean ||r_l - sg(c_l)||^2
    loss        = recon_loss + commit_loss
Codebooks are initialised by k-means on the residuals and dead codes are re-seeded from random
residuals. Weights are stored as safetensors with a JSON config (no pickle).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from a3gr.config import RQVAEConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_weights(directory: str | Path, module: nn.Module, config: dict) -> None:
    """model.safetensors + config.json in `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_weights(directory: str | Path) -> tuple[dict, dict]:
    """(state dict, config) written by `save_weights`."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory}: missing {name}; not a saved model directory")
    return load_file(str(directory / WEIGHTS_FILE)), json.loads((directory / CONFIG_FILE).read_text())


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared L2 distance between matching rows."""
    return (a - b).pow(2).sum(dim=-1).mean()


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every row of x."""
    # ||x||^2 is the same for every centroid, so it is left out of the argmin.
    scores = centroids.pow(2).sum(dim=1)[None, :] - 2.0 * x @ centroids.T
    return scores.argmin(dim=1)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """k centroids of the rows of x (Lloyd's algorithm from k random rows; empty clusters re-seeded).

    With fewer distinct rows than k, the extra centroids are copies of rows with a little noise, so
    every code starts near data and can be taken over later.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one row")
    if n >= k:
        centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        picks = torch.cat([torch.arange(n), torch.randint(n, (k - n,), generator=generator)])
        centroids = x[picks].clone()
    scale = x.std(dim=0, keepdim=True).clamp_min(1e-6) * 0.01
    centroids[n:] += torch.randn(centroids[n:].shape, generator=generator) * scale
    for _ in range(iters if n > k else 0):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centroids


@dataclass
class RQOutput:
    recon: torch.Tensor
    codes: torch.LongTensor
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    loss: torch.Tensor


class RQVAE(nn.Module):
    """MLP encoder -> `levels` residual codebooks (codebook_size x code_dim) -> MLP decoder."""

    def __init__(self, input_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.input_dim = int(input_dim)
        self.cfg = cfg
        self.encoder = mlp(self.input_dim, cfg.hidden, cfg.code_dim)
        self.decoder = mlp(cfg.code_dim, cfg.hidden, self.input_dim)
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.code_dim) * 0.1)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder output z that the codebooks quantise."""
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """(sum of chosen codes, codes [n, levels], codebook + beta * commitment loss)."""
        residual = z
        quantized = torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for level in range(self.cfg.levels):
            book = self.codebooks[level]
            idx = nearest(residual.detach(), book.detach())
            chosen = book[idx]
            loss = loss + squared_distance(chosen, residual.detach()) \
                + self.cfg.beta * squared_distance(residual, chosen.detach())
            quantized = quantized + chosen
            residual = residual - chosen.detach()
            codes.append(idx)
        return quantized, torch.stack(codes, dim=1), loss

    def forward(self, x: torch.Tensor) -> RQOutput:
        z = self.encoder(x)
        quantized, codes, commit_loss = self.quantize(z)
        # straight-through: the decoder sees the codes, the encoder gets the decoder's gradient
        recon = self.decoder(z + (quantized - z).detach())
        # The target is detached: in joint training x is the SC embedding, and letting the
        # reconstruction pull x towards its own decoding collapses the SC space onto the codes.
        recon_loss = squared_distance(recon, x.detach())
        return RQOutput(recon=recon, codes=codes, recon_loss=recon_loss, commit_loss=commit_loss,
                        loss=recon_loss + commit_loss)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.LongTensor:
        """Codes [n, levels] of the rows of x (the same input the model was trained on)."""
        return self.quantize(self.encoder(x))[1]

    @torch.no_grad()
    def residuals(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """What `level`'s codebook quantises: z minus the codes chosen at the levels before it."""
        residual = self.encoder(x)
        for lower in range(level):
            residual = residual - self.codebooks[lower][nearest(residual, self.codebooks[lower])]
        return residual

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise every level's codebook by k-means on that level's residuals of x."""
        residual = self.encoder(x)
        for level in range(self.cfg.levels):
            self.codebooks[level].copy_(kmeans(residual, self.cfg.codebook_size, generator=generator))
            residual = residual - self.codebooks[level][nearest(residual, self.codebooks[level])]

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, usage_counts, generator: torch.Generator | None = None) -> int:
        """Re-seed the codes whose usage count is 0 (per level) from random residuals of x.

        usage_counts: [levels, codebook_size] uses of each code over the caller's window.
        Returns how many codes were re-seeded. Level l is re-seeded before the residuals of
        level l+1 are computed, so each level sees the codebooks above it as they now are.
        """
        usage = torch.as_tensor(np.asarray(usage_counts))
        if tuple(usage.shape) != (self.cfg.levels, self.cfg.codebook_size):
            raise ValueError(f"usage_counts has shape {tuple(usage.shape)}, expected "
                             f"({self.cfg.levels}, {self.cfg.codebook_size})")
        restarted = 0
        residual = self.encoder(x)
        for level in range(self.cfg.levels):
            dead = torch.nonzero(usage[level] == 0).flatten()
            if len(dead):
                picks = torch.randint(residual.shape[0], (len(dead),), generator=generator)
                self.codebooks[level][dead] = residual[picks]
                restarted += len(dead)
            residual = residual - self.codebooks[level][nearest(residual, self.codebooks[level])]
        return restarted

    def save(self, directory: str | Path) -> None:
        """model.safetensors + config.json (input_dim and the RQVAEConfig fields)."""
        save_weights(directory, self, {"input_dim": self.input_dim, **dataclasses.asdict(self.cfg)})

    @classmethod
    def load(cls, directory: str | Path) -> "RQVAE":
        state, config = load_weights(directory)
        input_dim = config.pop("input_dim")
        model = cls(input_dim, RQVAEConfig(**config))
        model.load_state_dict(state)
        return model.eval()


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: the fraction of codes used and the perplexity of the code distribution."""
    codes = np.asarray(codes)
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out.append({"used_fraction": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out
