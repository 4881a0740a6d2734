"""Tiny, learnable input tables for the SFT / preference / DPO / evaluation tests (no Spark).

Items fall into clusters (the first SCID code is the cluster); each user walks through one
cluster in a fixed cycle, so the next item is predictable from the history and a few SFT steps
already move validation recall. `tiny_lake` writes them as the lake tables the evaluation and
the TIGER baseline read.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from a3gr.config import PipelineConfig
from a3gr.lake import Lake
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


def interactions_of(feedback: pd.DataFrame) -> pd.DataFrame:
    """The `interactions` rows of tiny_tables' walks (feedback holds one row per interaction, in order)."""
    return feedback[["user_id", "item_id", "split"]].assign(
        position=feedback.groupby("user_id").cumcount(), ts=None, rating=None)


def item_semantic_of(item_scid: pd.DataFrame, dim: int = 16, seed: int = 0) -> pd.DataFrame:
    """`item_semantic` rows: a text vector per item near its cluster's centre (the cluster is the first code)."""
    rng = np.random.default_rng(seed)
    clusters = np.array([c[0] for c in item_scid["codes"]])
    centres = rng.normal(size=(clusters.max() + 1, dim))
    vectors = (centres[clusters] + 0.3 * rng.normal(size=(len(clusters), dim))).astype(np.float32)
    return pd.DataFrame({"item_id": item_scid["item_id"].to_numpy(np.int64), "text_hash": "h",
                         "vector": list(vectors), "model": "tiny"})


def tiny_lake(cfg: PipelineConfig, tables: dict) -> Lake:
    """The input tables of the evaluation and the TIGER baseline, derived from tiny_tables' walks."""
    lake = Lake.from_config(cfg)
    interactions = interactions_of(tables["feedback"])
    by_user = interactions.groupby("user_id")
    train = interactions[interactions["split"] == "train"]
    users = pd.DataFrame({
        "user_id": sorted(interactions["user_id"].unique()),
        "history": [g.loc[g["split"] == "train", "item_id"].tolist() for _, g in by_user],
        "valid_item": [int(g.loc[g["split"] == "valid", "item_id"].iloc[0]) for _, g in by_user],
        "test_item": [int(g.loc[g["split"] == "test", "item_id"].iloc[0]) for _, g in by_user]})
    users = users.assign(history_len=users["history"].map(len), n_train=users["history"].map(len), avg_rating=None)
    items = tables["item_scid"]["item_id"]
    n_train = train["item_id"].value_counts().reindex(items, fill_value=0).to_numpy()
    n_users = train.groupby("item_id")["user_id"].nunique().reindex(items, fill_value=0).to_numpy()
    item_features = pd.DataFrame({"item_id": items, "text": [f"item {i}" for i in items], "n_train": n_train,
                                  "n_users": n_users, "popularity": n_train / n_train.max(), "avg_rating": None})
    for name, frame in (("interactions", interactions), ("user_features", users), ("item_features", item_features),
                        ("item_scid", tables["item_scid"]), ("user_scid", tables["user_scid"]),
                        ("item_semantic", item_semantic_of(tables["item_scid"]))):
        lake.write_arrow(name, frame)
    return lake
