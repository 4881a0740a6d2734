"""Collaborative encoder (SASRec): data prep, metrics, a tiny model that learns, the baseline API, the job."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from a3gr.config import CollaborativeConfig, PipelineConfig
from tokenize_jobs.collaborative import (
    build_model,
    evaluate,
    exclude_history,
    load_collaborative,
    pad_right,
    recall_ndcg_at_k,
    save_collaborative,
    score_next_items,
    train_epoch,
    train_sasrec,
    training_sequences,
)

N_ITEMS, N_USERS, SEQ_LEN = 30, 40, 8


def successor_sequences() -> list[list[int]]:
    """Embedding rows 1..30 where the next item is always the successor (mod 30) of the current one."""
    return [[(u + t) % N_ITEMS + 1 for t in range(SEQ_LEN)] for u in range(N_USERS)]


def tiny_params(**overrides) -> CollaborativeConfig:
    base = dict(dim=16, n_layers=1, n_heads=2, dropout=0.0, epochs=8, patience=3, batch_size=8, lr=1e-2)
    return CollaborativeConfig(**{**base, **overrides})


def interactions_frame(n_users: int = 6, per_user: int = 5, n_items: int = 12) -> pd.DataFrame:
    """Leave-one-out interactions: per user, distinct items; last = test, second-to-last = valid."""
    rows = []
    for u in range(n_users):
        for p in range(per_user):
            split = "test" if p == per_user - 1 else "valid" if p == per_user - 2 else "train"
            rows.append({"user_id": u, "item_id": (u * 3 + p) % n_items + 100, "position": p, "split": split})
    return pd.DataFrame(rows)


def test_training_sequences_orders_train_items_caps_and_drops_singletons():
    frame = pd.DataFrame({
        "user_id": [2, 2, 2, 2, 1, 1, 1, 3, 3, 3],
        "item_id": [10, 11, 12, 13, 20, 21, 22, 30, 31, 32],
        "position": [2, 0, 1, 3, 0, 1, 2, 0, 1, 2],
        "split": ["train", "train", "train", "train", "train", "valid", "test", "train", "train", "valid"],
    })
    assert training_sequences(frame) == [[11, 12, 10, 13], [30, 31]]  # user 1 has one train item
    assert training_sequences(frame, max_len=2) == [[12, 10, 13], [30, 31]]


def test_recall_ndcg_at_k_golden_values():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.5, 0.5, 0.1]])
    recall, ndcg = recall_ndcg_at_k(scores, [0, 2, 1], k=1)
    assert recall == pytest.approx(1 / 3) and ndcg == pytest.approx(1 / 3)
    # ranks 0, 1, 1 (the tie counts against the target): NDCG = (1 + 2/log2(3)) / 3
    recall, ndcg = recall_ndcg_at_k(scores, [0, 2, 1], k=2)
    assert recall == pytest.approx(1.0) and ndcg == pytest.approx((1 + 2 / np.log2(3)) / 3)


def test_exclude_history_masks_items_but_not_padding():
    scores = torch.zeros(2, 4)
    masked = exclude_history(scores, torch.tensor([[2, 4, 0], [1, 0, 0]]))
    assert torch.isinf(masked).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = build_model(N_ITEMS, tiny_params()).eval()
    with torch.no_grad():
        short = model(torch.tensor([[3, 4, 5]]))
        padded = model(torch.tensor([[3, 4, 5, 0, 0]]))
        assert torch.allclose(short, padded[:, :3], atol=1e-5)
        assert torch.allclose(model.user_vectors(torch.tensor([[3, 4, 5, 0, 0]])), short[:, 2], atol=1e-5)


def test_training_steps_reduce_loss_and_move_parameters():
    torch.manual_seed(0)
    model = build_model(N_ITEMS, tiny_params())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = [train_epoch(model, optimizer, successor_sequences(), 8, generator) for _ in range(4)]
    assert losses[-1] < losses[0] * 0.8
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "item_emb.weight" in moved and "pos_emb.weight" in moved and any(k.startswith("blocks.") for k in moved)


def test_short_training_beats_random_recall_and_keeps_best_state():
    sequences = successor_sequences()
    histories = [s[:-1] for s in sequences]
    targets = [s[-1] for s in sequences]
    model, metrics = train_sasrec(sequences[:30], histories, targets, N_ITEMS, tiny_params(), seed=1, progress=False)
    random_recall = 10 / (N_ITEMS - (SEQ_LEN - 1))
    assert metrics["val_recall@10"] > 0.9 > random_recall
    assert evaluate(model, histories, targets)["recall@10"] == pytest.approx(metrics["val_recall@10"])
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= 8


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    params = tiny_params()
    item_ids = [100 + 7 * i for i in range(N_ITEMS)]  # ids unlike rows, so the mapping is exercised
    model = build_model(N_ITEMS, params).eval()
    return save_collaborative(model, item_ids, tmp_path / "model", params, {"val_recall@10": 0.0}), model, item_ids


def test_score_next_items_excludes_history_and_returns_distinct_ids(saved_model):
    path, _, item_ids = saved_model
    histories = [item_ids[:5], item_ids[10:12], []]
    ids, scores = score_next_items(path, histories, k=10)
    assert ids.shape == scores.shape == (3, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    for row, history in zip(ids, histories):
        assert len(set(row)) == 10 and set(row) <= set(item_ids) and not set(row) & set(history)
    assert (np.diff(scores, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="k must be"):
        score_next_items(path, histories, k=N_ITEMS + 1)


def test_save_load_round_trip_gives_identical_scores(saved_model):
    path, model, item_ids = saved_model
    loaded, loaded_ids = load_collaborative(path)
    assert loaded_ids == item_ids
    histories = pad_right([[1, 2, 3], [4]], model.max_len)
    with torch.no_grad():
        assert torch.equal(model.score(histories), loaded.score(histories))
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in path.iterdir())


@pytest.mark.integration
def test_job_publishes_vectors_registers_model_and_skips_rerun(lake_root):
    from a3gr.lake import Lake
    from a3gr.registry import latest_model
    from tokenize_jobs.collaborative import run

    interactions = interactions_frame()
    interactions["ts"] = pd.Timestamp("2020-01-01", tz="UTC") + pd.to_timedelta(interactions["position"], "D")
    interactions["rating"] = 5.0
    train = interactions[interactions["split"] == "train"].sort_values(["user_id", "position"])
    history = train.groupby("user_id")["item_id"].agg(list)
    held = interactions[interactions["split"] != "train"].pivot(index="user_id", columns="split", values="item_id")
    users = pd.DataFrame({"user_id": history.index, "history": history.values,
                          "history_len": history.map(len).values, "n_train": history.map(len).values,
                          "avg_rating": 5.0, "valid_item": held.loc[history.index, "valid"].values,
                          "test_item": held.loc[history.index, "test"].values})
    lake = Lake(lake_root)
    lake.write_arrow("interactions", interactions)
    lake.write_arrow("user_features", users)

    cfg = PipelineConfig()
    cfg.lake.root = lake_root
    cfg.tokenize.collaborative = tiny_params(epochs=2, dim=8)
    record = run(cfg)
    assert record.status == "succeeded"

    items = lake.read_pandas("item_collab")
    assert sorted(items["item_id"]) == sorted(interactions["item_id"].unique())
    assert items["vector"].map(len).eq(8).all() and items["model_version"].eq(record.run_id).all()
    user_vectors = lake.read_pandas("user_collab")
    assert sorted(user_vectors["user_id"]) == list(range(6)) and user_vectors["vector"].map(len).eq(8).all()
    model = latest_model(lake, "collaborative")
    assert model["version"] == record.run_id and model["kind"] == "sasrec"
    ids, _ = score_next_items(model["path"], [list(h) for h in users["history"]], k=3)
    assert ids.shape == (6, 3)

    assert run(cfg).status == "skipped"
