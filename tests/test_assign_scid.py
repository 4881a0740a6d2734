"""SCID assignment: health-report math and figures, the job on a tiny lake, and codes that follow text."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from a3gr.config import PipelineConfig, RQVAEConfig
from a3gr.lake import Lake
from a3gr.registry import register_model
from a3gr.scid import collision_rate, parse_scid
from tokenize_jobs.report import (
    auc_summary,
    code_summary,
    reconstruction_error,
    tokenizer_health,
    write_report,
)
from tokenize_jobs.rqvae import RQVAE

HISTORY = [
    {"epoch": 1, "phase": 1, "loss_u2i": 2.0, "loss_item_rq": None, "loss_user_rq": None, "recon_item": None,
     "recon_user": None, "val_auc": 0.70, "dead_codes_restarted": 0, "train_seconds": 1.0},
    {"epoch": 2, "phase": 1, "loss_u2i": 1.5, "loss_item_rq": None, "loss_user_rq": None, "recon_item": None,
     "recon_user": None, "val_auc": 0.80, "dead_codes_restarted": 0, "train_seconds": 3.0},
    {"epoch": 3, "phase": 2, "loss_u2i": 1.4, "loss_item_rq": 0.9, "loss_user_rq": 1.1, "recon_item": 0.5,
     "recon_user": 0.6, "val_auc": 0.78, "dead_codes_restarted": 2, "train_seconds": 2.0},
]


def train_rqvae(x: np.ndarray, cfg: RQVAEConfig, steps: int, restart_every: int = 5, seed: int = 0) -> RQVAE:
    """Full-batch Adam from a k-means start, re-seeding codes unused over the last `restart_every` steps.

    Without the restarts a level collapses onto one code within a few dozen steps (as in the
    trainer, which restarts dead codes every epoch).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = torch.as_tensor(x, dtype=torch.float32)
    model = RQVAE(data.shape[1], cfg)
    model.kmeans_init(data, generator=generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    usage = np.zeros((cfg.levels, cfg.codebook_size))
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        out = model(data)
        out.loss.backward()
        optimiser.step()
        usage += [np.bincount(level, minlength=cfg.codebook_size) for level in out.codes.numpy().T]
        if step % restart_every == 0:
            model.restart_dead_codes(data, usage, generator=generator)
            usage[:] = 0
    return model.eval()


# --- the report (pure) ------------------------------------------------------------------------

def test_usage_perplexity_and_collisions_match_hand_computed_values():
    codes = np.array([[0, 0], [0, 0], [1, 0], [1, 3]])
    summary = code_summary(codes, codebook_size=4)

    a, b = summary["levels"]
    assert (a["level"], a["used"], a["used_fraction"]) == ("a", 2, 0.5)
    assert a["perplexity"] == pytest.approx(2.0)  # two codes, equally likely
    assert (b["used"], b["used_fraction"]) == (2, 0.5)
    assert b["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert summary["collision_rate"] == 0.5 == collision_rate(codes)  # rows 0 and 1 share [0, 0]
    assert (summary["max_group_size"], summary["distinct_codes"]) == (2, 3)


def test_health_splits_items_by_metadata_and_counts_collisions_across_groups():
    items = np.array([[0, 0], [0, 0], [1, 0], [1, 3]])
    users = np.array([[2, 2], [2, 2], [2, 2]])
    source = np.array(["metadata", "reviews", "metadata", "none"])
    recon = {"item": reconstruction_error(np.ones((2, 2)), np.zeros((2, 2)))}

    health = tokenizer_health(items, users, {"item": 4, "user": 8}, source, HISTORY, recon)

    no_meta = health["items_by_text_source"]["no_metadata"]
    assert no_meta["n"] == 2 and no_meta["text_sources"] == {"none": 1, "reviews": 1}
    assert no_meta["collision_rate"] == 0.5  # row 1 collides with a metadata item
    assert [u["used"] for u in no_meta["levels"]] == [2, 2]
    assert health["items_by_text_source"]["metadata"]["collision_rate"] == 0.5
    assert health["users"]["collision_rate"] == 1.0 and health["users"]["codebook_size"] == 8
    assert health["users"]["levels"][0]["perplexity"] == pytest.approx(1.0)
    assert health["u2i_auc"] == {"final": 0.78, "best": 0.80, "best_epoch": 2, "end_of_phase1": 0.80}
    assert health["phase_switch_epoch"] == 3 and health["mean_epoch_seconds"] == 2.0
    assert recon["item"] == {"mse": 1.0, "relative": 1.0}
    json.dumps(health, allow_nan=False)  # report.json is strict JSON


def test_auc_summary_without_auc_and_item_only_health():
    assert auc_summary([{"epoch": 1, "phase": 1, "val_auc": None}])["final"] is None
    health = tokenizer_health(np.zeros((3, 2), dtype=int), None, 4, np.array(["metadata"] * 3), [], {})
    assert health["users"] is None and health["items"]["collision_rate"] == 1.0


def test_write_report_writes_json_markdown_and_two_pngs(tmp_path):
    rng = np.random.default_rng(0)
    items, users = rng.integers(0, 4, (40, 3)), rng.integers(0, 4, (60, 3))
    source = np.where(rng.random(40) < 0.6, "metadata", "reviews")
    health = tokenizer_health(items, users, 4, source, HISTORY, {})

    paths = write_report(health, HISTORY, tmp_path / "report")

    assert [p.name for p in paths] == ["report.json", "report.md", "usage_per_level.png", "loss_curves.png"]
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(paths[0].read_text())["items"]["n"] == 40
    text = paths[1].read_text()
    assert "| a |" in text and "items without metadata (n=" in text and "U2I AUC" in text


# --- the job on a tiny lake -------------------------------------------------------------------

def _vectors_table(id_column: str, ids: np.ndarray, sc: np.ndarray, version: str) -> pa.Table:
    vectors = pa.array([row.tolist() for row in sc.astype(np.float32)], type=pa.list_(pa.float32()))
    return pa.table({id_column: ids, "semantic": vectors, "collaborative": vectors, "sc": vectors,
                     "model_version": [version] * len(ids)})


def _clustered(rng: np.random.Generator, n: int, clusters: int, dim: int) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)) * 3
    return centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * 0.3


@pytest.mark.integration
def test_assign_scid_makes_item_scids_unique_lets_users_share_and_skips_a_rerun(tmp_path):
    from tokenize_jobs.assign_scid import run

    cfg = PipelineConfig()
    cfg.lake.root = str(tmp_path / "lake")
    lake = Lake.from_config(cfg)
    rng = np.random.default_rng(3)
    n_items, n_users = 150, 120  # more rows than 4^3 codes: 3-level collisions are certain
    item_ids = rng.permutation(np.arange(1000, 1000 + n_items))
    item_sc, user_sc = _clustered(rng, n_items, 6, 8), _clustered(rng, n_users, 6, 8)
    run_id = "train_tokenizer-test"
    lake.write_arrow("item_embeddings", _vectors_table("item_id", item_ids, item_sc, run_id))
    lake.write_arrow("user_embeddings", _vectors_table("user_id", np.arange(n_users), user_sc, run_id))
    source = np.where(np.arange(n_items) % 3 == 0, "reviews", "metadata")
    lake.write_arrow("items", pd.DataFrame({
        "item_id": item_ids, "item_key": [f"I{i}" for i in item_ids], "title": None, "brand": None,
        "categories": None, "description": None, "text": "some text", "text_source": source}))

    rq_cfg = RQVAEConfig(levels=3, codebook_size=4, code_dim=4, hidden=16)
    model_root = tmp_path / "lake" / "_models"
    for name, x in (("item_rqvae", item_sc), ("user_rqvae", user_sc)):
        path = model_root / "tokenizer" / run_id / name  # the trainer's layout
        train_rqvae(x, rq_cfg, steps=20).save(path)
        register_model(lake, name, run_id, "rqvae", path, run_id, {}, "test")
    (model_root / "tokenizer" / run_id / "history.json").write_text(json.dumps(HISTORY))

    record = run(cfg)

    assert record.status == "succeeded"
    assert record.row_counts["item_codes_shared_before_uniqueness"] > 0
    items = lake.read_pandas("item_scid").sort_values("item_id")
    assert len(items) == n_items and items["scid"].is_unique
    assert (items["tokenizer_version"] == run_id).all()
    for scid, codes in zip(items["scid"], items["codes"]):
        assert parse_scid(scid, "item", levels=4) == list(codes)
    assert collision_rate(np.stack(items["codes"].to_numpy())[:, :3]) > 0
    users = lake.read_pandas("user_scid")
    assert len(users) == n_users and not users["scid"].is_unique  # users may share an SCID
    assert all(len(parse_scid(s, "user", levels=3)) == 3 for s in users["scid"])

    report = model_root / "tokenizer" / run_id / "report"
    health = json.loads((report / "report.json").read_text())
    assert health["items"]["collision_rate"] > 0 and health["u2i_auc"]["final"] == 0.78
    assert health["items_by_text_source"]["no_metadata"]["n"] == 50
    assert (report / "usage_per_level.png").exists() and (report / "loss_curves.png").exists()

    assert run(cfg).status == "skipped"
    register_model(lake, "item_rqvae", "newer", "rqvae", model_root / "tokenizer" / run_id / "item_rqvae", "newer")
    with pytest.raises(ValueError, match="item_embeddings.*re-run tokenize_jobs.train_tokenizer"):
        run(cfg)  # vectors from another run than the latest RQ-VAE are never encoded


# --- codes follow text ------------------------------------------------------------------------

def test_items_sharing_a_first_code_are_more_similar_in_text_than_random_pairs(tmp_path):
    from a3gr.config import SyntheticConfig
    from etl.synthetic import generate_synthetic
    from tokenize_jobs.semantic import TextEncoder, resolve_model_dir

    synthetic = SyntheticConfig(n_items=200, n_users=10, min_len=2, max_len=4, metadata_fraction=1.0)
    meta = [json.loads(line) for line in open(generate_synthetic(str(tmp_path), synthetic, seed=5)["meta_path"])]
    texts = [f"{m['title']}. {m['description']}" for m in meta]
    encoder = TextEncoder(str(resolve_model_dir(PipelineConfig())), max_seq_length=128, torch_threads=1)
    vectors = encoder.encode(texts)

    model = train_rqvae(vectors, RQVAEConfig(levels=3, codebook_size=8, code_dim=16, hidden=64), steps=60)
    first = model.encode(torch.as_tensor(vectors))[:, 0].numpy()

    cosine = vectors @ vectors.T  # unit vectors
    same = (first[:, None] == first[None, :]) & ~np.eye(len(first), dtype=bool)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(first), 5000), rng.integers(0, len(first), 5000)
    random_pairs = cosine[a[a != b], b[a != b]]
    assert len(np.unique(first)) > 1
    assert cosine[same].mean() > random_pairs.mean() + 0.05
