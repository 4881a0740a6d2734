"""Tiny, learnable input tables for the SFT / preference / DPO tests (no Spark, no lake).

Items fall into clusters (the first SCID code is the cluster); each user walks through one
cluster in a fixed cycle, so the next item is predictable from the history and a few SFT steps
already move validation recall.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from a3gr.config import PipelineConfig
from a3gr.scid import format_scid
from etl.instruction_tasks import Event, user_examples


def tiny_config(tmp_path, **sft) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.lake.root = str(tmp_path / "lake")
    b = cfg.train.backbone
    b.vocab_size, b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads = 400, 32, 2, 2, 1
    b.intermediate_size, b.max_seq_len = 64, 160
    s = cfg.train.sft
    s.epochs, s.batch_size, s.lr, s.eval_every, s.checkpoint_every, s.val_users, s.val_beam = 10.0, 16, 5e-3, 40, 5, 0, 10
    for key, value in sft.items():
        setattr(s, key, value)
    d = cfg.train.dpo
    d.n_rejected, d.batch_size, d.max_prompts, d.candidates, d.lr, d.epochs = 4, 8, 40, 12, 1e-3, 2.0
    cfg.train.instructions.tasks = ["seq", "c3"]
    cfg.train.instructions.max_per_user = 1
    return cfg


def tiny_tables(cfg: PipelineConfig, n_users: int = 40, n_clusters: int = 4, per_cluster: int = 12,
                seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n_items = n_clusters * per_cluster
    # first code = cluster, second unique within it: medium negatives exist, hard ones cannot
    codes = np.array([[i // per_cluster, i % per_cluster, i % 2, 0] for i in range(n_items)])
    item_scid = pd.DataFrame({"item_id": np.arange(n_items, dtype=np.int64), "codes": [list(c) for c in codes],
                              "scid": [format_scid(c) for c in codes], "tokenizer_version": "t"})
    users, rows, feedback = [], [], []
    for user in range(n_users):
        cluster = user % n_clusters
        start = int(rng.integers(per_cluster))
        walk = [cluster * per_cluster + (start + k) % per_cluster for k in range(8)]
        splits = ["train"] * 6 + ["valid", "test"]
        scid = format_scid([user % 5, user % 3, 0], "user")
        users.append({"user_id": user, "codes": [user % 5, user % 3, 0], "scid": scid, "tokenizer_version": "t"})
        events = [Event(p, item, split, item_scid.scid[item], f"item {item} of cluster {cluster}", "c")
                  for p, (item, split) in enumerate(zip(walk, splits))]
        rows += user_examples(user, scid, events, f"likes cluster {cluster}", walk[:6],
                              cfg.train.instructions, cfg.etl.max_history, cfg.seed)
        for p, (item, split) in enumerate(zip(walk, splits)):
            label = ("liked", "neutral", "disliked")[p % 3] if split == "train" else "liked"
            feedback.append({"user_id": user, "item_id": item, "split": split, "label": label})
    return {"sft_examples": pd.DataFrame(rows), "item_scid": item_scid, "user_scid": pd.DataFrame(users),
            "feedback": pd.DataFrame(feedback)}
