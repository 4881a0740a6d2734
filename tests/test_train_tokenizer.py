"""train_tokenizer end to end on a tiny lake under Ray Train: both phases, outputs, kill-and-resume, ablations."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from a3gr.config import load_config
from a3gr.lake import Lake
from a3gr.registry import latest_model
from tokenize_jobs.rqvae import RQVAE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS, SEM_DIM, COL_DIM, SC_DIM = 40, 24, 8, 4, 8


def write_tiny_lake(root: str, seed: int = 0) -> None:
    """Users and items in 4 taste groups; each user has 3 train items of its group, 1 valid, 1 test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, SEM_DIM))
    item_group, user_group = np.arange(N_ITEMS) % 4, np.arange(N_USERS) % 4

    def vectors(a):
        return [np.asarray(row, np.float32) for row in a]

    lake = Lake(root)
    lake.write_arrow("item_semantic", pd.DataFrame({
        "item_id": np.arange(N_ITEMS), "text_hash": "h", "model": "test",
        "vector": vectors(centres[item_group] + 0.3 * rng.normal(size=(N_ITEMS, SEM_DIM)))}))
    lake.write_arrow("user_semantic", pd.DataFrame({
        "user_id": np.arange(N_USERS), "text_hash": "h", "model": "test",
        "vector": vectors(centres[user_group] + 0.3 * rng.normal(size=(N_USERS, SEM_DIM)))}))
    lake.write_arrow("item_collab", pd.DataFrame({
        "item_id": np.arange(N_ITEMS), "model_version": "test", "vector": vectors(rng.normal(size=(N_ITEMS, COL_DIM)))}))
    lake.write_arrow("user_collab", pd.DataFrame({
        "user_id": np.arange(N_USERS), "model_version": "test", "vector": vectors(rng.normal(size=(N_USERS, COL_DIM)))}))
    rows = []
    for user in range(N_USERS):
        items = rng.permutation(np.flatnonzero(item_group == user_group[user]))[:5]
        rows += [(user, int(item), pos, "train" if pos < 3 else ("valid" if pos == 3 else "test"))
                 for pos, item in enumerate(items)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "position", "split"])
    interactions["ts"] = pd.Timestamp("2024-01-01", tz="UTC")
    interactions["rating"] = 5.0
    lake.write_arrow("interactions", interactions)


def tiny_preset(tmp_path: Path, **tokenize_overrides) -> Path:
    """A preset file, so the killed subprocess and the in-process run have the same config (hash)."""
    rq = {"levels": 2, "codebook_size": 8, "code_dim": 4, "hidden": 16, "dead_code_after": 1}
    tokenize = {"sc": {"dim": SC_DIM, "hidden": 16, "batch_size": 16, "sampled_negatives": 8, "lr": 0.01,
                       "phase1_max_epochs": 3, "phase1_patience": 3, "phase2_epochs": 4},
                "item_rq": rq, "user_rq": rq, **tokenize_overrides}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({"lake": {"root": str(tmp_path / "lake")}, "tokenize": tokenize}))
    return path


@pytest.fixture(autouse=True)
def quick_train_polling(monkeypatch):
    # The Ray Train controller polls workers every 2 s; tiny epochs take milliseconds.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def ray_runs(lake_root: Path) -> Path:
    return lake_root / "_models" / "train_tokenizer" / "_ray"


def read_history(lake: Lake, model: str) -> list[dict]:
    return json.loads((Path(latest_model(lake, model)["path"]).parent / "history.json").read_text())


def check_embeddings(lake: Lake, table: str, id_column: str, n: int, sc_dim: int, collaborative: bool) -> np.ndarray:
    frame = lake.read_pandas(table).sort_values(id_column)
    assert frame[id_column].tolist() == list(range(n))
    sc = np.stack(frame["sc"].to_numpy())
    assert sc.shape == (n, sc_dim) and np.isfinite(sc).all()
    assert np.stack(frame["semantic"].to_numpy()).shape == (n, SEM_DIM)
    if collaborative:
        assert np.stack(frame["collaborative"].to_numpy()).shape == (n, COL_DIM)
    else:
        assert frame["collaborative"].isna().all()
    return sc


def check_codes(lake: Lake, model: str, sc: np.ndarray) -> None:
    """The registered RQ-VAE encodes the stored `sc` vectors (the SCID job's contract)."""
    codes = RQVAE.load(latest_model(lake, model)["path"]).encode(torch.from_numpy(sc))
    assert codes.shape == (len(sc), 2) and int(codes.min()) >= 0 and int(codes.max()) < 8


def test_killed_run_resumes_from_its_checkpoint_and_finishes_both_phases(ray_session, tmp_path):
    from tokenize_jobs.train_tokenizer import run

    preset = tiny_preset(tmp_path)
    lake_root = tmp_path / "lake"
    write_tiny_lake(str(lake_root))

    # The killed job runs with Ray Train's default 2 s polling, so epochs are seconds apart.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tokenize_jobs.train_tokenizer", "--config", str(preset)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(ray_runs(lake_root).glob("*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None, f"job exited early: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    record = run(load_config(preset))
    assert record.status == "succeeded"
    lake = Lake(str(lake_root))
    history = read_history(lake, "item_rqvae")
    assert [row["epoch"] for row in history] == list(range(1, 8))
    assert [row["phase"] for row in history] == [1, 1, 1, 2, 2, 2, 2]
    resumed = [row["epoch"] for row in history if row["attempt"] == 2]
    assert resumed and resumed[0] > 1, f"nothing was resumed: {[row['attempt'] for row in history]}"
    assert all(row["attempt"] == 1 for row in history if row["epoch"] < resumed[0])
    phase1 = [row for row in history if row["phase"] == 1]
    phase2 = [row for row in history if row["phase"] == 2]
    assert phase1[-1]["loss_u2i"] < phase1[0]["loss_u2i"]
    assert phase2[-1]["loss_item_rq"] < phase2[0]["loss_item_rq"]
    assert phase2[-1]["loss_user_rq"] < phase2[0]["loss_user_rq"]
    assert all(row["val_auc"] is not None for row in history)

    item_sc = check_embeddings(lake, "item_embeddings", "item_id", N_ITEMS, SC_DIM, collaborative=True)
    user_sc = check_embeddings(lake, "user_embeddings", "user_id", N_USERS, SC_DIM, collaborative=True)
    assert np.allclose(np.linalg.norm(item_sc, axis=1), 1, atol=1e-4)
    for name in ("sc_encoder", "item_rqvae", "user_rqvae"):
        model = latest_model(lake, name)
        assert model["version"] == record.run_id and model["kind"] == "tokenizer"
        assert "val_auc" in json.loads(model["metrics"])
    assert set(json.loads(latest_model(lake, "item_rqvae")["metrics"])) >= {"recon", "usage"}
    check_codes(lake, "item_rqvae", item_sc)
    check_codes(lake, "user_rqvae", user_sc)
    # published, so a later run with the same inputs and config starts afresh
    assert not any(ray_runs(lake_root).iterdir())


@pytest.mark.parametrize("ablation", [{"dual": False}, {"use_collaborative": False}, {"use_u2i": False}],
                         ids=lambda a: next(iter(a)))
def test_ablations_run_end_to_end(ray_session, tmp_path, ablation):
    from tokenize_jobs.train_tokenizer import run

    preset = tiny_preset(tmp_path, **ablation)
    lake_root = tmp_path / "lake"
    write_tiny_lake(str(lake_root))
    record = run(load_config(preset))
    assert record.status == "succeeded"
    lake = Lake(str(lake_root))
    t = load_config(preset).tokenize
    feature_dim = SEM_DIM + (COL_DIM if t.use_collaborative else 0)
    sc_dim = SC_DIM if t.use_u2i else feature_dim
    item_sc = check_embeddings(lake, "item_embeddings", "item_id", N_ITEMS, sc_dim, t.use_collaborative)
    user_sc = check_embeddings(lake, "user_embeddings", "user_id", N_USERS, sc_dim, t.use_collaborative)
    check_codes(lake, "item_rqvae", item_sc)
    history = read_history(lake, "item_rqvae")
    assert history[-1]["phase"] == 2
    if t.dual:
        check_codes(lake, "user_rqvae", user_sc)
    else:
        assert latest_model(lake, "user_rqvae") is None
        assert all(row["loss_user_rq"] is None for row in history)
    if t.use_u2i:
        assert latest_model(lake, "sc_encoder") is not None
        assert [row["phase"] for row in history][:3] == [1, 1, 1]
    else:
        assert latest_model(lake, "sc_encoder") is None
        assert all(row["phase"] == 2 and row["val_auc"] is None and row["loss_u2i"] is None for row in history)
        assert history[-1]["loss_item_rq"] < history[0]["loss_item_rq"]
