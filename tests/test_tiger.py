"""The TIGER-style baseline: text-only item codes, item-only SEQ examples, the stage on Ray, its evaluation."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from a3gr.config import PipelineConfig
from a3gr.prompts import item_seq_prompt
from a3gr.registry import ITEM_CODES_FILE, latest_model
from a3gr.runs import list_runs
from alignment_data import interactions_of, item_semantic_of, tiny_config, tiny_lake, tiny_tables
from batch_infer.engines import build_prompts
from training.tiger import code_stats, resolved_settings, text_only_codes, tiger_examples

USER_TOKEN = re.compile(r"<u_[a-h]_\d+>")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def small_settings(cfg: PipelineConfig, **changes):
    return dataclasses.replace(resolved_settings(cfg), **{"codebook_size": 8, "code_dim": 8, "hidden": 32,
                                                          "epochs": 20, **changes})


def test_settings_follow_the_item_tokenizer_unless_set():
    cfg = PipelineConfig()
    cfg.tokenize.item_rq.levels, cfg.tokenize.item_rq.codebook_size = 2, 64
    settings = resolved_settings(cfg)
    assert (settings.levels, settings.codebook_size) == (2, 64)
    cfg.train.tiger.codebook_size = 16
    assert resolved_settings(cfg).codebook_size == 16


def test_text_only_codes_are_collision_free_deterministic_and_leave_the_global_rng_alone(tmp_path):
    cfg = tiny_config(tmp_path)
    semantic = item_semantic_of(tiny_tables(cfg)["item_scid"])
    vectors, ids = np.stack(semantic["vector"]), semantic["item_id"].to_numpy()
    settings = small_settings(cfg)
    rng_before = torch.get_rng_state()
    codes = text_only_codes(vectors, ids, settings, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert codes.shape == (len(ids), settings.levels + 1)
    assert len(np.unique(codes, axis=0)) == len(ids)  # the uniqueness level removes every collision
    assert codes[:, :-1].min() >= 0 and codes[:, :-1].max() < settings.codebook_size
    assert np.array_equal(codes, text_only_codes(vectors, ids, settings, seed=7))
    # within a shared code the last level counts up by item_id
    frame = pd.DataFrame({"key": list(map(tuple, codes[:, :-1])), "id": ids, "last": codes[:, -1]})
    for _, group in frame.groupby("key"):
        assert group.sort_values("id")["last"].tolist() == list(range(len(group)))
    stats = code_stats(codes)
    assert stats["uniqueness_codes"] == codes[:, -1].max() + 1 and stats["scid_levels"] == settings.levels + 1
    with pytest.raises(ValueError, match="3 vectors for 2 item ids"):
        text_only_codes(vectors[:3], ids[:2], settings, 7)


def test_examples_are_the_sft_seq_positions_with_item_only_prompts_and_never_the_test_item(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.etl.max_history = 3
    tables = tiny_tables(cfg)  # sft_examples built by etl.instruction_tasks with the same max_history
    interactions = interactions_of(tables["feedback"])
    scid_of = tables["item_scid"].set_index("item_id")["scid"]
    examples = tiger_examples(interactions, scid_of, cfg.etl.max_history)

    seq = tables["sft_examples"][tables["sft_examples"]["task"] == "seq"].set_index("example_id").sort_index()
    mine = examples.set_index("example_id").sort_index()
    assert mine.index.equals(seq.index)  # the same training positions and one valid row per user
    for column in ("split", "user_id", "target_item", "response"):
        assert mine[column].tolist() == seq[column].tolist(), column
    assert mine["item_ids"].map(list).tolist() == seq["item_ids"].map(list).tolist()
    assert (mine["task"] == "seq").all() and not mine["prompt"].str.contains(USER_TOKEN).any()

    held = interactions[interactions["split"] != "train"].set_index(["user_id", "split"])["item_id"]
    for row in examples.itertuples():
        user_rows = interactions[interactions["user_id"] == row.user_id]
        train = user_rows.loc[user_rows["split"] == "train", "item_id"].tolist()
        test_item = held[(row.user_id, "test")]
        assert test_item not in row.item_ids and scid_of[test_item] not in row.prompt
        assert set(row.item_ids) - {held[(row.user_id, "valid")] if row.split == "valid" else -1} <= set(train)
        if row.split == "valid":
            assert row.target_item == held[(row.user_id, "valid")]
            assert row.prompt == item_seq_prompt([scid_of[i] for i in train[-3:]])
        else:
            assert row.target_item in train and scid_of[held[(row.user_id, "valid")]] not in row.prompt
            before = train[:train.index(row.target_item)][-3:]
            assert row.prompt == item_seq_prompt([scid_of[i] for i in before])

    # the most recent positions only, as train.instructions.max_seq_per_user does for sft
    recent = tiger_examples(interactions, scid_of, 3, max_per_user=2)
    assert (recent[recent["split"] == "train"].groupby("user_id").size() == 2).all()
    with pytest.raises(KeyError, match="no text-only code"):
        tiger_examples(interactions, scid_of.drop(index=int(interactions["item_id"].iloc[0])), 3)


def test_item_only_prompts_for_evaluation_have_the_same_histories_and_targets():
    features = pd.DataFrame({"user_id": [2, 1], "history": [[1, 2, 3], [4]], "valid_item": [5, 6],
                             "test_item": [7, 8]})
    user_scid = pd.DataFrame({"user_id": [1, 2], "scid": ["<u_a_1><u_b_0><u_c_0>", "<u_a_2><u_b_0><u_c_0>"]})
    item_scid = pd.DataFrame({"item_id": range(1, 9), "scid": [f"<a_{i}><b_0><c_0><d_0>" for i in range(1, 9)]})
    for split in ("valid", "test"):
        item_only = build_prompts(features, None, item_scid, split, max_history=2)
        with_user = build_prompts(features, user_scid, item_scid, split, max_history=2)
        assert item_only["target_item"].tolist() == with_user["target_item"].tolist()
        assert not item_only["prompt"].str.contains(USER_TOKEN).any()
    test = build_prompts(features, None, item_scid, "test", max_history=2)
    assert test["prompt"].tolist() == [item_seq_prompt(["<a_4><b_0><c_0><d_0>", "<a_6><b_0><c_0><d_0>"]),
                                       item_seq_prompt(["<a_3><b_0><c_0><d_0>", "<a_5><b_0><c_0><d_0>"])]


# ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_stage_registers_tiger_with_its_code_map_and_evaluate_ranks_with_it(tmp_path, ray_session):
    from batch_infer import evaluate
    from training import tiger
    from training.backbone import item_token_matrix, load_backbone
    from training.common import item_codes

    cfg = tiny_config(tmp_path, epochs=3.0, eval_every=1000)
    cfg.tokenize.ray_address = ray_session.get_runtime_context().gcs_address
    cfg.train.tiger.codebook_size, cfg.train.tiger.code_dim, cfg.train.tiger.hidden = 8, 8, 32
    cfg.train.tiger.epochs = 20
    cfg.eval.ks, cfg.eval.paper_beam, cfg.eval.models = [5, 10], 10, ["popular", "tiger"]
    lake = tiny_lake(cfg, tiny_tables(cfg))

    record = tiger.run(cfg)
    assert record.status == "succeeded"
    model = latest_model(lake, "tiger")
    assert model is not None and model["kind"] == "backbone"
    codes_file = pd.read_parquet(f"{model['path']}/{ITEM_CODES_FILE}")
    assert list(codes_file.columns) == ["item_id", "codes", "scid", "tokenizer_version"]
    assert sorted(codes_file["item_id"]) == sorted(lake.read_pandas("item_semantic")["item_id"])
    assert codes_file["scid"].is_unique and codes_file["scid"].map(lambda s: s.count("<")).eq(4).all()
    metrics = json.loads(model["metrics"])
    assert 0.0 <= metrics["recall@10"] <= 1.0 and metrics["uniqueness_codes"] == codes_file["codes"].map(
        lambda c: c[-1]).max() + 1
    # every code of the map, the last level's included, is a token of the model's vocabulary
    _, tokenizer = load_backbone(model["path"])
    assert item_token_matrix(tokenizer, item_codes(codes_file)[1]).shape == (len(codes_file), 4)
    assert not any(USER_TOKEN.fullmatch(t) for t in tokenizer.get_vocab())  # no user tokens at all
    assert tiger.run(cfg).status == "skipped"  # nothing changed

    evaluated = evaluate.run(cfg)
    assert evaluated.status == "succeeded"
    rows = lake.read_pandas("eval_metrics")
    mine = rows[rows["model"] == "tiger"]
    assert set(mine["split"]) == {"valid", "test"}
    assert (mine.loc[mine["metric"] == "invalid_scid_rate", "value"] == 0.0).all()
    assert len(mine) == 2 * (3 * 2 + 2)

    cfg.train.tiger.enabled = False  # a disabled baseline records a skip and registers nothing new
    skipped = tiger.run(cfg)
    assert skipped.status == "skipped" and "train.tiger.enabled is false" in skipped.message
    assert latest_model(lake, "tiger")["version"] == model["version"]
    assert list_runs(lake, "tiger", limit=1)[0].run_id == skipped.run_id


def test_nightly_inference_refuses_a_model_with_its_own_item_codes(tmp_path):
    from a3gr.lake import Lake
    from a3gr.registry import register_model
    from batch_infer.infer import resolve_model

    cfg = tiny_config(tmp_path)
    model_dir = tmp_path / "tiger_model"
    model_dir.mkdir()
    (model_dir / ITEM_CODES_FILE).write_bytes(b"")
    lake = Lake.from_config(cfg)
    register_model(lake, "tiger", "v1", "backbone", model_dir, "tiger-test")
    with pytest.raises(ValueError, match="infer.model 'tiger' carries its own item codes"):
        resolve_model(lake, "tiger")
