"""Collaborative encoder: a SASRec behaviour model trained on the training split only.

interactions (train rows) + user_features -> item_collab, user_collab, and a registered model
(`models`: name "collaborative", kind "sasrec"). The model is also the SASRec baseline:
`score_next_items(model_dir, histories, k)` ranks next items for the evaluation stage.

Item ids map to embedding rows by their position in `item_ids` (sorted ids of every item in
`interactions`) plus one; row 0 is padding. Sequences are right-padded, so a history's items sit
at positions 0..n-1 whether it is a training window or a <=20-item feature history.
Run as `python -m tokenize_jobs.collaborative --config ...`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from a3gr.config import CollaborativeConfig, PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.registry import models_dir, register_model
from a3gr.runs import RunRecord

log = logging.getLogger(__name__)

MODEL_NAME = "collaborative"
MODEL_KIND = "sasrec"
MAX_SEQ_LEN = 50  # training inputs keep each user's last 50 train items (the SASRec setting)
EVAL_K = 10
EVAL_BATCH = 512
INPUTS = ["interactions", "user_features"]


class SASRec(nn.Module):
    """Causal self-attention over item sequences; next-item logits are dot products with item embeddings."""

    def __init__(self, n_items: int, dim: int = 64, n_layers: int = 2, n_heads: int = 2, dropout: float = 0.2,
                 max_len: int = MAX_SEQ_LEN):
        super().__init__()
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_dropout = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, L] right-padded item indices (0 = padding) -> hidden states [B, L, D].

        The causal mask alone keeps padding out of every real position (padding only follows it).
        """
        length = seqs.shape[1]
        positions = torch.arange(length, device=seqs.device)
        x = self.emb_dropout(self.item_emb(seqs) * self.dim ** 0.5 + self.pos_emb(positions))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=seqs.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def user_vectors(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state at each history's last real position [B, D] (position 0 for an empty history)."""
        last = ((histories > 0).sum(dim=1) - 1).clamp(min=0)
        return self.forward(histories)[torch.arange(len(histories)), last]

    def item_vectors(self) -> torch.Tensor:
        """Item embeddings without the padding row [n_items, D], in `item_ids` order."""
        return self.item_emb.weight[1:]

    def score(self, histories: torch.Tensor) -> torch.Tensor:
        """Next-item logits [B, n_items]."""
        return self.user_vectors(histories) @ self.item_vectors().T


# ---------------------------------------------------------------------------------------------
# Pure data preparation and metrics.

def training_sequences(interactions: pd.DataFrame, max_len: int = MAX_SEQ_LEN) -> list[list[int]]:
    """Each user's train item ids in position order, the last max_len + 1 of them (max_len inputs,
    each followed by its target); users with a single train item give no (input, target) pair and are left out.
    Users come in user_id order."""
    train = interactions.loc[interactions["split"] == "train", ["user_id", "position", "item_id"]]
    train = train.sort_values(["user_id", "position"], kind="stable")
    sequences = [items[-(max_len + 1):] for items in train.groupby("user_id", sort=True)["item_id"].agg(list)]
    return [[int(i) for i in s] for s in sequences if len(s) >= 2]


def item_index(item_ids: list[int]) -> dict[int, int]:
    """Item id -> embedding row (1-based; row 0 is padding)."""
    return {int(item): row + 1 for row, item in enumerate(item_ids)}


def to_rows(sequences: list[list[int]], index: dict[int, int]) -> list[list[int]]:
    """Item ids -> embedding rows; ids the model has never seen are dropped."""
    return [[index[int(i)] for i in seq if int(i) in index] for seq in sequences]


def pad_right(rows: list[list[int]], max_len: int) -> torch.Tensor:
    """Right-padded LongTensor [B, L] of each sequence's last max_len rows (L = longest, at least 1)."""
    rows = [r[-max_len:] for r in rows]
    out = torch.zeros(len(rows), max(1, max((len(r) for r in rows), default=1)), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def exclude_history(scores: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
    """scores [B, n_items] with each history's items set to -inf (items cannot repeat in a user's sequence)."""
    seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, histories, True)
    return scores.masked_fill(seen[:, 1:], float("-inf"))


def recall_ndcg_at_k(scores, targets, k: int) -> tuple[float, float]:
    """Mean Recall@k and NDCG@k of one target column per row of scores [B, n].

    The target's rank counts every other item scoring at least as high (ties count against it).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.long)
    target_scores = scores.gather(1, targets[:, None])
    rank = (scores >= target_scores).sum(dim=1) - 1
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(()))
    return float(hit.float().mean()), float(ndcg.mean())


# ---------------------------------------------------------------------------------------------
# Training.

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(n_items: int, params: CollaborativeConfig, max_len: int = MAX_SEQ_LEN) -> SASRec:
    return SASRec(n_items, params.dim, params.n_layers, params.n_heads, params.dropout, max_len)


def train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, sequences: list[list[int]], batch_size: int,
                generator: torch.Generator) -> float:
    """One pass over shuffled sequences (embedding rows); full-softmax cross-entropy of the next item
    at every position. Returns the mean loss per predicted position."""
    model.train()
    order = torch.randperm(len(sequences), generator=generator).tolist()
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = pad_right([sequences[i] for i in order[start:start + batch_size]], model.max_len + 1)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        real = targets > 0
        hidden = model(inputs)[real]
        # Logits only at real positions: [positions, n_items] instead of [B, L, n_items].
        loss = nn.functional.cross_entropy(hidden @ model.item_vectors().T, targets[real] - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(real.sum())
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


@torch.no_grad()
def ranked_scores(model: SASRec, histories: list[list[int]], batch_size: int = EVAL_BATCH):
    """Yield (start, scores [b, n_items]) per batch of histories (embedding rows), history items excluded."""
    model.eval()
    for start in range(0, len(histories), batch_size):
        padded = pad_right(histories[start:start + batch_size], model.max_len)
        yield start, exclude_history(model.score(padded), padded)


def evaluate(model: SASRec, histories: list[list[int]], targets: list[int], k: int = EVAL_K) -> dict:
    """Recall@k and NDCG@k of the next item (embedding rows) over all items, history excluded."""
    recall = ndcg = 0.0
    for start, scores in ranked_scores(model, histories):
        batch_targets = torch.as_tensor(targets[start:start + len(scores)]) - 1
        r, n = recall_ndcg_at_k(scores, batch_targets, k)
        recall, ndcg = recall + r * len(scores), ndcg + n * len(scores)
    return {f"recall@{k}": recall / max(len(histories), 1), f"ndcg@{k}": ndcg / max(len(histories), 1)}


def train_sasrec(sequences: list[list[int]], val_histories: list[list[int]], val_targets: list[int], n_items: int,
                 params: CollaborativeConfig, seed: int, progress: bool = True) -> tuple[SASRec, dict]:
    """Train on sequences (embedding rows) with early stopping on validation Recall@10; returns the best
    model and its metrics."""
    seed_everything(seed)
    model = build_model(n_items, params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(seed)
    best = {f"val_recall@{EVAL_K}": -1.0}
    best_state, stale, epoch_times = None, 0, []
    bar = tqdm(range(1, params.epochs + 1), desc="collaborative", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = train_epoch(model, optimizer, sequences, params.batch_size, generator)
        val = evaluate(model, val_histories, val_targets)
        epoch_times.append(time.perf_counter() - t0)
        recall, ndcg = val[f"recall@{EVAL_K}"], val[f"ndcg@{EVAL_K}"]
        bar.set_postfix(loss=f"{loss:.4f}", val_r10=f"{recall:.4f}")
        log.info("collaborative: epoch %d loss %.4f val R@%d %.4f N@%d %.4f (%.1fs)", epoch, loss, EVAL_K, recall,
                 EVAL_K, ndcg, epoch_times[-1])
        if recall > best[f"val_recall@{EVAL_K}"]:
            best = {f"val_recall@{EVAL_K}": recall, f"val_ndcg@{EVAL_K}": ndcg, "best_epoch": epoch, "loss": loss}
            best_state, stale = copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= params.patience:
                log.info("collaborative: no validation gain for %d epochs, stopped after epoch %d", stale, epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    metrics = {**best, "epochs": len(epoch_times), "train_seconds": sum(epoch_times),
               "seconds_per_epoch": sum(epoch_times) / len(epoch_times), "train_sequences": len(sequences)}
    return model, metrics


# ---------------------------------------------------------------------------------------------
# Artifact: safetensors weights + JSON config (no pickle anywhere).

def save_collaborative(model: SASRec, item_ids: list[int], out_dir: str | Path, params: CollaborativeConfig,
                       metrics: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"n_items": model.n_items, "dim": params.dim, "n_layers": params.n_layers, "n_heads": params.n_heads,
              "dropout": params.dropout, "max_len": model.max_len, "item_ids": [int(i) for i in item_ids]}
    (out / "config.json").write_text(json.dumps(config))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return out


def load_collaborative(path: str | Path) -> tuple[SASRec, list[int]]:
    """(model in eval mode, item ids in embedding-row order) from a saved model directory."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    model = SASRec(config["n_items"], config["dim"], config["n_layers"], config["n_heads"], config["dropout"],
                   config["max_len"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    return model, config["item_ids"]


def score_next_items(model_dir: str | Path, histories: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The SASRec baseline: top-k next item ids [B, k] (int64) and their logits [B, k] (float32) per history
    of item ids (oldest first), excluding the history's items. Ids unknown to the model are ignored."""
    model, item_ids = load_collaborative(model_dir)
    if not 0 < k <= len(item_ids):
        raise ValueError(f"k must be in 1..{len(item_ids)} (items the model knows), got {k}")
    ids = np.asarray(item_ids, dtype=np.int64)
    top_ids, top_scores = np.empty((len(histories), k), np.int64), np.empty((len(histories), k), np.float32)
    for start, scores in ranked_scores(model, to_rows(histories, item_index(item_ids))):
        values, cols = scores.topk(k, dim=1)
        top_ids[start:start + len(scores)] = ids[cols.numpy()]
        top_scores[start:start + len(scores)] = values.numpy()
    return top_ids, top_scores


# ---------------------------------------------------------------------------------------------
# Job shell.

@torch.no_grad()
def user_vector_rows(model: SASRec, histories: list[list[int]], batch_size: int = EVAL_BATCH) -> list[np.ndarray]:
    """User vectors (float32 rows) for histories of embedding rows, in order."""
    model.eval()
    out = []
    for start in range(0, len(histories), batch_size):
        out.extend(model.user_vectors(pad_right(histories[start:start + batch_size], model.max_len)).numpy())
    return out


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Train the collaborative encoder, publish item_collab / user_collab and register the model.

    `spark` is unused (this job reads small tables through delta-rs); it keeps the common job signature.
    """
    params = cfg.tokenize.collaborative
    sections = {"collaborative": dataclasses.asdict(params), "seed": cfg.seed, "max_seq_len": MAX_SEQ_LEN}
    with JobRun(MODEL_NAME, cfg, input_tables=INPUTS, config_sections=sections, force=force) as job:
        if job.up_to_date:
            return job.record
        torch.set_num_threads(cfg.tokenize.torch_threads)
        # Read exactly the versions the run record names.
        interactions = job.lake.read_pandas("interactions", version=job.record.inputs["table:interactions"],
                                            columns=["user_id", "item_id", "position", "split"])
        users = job.lake.read_pandas("user_features", version=job.record.inputs["table:user_features"],
                                     columns=["user_id", "history", "valid_item"])
        item_ids = sorted(int(i) for i in interactions["item_id"].unique())
        index = item_index(item_ids)
        sequences = to_rows(training_sequences(interactions), index)
        histories = to_rows([list(h) for h in users["history"]], index)
        val_targets = [index[int(i)] for i in users["valid_item"]]
        model, metrics = train_sasrec(sequences, histories, val_targets, len(item_ids), params, cfg.seed)
        log.info("collaborative: best val R@%d %.4f N@%d %.4f at epoch %d; %.1fs per epoch", EVAL_K,
                 metrics[f"val_recall@{EVAL_K}"], EVAL_K, metrics[f"val_ndcg@{EVAL_K}"], metrics["best_epoch"],
                 metrics["seconds_per_epoch"])

        out_dir = save_collaborative(model, item_ids, models_dir(cfg) / MODEL_NAME / job.run_id, params, metrics)
        with torch.no_grad():
            item_vectors = model.item_vectors().numpy().astype(np.float32)
        job.publish_arrow("item_collab", pd.DataFrame(
            {"item_id": item_ids, "vector": list(item_vectors), "model_version": job.run_id}))
        job.publish_arrow("user_collab", pd.DataFrame(
            {"user_id": users["user_id"].astype("int64"), "vector": user_vector_rows(model, histories),
             "model_version": job.run_id}))
        register_model(job.lake, MODEL_NAME, job.run_id, MODEL_KIND, out_dir, job.run_id, metrics,
                       job.record.config_hash)
        job.count("train_sequences", metrics["train_sequences"])
        job.count("epochs", metrics["epochs"])
    return job.record


if __name__ == "__main__":
    job_main(run)
