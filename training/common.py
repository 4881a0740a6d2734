"""What SFT and DPO share: data encoding, batching, the schedule, checkpoints and quick validation.

The training loops are plain PyTorch and know nothing of Ray: a `CheckpointStore` hides whether
checkpoints go through Ray Train (the jobs) or a local directory (benchmarks, GPU experiments).
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_model, save_model

from a3gr.scid import parse_scid, vocabulary

log = logging.getLogger("a3gr.training")

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
ITEM_TASKS = ("seq", "c1_asym", "c2_intent", "c3_title_to_scid")


def scid_tokens(item_scid: pd.DataFrame, user_scid: pd.DataFrame | None) -> list[str]:
    """Every SCID token the tables use: item levels then user levels (sized by the largest code)."""
    tokens = []
    for frame, kind in ((item_scid, "item"), (user_scid, "user")):
        if frame is None or frame.empty:
            continue
        codes = np.stack(frame["codes"].map(np.asarray).to_numpy())
        tokens += vocabulary([int(m) + 1 for m in codes.max(axis=0)], kind)
    return tokens


def item_codes(item_scid: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids, [n, levels] codes) in item_id order, the row order of every trie and matrix."""
    frame = item_scid.sort_values("item_id")
    codes = np.stack([np.asarray(parse_scid(s, "item"), dtype=np.int64) for s in frame["scid"]])
    return frame["item_id"].to_numpy(np.int64), codes


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: the same seed and epoch always give the same order (resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(n: int, batch_size: int, seed: int, start: int, count: int, rank: int = 0,
                  world: int = 1) -> list[np.ndarray]:
    """Micro-batches number start .. start+count-1 of the endless epoch sequence, this rank's share."""
    per_epoch = max(1, n // (batch_size * world))
    out = []
    for index in range(start, start + count):
        epoch, offset = divmod(index, per_epoch)
        order = epoch_order(n, seed, epoch)
        lo = (offset * world + rank) * batch_size
        out.append(order[lo:lo + batch_size])
    return out


@dataclass
class EvalSet:
    """Validation prompts (token ids, ending with the answer marker) and each user's target row."""
    user_ids: np.ndarray
    prompts: list[list[int]]
    target_rows: np.ndarray


def eval_set_from(frame: pd.DataFrame, tokenizer, item_ids: np.ndarray, max_len: int, max_users: int,
                  seed: int) -> EvalSet:
    """The valid-split SEQ rows (one per user), optionally a seeded sample of max_users."""
    from training.backbone import encode_prompt

    frame = frame[(frame["split"] == "valid") & (frame["task"] == "seq")].sort_values("user_id")
    if max_users and len(frame) > max_users:
        frame = frame.sample(n=max_users, random_state=seed).sort_values("user_id")
    row_of = pd.Series(np.arange(len(item_ids)), index=item_ids)
    return EvalSet(frame["user_id"].to_numpy(np.int64), [encode_prompt(tokenizer, p, max_len) for p in frame["prompt"]],
                   row_of.loc[frame["target_item"].to_numpy(np.int64)].to_numpy())


def validation_top(model, trie, eval_set: EvalSet, pad_id: int, beam: int, device,
                   batch_size: int | None = None) -> list[list[int]]:
    """Each validation user's top-min(10, beam) item rows by the constrained beam search (as batch inference does)."""
    from batch_infer.beam import trie_beam_search

    batch_size = batch_size or (256 if torch.device(device).type == "cuda" else 64)
    was_training = model.training
    model.eval()
    result = trie_beam_search(model, eval_set.prompts, trie, beam=beam, top_k=min(10, beam), pad_id=pad_id,
                              batch_size=batch_size, device=device)
    model.train(was_training)
    return result.items


def quick_recall(model, trie, eval_set: EvalSet, pad_id: int, beam: int, device, batch_size: int | None = None) -> dict:
    """Recall/NDCG@5,10 of the constrained beam search on the validation users (as batch inference does)."""
    from batch_infer.metrics import recall_ndcg

    if not eval_set.prompts:
        return {}
    t0 = time.perf_counter()
    items = validation_top(model, trie, eval_set, pad_id, beam, device, batch_size)
    metrics = recall_ndcg(items, eval_set.target_rows, ks=(5, 10))
    metrics["val_users"] = len(eval_set.prompts)
    metrics["val_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


class CheckpointStore:
    """Where a training loop saves and finds its resumable state."""

    def latest(self) -> Path | None:
        raise NotImplementedError

    def save(self, write: Callable[[Path], None], metrics: dict) -> None:
        raise NotImplementedError


class LocalCheckpoints(CheckpointStore):
    """Checkpoints as step directories under one folder; written to a temp dir, then renamed (atomic).

    A checkpoint that fails to load is reported by name and the previous one is used instead.
    """

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep
        self.count = 0

    def _all(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted((p for p in self.root.iterdir() if p.name.startswith("ckpt-") and p.is_dir()),
                      key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1] if found else None

    def candidates(self) -> list[Path]:
        return list(reversed(self._all()))

    def save(self, write: Callable[[Path], None], metrics: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.count = max([int(p.name.split("-")[1]) for p in self._all()] + [self.count]) + 1
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        write(tmp)
        tmp.rename(self.root / f"ckpt-{self.count:06d}")
        for old in self._all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RayCheckpoints(CheckpointStore):
    """Checkpoints through Ray Train: the run's storage keeps them; a restarted run gets the latest."""

    def __init__(self, rank: int):
        import ray.train

        self.rank = rank
        self._restored = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self._restored = Path(tempfile.mkdtemp(prefix="a3gr-restore-"))
            with checkpoint.as_directory() as directory:
                shutil.copytree(directory, self._restored, dirs_exist_ok=True)

    def latest(self) -> Path | None:
        return self._restored

    def candidates(self) -> list[Path]:
        return [self._restored] if self._restored else []

    def save(self, write: Callable[[Path], None], metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                write(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory)
                             if self.rank == 0 else None)


def save_training_state(directory: Path, model, optimizer, scheduler, state: dict) -> None:
    save_model(model, str(directory / MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **state}, directory / STATE_FILE)


def load_training_state(store: CheckpointStore, model, optimizer, scheduler) -> dict | None:
    """Restore the newest loadable checkpoint; a damaged one is named in the log and skipped."""
    damaged = []
    for directory in store.candidates():
        try:
            state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
            load_model(model, str(directory / MODEL_FILE), device=str(next(model.parameters()).device))
        except Exception as exc:  # a truncated or corrupted file: fall back to the previous one
            log.error("checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                      directory, type(exc).__name__, exc)
            damaged.append(str(directory))
            continue
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        torch.set_rng_state(state.pop("torch_rng"))
        log.info("resumed from checkpoint %s at step %d", directory, state["step"])
        return state
    if damaged:
        raise RuntimeError(f"no loadable checkpoint: {', '.join(damaged)} are damaged; delete them to "
                           "start this training run from the beginning")
    return None
