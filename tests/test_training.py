"""SFT and progressive Softmax-DPO loops on a tiny Qwen2 (no Ray, no lake): learning, resume, stages."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment_data import tiny_config, tiny_tables
from training import dpo_loop, sft_loop
from training.backbone import load_backbone
from training.candidates import build_preference_pairs
from training.common import MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory):
    """One SFT run shared by the tests below (a few seconds on one thread)."""
    directory = tmp_path_factory.mktemp("sft")
    cfg = tiny_config(directory)
    tables = tiny_tables(cfg)
    result = sft_loop.run_local(cfg, tables, directory / "sft", torch.device("cpu"))
    return cfg, tables, directory, result


def test_sft_lowers_the_loss_and_keeps_the_best_model(trained_sft):
    cfg, tables, directory, result = trained_sft
    history = result["history"]
    assert result["step"] == sft_loop.total_steps(int((tables["sft_examples"]["split"] == "train").sum()),
                                                  cfg.train.sft, 1)
    assert len(history) >= 2
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert 0.0 <= history[-1]["recall@10"] <= 1.0 and history[-1]["val_users"] == 40
    best = result["best"]
    assert best["recall@10"] == max(row["recall@10"] for row in history)
    assert (directory / "sft" / "best" / "config.json").exists()
    # the walk through a cluster is learnable: far above chance (10 of 48 items = 0.21)
    assert best["recall@10"] > 0.5


def test_preference_rows_and_progressive_dpo(trained_sft):
    cfg, tables, directory, _ = trained_sft
    model, tokenizer = load_backbone(directory / "sft" / "best")
    pairs, stats = build_preference_pairs(tables["sft_examples"], tables["item_scid"], tables["feedback"], model,
                                          tokenizer, cfg, "sft/test", torch.device("cpu"))
    n = cfg.train.dpo.n_rejected
    assert set(pairs["stage"]) == {"sp_easy", "sp_medium", "rf_easy", "rf_hard"}  # no two items share two codes: no hard rows
    assert (pairs["rejected_items"].map(len) == n).all()
    assert not any(c in r for c, r in zip(pairs["chosen_item"], pairs["rejected_items"]))
    cfg.train.dpo.stages = ["sp_easy", "sp_medium", "rf_easy", "rf_hard"]
    results = dpo_loop.run_local(cfg, directory / "sft" / "best", {**tables, "preference_pairs": pairs},
                                 directory / "dpo", torch.device("cpu"))
    assert [r["stage"] for r in results] == cfg.train.dpo.stages
    for result in results:
        m = result["metrics"]
        # each stage starts with policy == its reference: the Softmax-DPO loss is exactly log(1 + N)
        assert m["first_loss"] == pytest.approx(math.log(1 + n), abs=1e-4)
        assert m["final_loss"] < m["first_loss"]
        assert (Path(result["model"]) / "config.json").exists()
    # a re-run finds every stage done and trains nothing
    again = dpo_loop.run_local(cfg, directory / "sft" / "best", {**tables, "preference_pairs": pairs},
                               directory / "dpo", torch.device("cpu"))
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]


def test_stage_plans_of_every_mode():
    cfg = tiny_config(Path("/tmp"))
    dpo = cfg.train.dpo
    assert [s for s, _ in dpo_loop.stage_plan(dpo)] == ["sp_easy", "sp_medium", "sp_hard", "rf_easy", "rf_hard"]
    dpo.mode = "sp_only"
    assert [s for s, _ in dpo_loop.stage_plan(dpo)] == ["sp_easy", "sp_medium", "sp_hard"]
    dpo.mode = "no_progression"
    assert dpo_loop.stage_plan(dpo) == [("pooled", list(dpo.stages))]
    dpo.mode = "plain"
    assert [s for s, _ in dpo_loop.stage_plan(dpo)] == ["plain"]
    dpo.mode = "curriculum"
    with pytest.raises(ValueError, match="progressive"):
        dpo_loop.stage_plan(dpo)


SFT_SCRIPT = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/tests")
    from pathlib import Path
    from alignment_data import tiny_config, tiny_tables
    from training import sft_loop
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    cfg = tiny_config(out, epochs=1.0, eval_every=100)
    result = sft_loop.run_local(cfg, tiny_tables(cfg), out / "sft", torch.device("cpu"))
    print("FINISHED", result["step"])
""")


def _run_sft(directory: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("A3GR_FAILPOINT", None)
    if failpoint:
        env["A3GR_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", SFT_SCRIPT.format(root=str(ROOT)), str(directory)], env=env,
                          capture_output=True, text=True, timeout=600)


def _final_weights(directory: Path) -> dict[str, torch.Tensor]:
    checkpoints = sorted((directory / "sft" / "checkpoints").glob("ckpt-*"))
    return load_file(checkpoints[-1] / MODEL_FILE)


def test_killed_sft_resumes_at_the_checkpoint_step_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    killed = _run_sft(tmp_path / "killed", failpoint="kill_after_checkpoint:10")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "FINISHED" not in killed.stdout
    resumed = _run_sft(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 10" in resumed.stderr and "FINISHED" in resumed.stdout
    clean = _run_sft(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert resumed.stdout.split()[-1] == clean.stdout.split()[-1]
    a, b = _final_weights(tmp_path / "killed"), _final_weights(tmp_path / "clean")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path):
    killed = _run_sft(tmp_path, failpoint="kill_after_checkpoint:10")
    assert killed.returncode == -9
    checkpoints = sorted((tmp_path / "sft" / "checkpoints").glob("ckpt-*"))
    assert len(checkpoints) == 2
    newest = checkpoints[-1] / MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    resumed = _run_sft(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint {checkpoints[-1]} cannot be loaded" in resumed.stderr
    assert "at step 5" in resumed.stderr and "FINISHED" in resumed.stdout
