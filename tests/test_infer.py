"""Nightly batch inference: prompts, engines, atomic partition replacement, skip, kill-and-resume, active users."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from a3gr.config import config_to_dict
from a3gr.lake import Lake
from a3gr.prompts import seq_prompt
from a3gr.registry import register_model
from a3gr.validation import validate_stored
from alignment_data import tiny_config, tiny_tables
from batch_infer import infer
from batch_infer.engines import build_prompts, make_engine
from training.sft_loop import build_initial_model

ROOT = Path(__file__).resolve().parents[1]
TOP_K, BATCH = 5, 8
DAY1, DAY2, DAY3, DAY4 = (datetime.date(2024, 1, d) for d in (2, 3, 4, 5))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def user_features_of(feedback: pd.DataFrame) -> pd.DataFrame:
    """user_features rows from tiny_tables' feedback (one row per interaction, in order)."""
    rows = []
    for user, events in feedback.groupby("user_id", sort=True):
        train = events.loc[events["split"] == "train", "item_id"].tolist()
        rows.append({"user_id": user, "history": train, "history_len": len(train), "n_train": len(train),
                     "avg_rating": None, "valid_item": int(events.loc[events["split"] == "valid", "item_id"].iloc[0]),
                     "test_item": int(events.loc[events["split"] == "test", "item_id"].iloc[0])})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session):
    """A lake with user_features, user_scid, item_scid and a registered (untrained) tiny 'sft' backbone."""
    directory = tmp_path_factory.mktemp("infer")
    cfg = tiny_config(directory)
    tables = tiny_tables(cfg)
    build_initial_model(cfg, tables, directory / "model")
    lake = Lake.from_config(cfg)
    lake.write_arrow("user_features", user_features_of(tables["feedback"]))
    lake.write_arrow("user_scid", tables["user_scid"])
    lake.write_arrow("item_scid", tables["item_scid"])
    register_model(lake, "sft", "v1", "backbone", directory / "model", "test-run")
    i = cfg.infer
    i.beam, i.top_k, i.batch_size, i.num_actors, i.run_date = 6, TOP_K, BATCH, 1, DAY1.isoformat()
    cfg.tokenize.ray_address = ray_session.get_runtime_context().gcs_address
    first = infer.run(cfg)
    return cfg, lake, first


def night(lake: Lake, day: datetime.date) -> pd.DataFrame:
    frame = lake.table("recommendations").to_pandas(filters=[("run_date", "=", day)])
    return frame.sort_values(["user_id", "rank"]).reset_index(drop=True)


# --- pure parts ------------------------------------------------------------------------------------

def test_prompts_of_each_split_show_the_right_history_and_target():
    features = pd.DataFrame({"user_id": [2, 1], "history": [[1, 2, 3], [4]], "valid_item": [5, 6],
                             "test_item": [7, 8]})
    user_scid = pd.DataFrame({"user_id": [1, 2], "scid": ["<u_a_1><u_b_0><u_c_0>", "<u_a_2><u_b_0><u_c_0>"]})
    item_scid = pd.DataFrame({"item_id": range(1, 9), "scid": [f"<a_{i}><b_0><c_0><d_0>" for i in range(1, 9)]})
    item = dict(zip(item_scid["item_id"], item_scid["scid"]))
    serve = build_prompts(features, user_scid, item_scid, "serve", max_history=3)
    assert serve["user_id"].tolist() == [1, 2] and serve["target_item"].isna().all()
    assert serve["prompt"][1] == seq_prompt(user_scid["scid"][1], [item[3], item[5], item[7]])
    valid = build_prompts(features, user_scid, item_scid, "valid", max_history=3)
    assert valid["prompt"][1] == seq_prompt(user_scid["scid"][1], [item[1], item[2], item[3]])
    assert valid["target_item"].tolist() == [6, 5]
    test = build_prompts(features, user_scid, item_scid, "test", max_history=2)
    assert test["prompt"][0] == seq_prompt(user_scid["scid"][0], [item[4], item[6]])
    assert test["target_item"].tolist() == [8, 7]
    with pytest.raises(KeyError, match=r"user_id \[2\]"):
        build_prompts(features, user_scid.iloc[:1], item_scid, "serve", 3)
    with pytest.raises(KeyError, match=r"user_id 1: history item\(s\) \[4\]"):
        build_prompts(features, user_scid, item_scid[item_scid["item_id"] != 4], "valid", 3)


def test_a_user_with_fewer_than_top_k_items_is_an_error_that_names_the_user():
    ids, scids = np.array([10, 11, 12]), np.array(["a", "b", "c"], dtype=object)
    rows = infer.recommendation_rows(np.array([7, 8]), [[2, 0], [1, 2]], [[-1.0, -2.0], [-0.5, -0.6]], ids, scids,
                                     2, "sft/v1")
    assert rows["item_id"].tolist() == [12, 10, 11, 12] and rows["rank"].tolist() == [1, 2, 1, 2]
    with pytest.raises(RuntimeError, match=r"user_id 8 \(1 items\)"):
        infer.recommendation_rows(np.array([7, 8]), [[2, 0], [1]], [[-1.0, -2.0], [-0.5]], ids, scids, 2, "sft/v1")


def test_run_dates_and_partition_values_are_validated_dates(tmp_path):
    assert infer.resolve_run_date("2024-02-29") == datetime.date(2024, 2, 29)
    for bad in ("2024-02-30", "2024-01-01' OR '1'='1", "yesterday"):
        with pytest.raises(ValueError, match="YYYY-MM-DD"):
            infer.resolve_run_date(bad)
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(ValueError):
        lake.replace_partition("recommendations", pd.DataFrame(), {"run_date": "2024-01-01' OR '1'='1"})
    with pytest.raises(ValueError, match="partition column"):
        lake.replace_partition("recommendations", pd.DataFrame(), {"user_id": 1})


def test_no_served_model_and_unknown_or_missing_engines_are_named(tmp_path):
    with pytest.raises(LookupError, match="no 'dpo' model and no 'sft' fallback"):
        infer.resolve_model(Lake(str(tmp_path / "lake")), "dpo")
    with pytest.raises(ValueError, match="transformers, vllm"):
        make_engine("onnx", "/nowhere", np.zeros((1, 4), dtype=np.int64), 2, 1)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"align3gr\[vllm\]"):
            make_engine("vllm", "/nowhere", np.zeros((1, 4), dtype=np.int64), 2, 1)


def test_promotion_gate_serves_dpo_only_when_it_is_not_worse_than_sft(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    for name in ("sft", "dpo"):
        (tmp_path / name).mkdir()
    register_model(lake, "sft", "s1", "backbone", tmp_path / "sft", "r1", metrics={"recall@10": 0.20, "val_users": 500})
    register_model(lake, "dpo", "d1", "backbone", tmp_path / "dpo", "r2", metrics={"recall@10": 0.18, "val_users": 500})
    assert infer.resolve_model(lake, "dpo", promotion_gate=True)[0] == "sft"
    assert infer.resolve_model(lake, "dpo", promotion_gate=False)[0] == "dpo"
    assert "0.1800 < sft/s1 0.2000 on the same 500 users" in infer.promotion_check(
        "dpo", infer.resolve_model(lake, "dpo")[1], infer.resolve_model(lake, "sft")[1])
    register_model(lake, "dpo", "d2", "backbone", tmp_path / "dpo", "r3", metrics={"recall@10": 0.20, "val_users": 500})
    assert infer.resolve_model(lake, "dpo", promotion_gate=True)[1]["version"] == "d2"  # a tie is promoted
    # figures on other validation users (or none) cannot be compared: the configured model is served
    register_model(lake, "dpo", "d3", "backbone", tmp_path / "dpo", "r4", metrics={"recall@10": 0.10, "val_users": 90})
    assert infer.resolve_model(lake, "dpo", promotion_gate=True)[1]["version"] == "d3"


def test_active_users_are_the_new_and_the_changed():
    before = pd.DataFrame({"user_id": [1, 2, 3], "history": [[1], [2], [3]], "valid_item": [4, 5, 6],
                           "test_item": [7, 8, 9]})
    scid = pd.DataFrame({"user_id": [1, 2, 3, 4], "scid": ["u1", "u2", "u3", "u4"]})
    now = pd.concat([before, pd.DataFrame({"user_id": [4], "history": [[1]], "valid_item": [2], "test_item": [3]})],
                    ignore_index=True)
    now.at[1, "history"] = [2, 5]  # user 2 had a new interaction
    new_scid = scid.assign(scid=["u1", "u2", "u3x", "u4"])  # user 3 was re-tokenized
    active = infer.plan_active_users(now, new_scid, before, scid, previous_users=np.array([1, 2, 3]))
    assert sorted(active.tolist()) == [2, 3, 4]
    assert infer.plan_active_users(now, new_scid, before, scid, np.array([2, 3])).tolist() == [1, 2, 3, 4]


# --- the job through Ray ---------------------------------------------------------------------------

def test_nightly_run_writes_k_valid_rows_per_user_and_an_unchanged_rerun_is_skipped(served):
    cfg, lake, first = served
    assert first.status == "succeeded"
    frame = night(lake, DAY1)
    users = lake.read_pandas("user_features")["user_id"]
    assert sorted(frame["user_id"].unique()) == sorted(users) and len(frame) == len(users) * TOP_K
    assert all(ranks == list(range(1, TOP_K + 1)) for ranks in frame.groupby("user_id")["rank"].apply(list))
    assert (frame.groupby("user_id")["score"].diff().dropna() <= 0).all()
    assert set(frame["model_version"]) == {"sft/v1"}  # infer.model 'dpo' is not registered: the sft fallback
    report = validate_stored(lake, cfg, "recommendations")
    assert report.success, report.summary()
    assert first.row_counts["users_inferred"] == len(users) and first.row_counts["batches_reused"] == 0
    assert not (Path(cfg.lake.root) / "_staging" / "recommendations" / DAY1.isoformat()).exists()

    version = lake.version("recommendations")
    again = infer.run(cfg)
    assert again.status == "skipped" and lake.version("recommendations") == version


def test_another_night_adds_a_partition_and_leaves_the_first_intact(served):
    cfg, lake, _ = served
    before = night(lake, DAY1)
    cfg.infer.run_date = DAY2.isoformat()
    try:
        record = infer.run(cfg)
    finally:
        cfg.infer.run_date = DAY1.isoformat()
    assert record.status == "succeeded"
    pd.testing.assert_frame_equal(night(lake, DAY1), before)
    second = night(lake, DAY2)
    pd.testing.assert_frame_equal(second.drop(columns="run_date"), before.drop(columns="run_date"))
    assert validate_stored(lake, cfg, "recommendations").success


def test_a_killed_run_resumes_with_only_the_unfinished_batches(served, tmp_path):
    cfg, lake, _ = served
    config_file = tmp_path / "night3.yaml"
    settings = config_to_dict(cfg)
    settings["infer"]["run_date"] = DAY3.isoformat()
    config_file.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "A3GR_FAILPOINT": "kill_after_batch:2"}
    killed = subprocess.run([sys.executable, "-m", "batch_infer.infer", "--config", str(config_file)], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    staged = list((Path(cfg.lake.root) / "_staging" / "recommendations" / DAY3.isoformat()).glob("*/batch-*"))
    assert len(staged) == 2
    assert lake.table("recommendations").to_pandas(filters=[("run_date", "=", DAY3)]).empty  # nothing published

    cfg.infer.run_date = DAY3.isoformat()
    try:
        resumed = infer.run(cfg)
    finally:
        cfg.infer.run_date = DAY1.isoformat()
    n_users = len(lake.read_pandas("user_features"))
    n_batches = -(-n_users // BATCH)
    assert resumed.status == "succeeded"
    assert resumed.row_counts["batches_reused"] == 2 and resumed.row_counts["batches_inferred"] == n_batches - 2
    assert resumed.row_counts["users_inferred"] == n_users - 2 * BATCH
    result = night(lake, DAY3)
    assert not result.duplicated(["user_id", "rank"]).any() and result["user_id"].nunique() == n_users
    uninterrupted = night(lake, DAY1)
    pd.testing.assert_frame_equal(result.drop(columns=["run_date", "score"]),
                                  uninterrupted.drop(columns=["run_date", "score"]))
    np.testing.assert_allclose(result["score"], uninterrupted["score"], atol=1e-5)
    assert not (Path(cfg.lake.root) / "_staging" / "recommendations" / DAY3.isoformat()).exists()


def test_active_mode_recomputes_only_changed_users_and_keeps_the_rest(served):
    cfg, lake, _ = served
    features = lake.read_pandas("user_features")
    changed = features["user_id"].iloc[0]
    features.at[0, "history"] = list(features.at[0, "history"])[1:]
    features.at[0, "history_len"] = features.at[0, "n_train"] = len(features.at[0, "history"])
    lake.write_arrow("user_features", features)
    cfg.infer.run_date, cfg.infer.users = DAY4.isoformat(), "active"
    try:
        record = infer.run(cfg)
    finally:
        cfg.infer.run_date, cfg.infer.users = DAY1.isoformat(), "all"
    assert record.status == "succeeded"
    assert record.row_counts["users_inferred"] == 1
    assert record.row_counts["users_carried_over"] == len(features) - 1
    today, before = night(lake, DAY4), night(lake, DAY3)
    assert today["user_id"].nunique() == len(features)
    same = today["user_id"] != changed
    pd.testing.assert_frame_equal(today[same].drop(columns="run_date").reset_index(drop=True),
                                  before[before["user_id"] != changed].drop(columns="run_date").reset_index(drop=True))
    assert validate_stored(lake, cfg, "recommendations").success
