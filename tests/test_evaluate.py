"""Offline evaluation: metrics by hand, the baselines' rankings, and one evaluation run on a tiny lake."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from a3gr.config import CollaborativeConfig
from a3gr.registry import register_model
from a3gr.runs import list_runs
from a3gr.validation import validate_stored
from alignment_data import tiny_config, tiny_lake, tiny_tables
from batch_infer.evaluate import (PAPER_TABLE1, Ranking, beam_widths, extend_ranking, fixed_ranking, heldout,
                                  latest_report, paper_table, popular_items, ranking_metrics, run, sample_users)
from expectations import require_valid
from expectations.suites import EVAL_AT_K_METRICS, EVAL_RATE_METRICS


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def as_dict(rows) -> dict:
    return {(metric, k): value for metric, k, value in rows}


def test_recall_ndcg_coverage_and_rates_by_hand():
    # user 0: target at rank 2; user 1: target absent; user 2: target at rank 3, item 7 repeated, one dropped beam
    ranking = Ranking([[1, 2, 3], [4, 5, 6], [7, 7, 8]], generated=10, duplicates=1, invalid=1)
    got = as_dict(ranking_metrics(ranking, [2, 9, 8], ks=[1, 2, 3], catalog_size=10))
    assert got[("recall", 1)] == 0.0 and got[("ndcg", 1)] == 0.0
    assert got[("recall", 2)] == pytest.approx(1 / 3)
    assert got[("ndcg", 2)] == pytest.approx((1 / math.log2(3)) / 3)
    assert got[("recall", 3)] == pytest.approx(2 / 3)
    assert got[("ndcg", 3)] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert got[("coverage", 1)] == pytest.approx(3 / 10)  # items 1, 4, 7
    assert got[("coverage", 3)] == pytest.approx(8 / 10)  # 1..8
    assert got[("duplicate_rate", None)] == pytest.approx(0.1) and got[("invalid_scid_rate", None)] == pytest.approx(0.1)
    assert {m for m, _ in got} == set(EVAL_AT_K_METRICS + EVAL_RATE_METRICS)


def test_wider_beam_extends_the_paper_beam_list_without_repeats():
    assert extend_ranking([[1, 2], [3]], [[2, 4, 1, 5], [6, 3, 6]]) == [[1, 2, 4, 5], [3, 6]]
    assert beam_widths([5, 10, 100], 20, 1000) == [20, 100]
    assert beam_widths([5, 10, 100], 20, 48) == [20, 48]  # a beam never asks for more items than exist
    assert beam_widths([5, 10, 100], 20, 15) == [15]
    assert beam_widths([100], 20, 1000) == [100]


def test_popular_baseline_counts_what_is_observed_before_the_split_and_keeps_the_history():
    interactions = pd.DataFrame({"user_id": [0, 0, 1, 1, 2, 0, 1],
                                 "item_id": [3, 1, 3, 1, 2, 2, 2],
                                 "split": ["train"] * 5 + ["valid"] * 2})
    catalog = np.array([1, 2, 3, 4])
    assert popular_items(interactions, "valid", catalog).tolist() == [1, 3, 2, 4]  # ties: lower id first
    assert popular_items(interactions, "test", catalog).tolist() == [2, 1, 3, 4]  # valid rows are known at test time
    ranking = fixed_ranking(popular_items(interactions, "valid", catalog), n_users=2, depth=3)
    assert ranking.items == [[1, 3, 2], [1, 3, 2]] and ranking.generated == 6 and ranking.duplicates == 0
    got = as_dict(ranking_metrics(ranking, [1, 2], ks=[1, 3], catalog_size=4))  # user 0's target is in its history
    assert got[("recall", 1)] == 0.5 and got[("recall", 3)] == 1.0
    assert got[("ndcg", 3)] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert got[("coverage", 3)] == 0.75


def test_heldout_histories_and_seeded_user_sample():
    users = pd.DataFrame({"user_id": [5, 6], "history": [[1, 2, 3], np.array([4])], "valid_item": [7, 8],
                          "test_item": [9, 10]})
    histories, targets = heldout(users, "valid", max_history=3)
    assert histories == [[1, 2, 3], [4]] and targets.tolist() == [7, 8]
    histories, targets = heldout(users, "test", max_history=3)
    assert histories == [[2, 3, 7], [4, 8]] and targets.tolist() == [9, 10]
    with pytest.raises(ValueError, match="unknown evaluation split 'train'"):
        heldout(users, "train", 3)
    ids = np.arange(100)[::-1]
    sample = sample_users(ids, 10, seed=7)
    assert len(sample) == 10 and (np.diff(sample) > 0).all() and np.array_equal(sample, sample_users(ids, 10, 7))
    assert np.array_equal(sample_users(ids, 0, 7), np.arange(100))


def test_paper_table_puts_each_counterpart_under_its_paper_row():
    metrics = [{"model": m, "split": "test", "metric": metric, "k": k, "value": 0.1}
               for m in ("popular", "sasrec", "tiger", "dpo") for metric in ("recall", "ndcg") for k in (5, 10)]
    header, rows = paper_table({"models": {"popular": {}, "sasrec": {}, "tiger": {}, "dpo": {}}, "metrics": metrics})
    assert header == ["model", "source", "R@5", "R@10", "N@5", "N@10"]
    assert [r[0] for r in rows] == ["SASRec", "sasrec (ours)", "TIGER", "tiger (ours)", "LC-Rec", "EAGER-LLM",
                                    "Align3GR", "dpo (ours)", "popular (ours)"]
    assert rows[-3][2:] == [f"{v:.4f}" for v in PAPER_TABLE1["Align3GR"]]


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny SFT model and an untrained SASRec registered, dpo and tiger not: one evaluation run."""
    from tokenize_jobs.collaborative import build_model, save_collaborative
    from training import sft_loop

    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(directory, eval_every=1000)
    cfg.source.kind, cfg.source.lcrec_name = "lcrec", "Instruments"  # only the dataset name: the paper table shows
    cfg.eval.ks, cfg.eval.paper_beam, cfg.eval.max_users = [5, 10, 30], 10, 24
    cfg.eval.models = ["popular", "sasrec", "sft", "dpo", "tiger"]
    tables = tiny_tables(cfg)
    lake = tiny_lake(cfg, tables)
    sft_loop.run_local(cfg, tables, directory / "sft", torch.device("cpu"))
    register_model(lake, "sft", "v1", "backbone", directory / "sft" / "best", "sft-test")
    item_ids = sorted(tables["item_scid"]["item_id"].tolist())
    params = CollaborativeConfig(dim=16, n_layers=1, n_heads=1)
    torch.manual_seed(0)
    sasrec_dir = save_collaborative(build_model(len(item_ids), params), item_ids, directory / "sasrec", params, {})
    register_model(lake, "collaborative", "c1", "sasrec", sasrec_dir, "collaborative-test")
    return cfg, lake


def test_evaluation_run_writes_valid_metrics_and_a_report_and_skips_unregistered_models(evaluated, caplog):
    cfg, lake = evaluated
    with caplog.at_level(logging.WARNING, logger="a3gr.evaluate"):
        record = run(cfg)
    assert record.status == "succeeded"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping dpo: no model 'dpo' registered" in warned and "skipping tiger" in warned
    stored = next(r for r in list_runs(lake, "evaluate") if r.run_id == record.run_id)
    assert stored.message.startswith("skipped models: dpo: ") and "tiger: " in stored.message
    assert stored.row_counts["models_skipped"] == 2 and stored.row_counts["users"] == 24

    metrics = lake.read_pandas("eval_metrics")
    require_valid("eval_metrics", metrics)
    assert set(metrics["run_id"]) == {record.run_id} and set(metrics["dataset"]) == {"lcrec:Instruments"}
    assert set(metrics["model"]) == {"popular", "sasrec", "sft"} and set(metrics["split"]) == {"valid", "test"}
    assert len(metrics) == 3 * 2 * (3 * 3 + 2)
    value = {(r.model, r.split, r.metric, None if pd.isna(r.k) else int(r.k)): r.value for r in metrics.itertuples()}
    assert value[("popular", "valid", "coverage", 10)] == pytest.approx(10 / 48)
    for split in ("valid", "test"):
        assert value[("sft", split, "invalid_scid_rate", None)] == 0.0
        assert value[("sft", split, "duplicate_rate", None)] == 0.0
        assert value[("sft", split, "recall", 30)] >= value[("sft", split, "recall", 10)]
    # each user walks one cluster in order: the SFT model learns it, the popularity list cannot
    assert value[("sft", "valid", "recall", 10)] > value[("popular", "valid", "recall", 10)]

    report = latest_report(cfg)
    assert report is not None and report.parent.name == record.run_id
    for name in ("report.md", "report.html", "metrics.json", "recall_ndcg_at_10.png", "recall_at_k.png"):
        assert (report.parent / name).stat().st_size > 0, name
    assert (report.parent / "recall_ndcg_at_10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "## Split: test" in text and "| sft |" in text and "skipped: dpo (no model 'dpo' registered" in text
    assert "| Align3GR | paper | 0.1103 |" in text and "| sasrec (ours) | ours |" in text
    assert "<table>" in (report.parent / "report.html").read_text()
    summary = json.loads((report.parent / "metrics.json").read_text())
    assert summary["protocol"]["beam_widths"] == [10, 30] and len(summary["metrics"]) == len(metrics)
    print(text)  # shown with pytest -s

    from typer.testing import CliRunner

    from a3gr.cli import app

    shown = CliRunner().invoke(app, ["report", "--set", f"lake.root={cfg.lake.root}"])
    assert shown.exit_code == 0 and shown.output.startswith(f"{report}\n") and "# Offline evaluation" in shown.output

    again = run(cfg)  # same inputs, config and registered versions: nothing to do
    assert again.status == "skipped" and len(lake.read_pandas("eval_metrics")) == len(metrics)
    forced = run(cfg, force=True)  # a second run appends its own rows; the stored table still validates
    assert set(lake.read_pandas("eval_metrics")["run_id"]) == {record.run_id, forced.run_id}
    assert validate_stored(lake, cfg, "eval_metrics").success
