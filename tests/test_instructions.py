"""The instruction table: prompt templates (pure) and the sft_examples transform and job on tiny inputs."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from a3gr.config import InstructionConfig, PipelineConfig
from a3gr.prompts import (
    ITEM_TASKS, TASKS, TEMPLATES, USER_ANSWER_TASKS, clip_text, render, sanitize_text, seq_prompt, template_for,
)
from a3gr.spark import spark_schema
from expectations import validate_table
from etl.instruction_tasks import build_sft_examples, intent_query

SPLIT = {"train": "train", "valid": "valid", "test": "test"}
# Three users: u1 has 4 train items, u2 has 3, u3 has 1 (no SEQ/C1 train rows); each has a valid and a test item.
SEQUENCES = {1: [1, 2, 3, 4, 5, 6], 2: [2, 7, 8, 1, 9], 3: [5, 3, 4]}
TITLES = {1: "Fender Guitar Picks, 12 pack", 2: "Nylon Strap", 3: "Strings <a_1><b_2> Nickel Wound",
          4: "Capo for Acoustic Guitar", 5: "Tuner", 6: "Drum Sticks", 7: "Cable 10 ft", 8: "Pedal", 9: None}
PROFILES = {1: ("Likes <u_a_9> strings and picks.", [1, 2, 3, 4]), 2: ("Plays electric guitar.", [2, 7, 8]),
            3: ("New player.", [5])}
TOKEN = re.compile(r"<(?:u_)?[a-h]_\d+>")


def item_scid(item: int) -> str:
    return f"<a_{item}><b_{item + 50}><c_5><d_0>"


def user_scid(user: int) -> str:
    return f"<u_a_{user}><u_b_0><u_c_{user}>"


def frames() -> dict[str, pd.DataFrame]:
    rows = []
    for user, seq in SEQUENCES.items():
        splits = ["train"] * (len(seq) - 2) + ["valid", "test"]
        rows += [{"user_id": user, "item_id": it, "ts": None, "position": p, "rating": 5.0, "split": s}
                 for p, (it, s) in enumerate(zip(seq, splits))]
    items = pd.DataFrame({
        "item_id": list(TITLES), "item_key": [f"i{i}" for i in TITLES], "title": list(TITLES.values()),
        "brand": None, "categories": [["Musical Instruments", "Guitar Accessories"] if i % 2 else None for i in TITLES],
        "description": None, "text": [f"Title: {t}." if t else "Item i9 with a <u_a_2> review." for t in TITLES.values()],
        "text_source": "metadata"})
    return {
        "interactions": pd.DataFrame(rows),
        "items": items,
        "users": pd.DataFrame({"user_id": list(PROFILES), "user_key": [f"u{u}" for u in PROFILES],
                               "profile_text": [p for p, _ in PROFILES.values()],
                               "profile_items": [i for _, i in PROFILES.values()]}),
        "item_scid": pd.DataFrame({"item_id": list(TITLES), "codes": [[i, i + 50, 5, 0] for i in TITLES],
                                   "scid": [item_scid(i) for i in TITLES], "tokenizer_version": "t"}),
        "user_scid": pd.DataFrame({"user_id": list(SEQUENCES), "codes": [[u, 0, u] for u in SEQUENCES],
                                   "scid": [user_scid(u) for u in SEQUENCES], "tokenizer_version": "t"}),
    }


def heldout() -> pd.DataFrame:
    inter = frames()["interactions"]
    return inter.loc[inter["split"] != "train", ["user_id", "item_id", "split"]]


def build(spark, icfg: InstructionConfig | None = None, max_history: int = 2, seed: int = 7) -> pd.DataFrame:
    t = {name: spark.createDataFrame(frame, schema=spark_schema(name)) for name, frame in frames().items()}
    df = build_sft_examples(t["interactions"], t["items"], t["users"], t["item_scid"], t["user_scid"],
                            icfg or InstructionConfig(), max_history, seed)
    assert [(f.name, f.dataType) for f in df.schema] == [(f.name, f.dataType) for f in spark_schema("sft_examples")]
    return df.toPandas().sort_values("example_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def examples(spark) -> pd.DataFrame:
    return build(spark)


# --- prompts (pure) ---------------------------------------------------------------------------

def test_every_task_has_three_templates_naming_the_user_unless_the_user_is_the_answer():
    assert set(TEMPLATES) == set(TASKS)
    for task, templates in TEMPLATES.items():
        assert len(templates) >= 3
        assert all(("{user}" in t) != (task in USER_ANSWER_TASKS) for t in templates), task


def test_sanitize_and_clip_neutralise_scid_looking_text():
    assert sanitize_text("Strings <a_1><b_2>\n <u_a_3> ok ") == "Strings ‹a_1›‹b_2› ‹u_a_3› ok"
    assert sanitize_text(None) == ""
    assert clip_text("one two three four", 12) == "one two"
    assert clip_text("abcdefghijkl", 5) == "abcde"
    assert render("c3_title_to_scid", 0, user=user_scid(1), title="<a_1><b_2>") == (
        "User <u_a_1><u_b_0><u_c_1> asks: which item has the title \"‹a_1›‹b_2›\"?")


def test_template_for_is_stable_seeded_and_in_range():
    picks = [template_for(f"seq:{u}:1", 3, seed=7) for u in range(200)]
    assert picks == [template_for(f"seq:{u}:1", 3, seed=7) for u in range(200)]
    assert set(picks) == {0, 1, 2}
    assert picks != [template_for(f"seq:{u}:1", 3, seed=8) for u in range(200)]
    assert template_for("seq:1:1", 1, seed=7) == 0
    with pytest.raises(ValueError, match="n_templates"):
        template_for("x", 0, seed=7)


def test_render_names_unknown_tasks_templates_and_missing_fields():
    assert seq_prompt(user_scid(2), []) == (
        "User <u_a_2><u_b_0><u_c_2> has interacted with the following items in chronological order: no items yet. "
        "Predict the next item this user will interact with.")
    with pytest.raises(ValueError, match="unknown SFT task 'seq2'"):
        render("seq2", 0)
    with pytest.raises(ValueError, match="templates 0..3, got 9"):
        seq_prompt(user_scid(1), [], template=9)
    with pytest.raises(ValueError, match=r"needs field\(s\) \['query'\]"):
        render("c2_intent", 0, user=user_scid(1))


def test_intent_query_keeps_category_and_title_key_words():
    assert intent_query("The Capo for an Acoustic Guitar", "Guitar Accessories", 120) == (
        "guitar accessories: capo acoustic guitar")
    assert intent_query(None, None, 120) == ""
    assert len(intent_query("a very long title " * 20, None, 30)) <= 30


# --- the transform ----------------------------------------------------------------------------

def test_row_counts_per_task_and_split(examples):
    counts = examples.groupby(["task", "split"]).size().to_dict()
    assert counts == {("seq", "train"): 5, ("seq", "valid"): 3, ("c1_asym", "train"): 4, ("c2_intent", "train"): 5,
                      ("c3_title_to_scid", "train"): 5, ("c3_scid_to_title", "train"): 5,
                      ("b1_preference", "train"): 3, ("b2_profile_to_user", "train"): 3,
                      ("b2_user_to_profile", "train"): 3}
    assert examples["example_id"].is_unique
    assert examples.groupby("user_id")["split"].apply(lambda s: (s == "valid").sum()).eq(1).all()


def test_known_user_prompts_and_responses(examples):
    by_id = examples.set_index("example_id")
    valid = by_id.loc["seq:1:4"]  # user 1's valid item 5 at position 4; history capped to 2 train items
    assert (valid["split"], valid["template"], valid["target_item"]) == ("valid", 0, 5)
    assert valid["prompt"] == (
        "User <u_a_1><u_b_0><u_c_1> has interacted with the following items in chronological order: "
        "<a_3><b_53><c_5><d_0>, <a_4><b_54><c_5><d_0>. Predict the next item this user will interact with.")
    assert valid["prompt"] == seq_prompt(user_scid(1), [item_scid(3), item_scid(4)])
    assert valid["response"] == item_scid(5) and list(valid["item_ids"]) == [3, 4, 5]

    seq = by_id.loc["seq:1:3"]
    assert seq["prompt"] == seq_prompt(user_scid(1), [item_scid(2), item_scid(3)], template=seq["template"])
    assert (seq["response"], list(seq["item_ids"])) == (item_scid(4), [2, 3, 4])
    assert sorted(examples.loc[(examples.task == "seq") & (examples.user_id == 1), "example_id"]) == [
        "seq:1:1", "seq:1:2", "seq:1:3", "seq:1:4"]

    to_user = by_id.loc["b2_profile_to_user:1:profile"]
    assert to_user["response"] == user_scid(1) and "<u_" not in to_user["prompt"]
    assert "Likes ‹u_a_9› strings and picks." in to_user["prompt"]
    assert by_id.loc["b2_user_to_profile:1:profile", "response"] == "Likes ‹u_a_9› strings and picks."
    assert list(by_id.loc["b1_preference:1:profile", "item_ids"]) == [3, 4, 1, 2]
    c1 = by_id.loc["c1_asym:1:3"]
    assert "\"Nylon Strap\", \"Strings ‹a_1›‹b_2› Nickel Wound\"" in c1["prompt"] and c1["response"] == item_scid(4)


def test_responses_and_user_scid_in_prompts(examples):
    for row in examples.itertuples():
        if row.task in ITEM_TASKS:
            assert row.response == item_scid(int(row.target_item)), row.example_id
        if row.task not in USER_ANSWER_TASKS:
            assert user_scid(row.user_id) in row.prompt, row.example_id


def test_no_leakage_and_every_scid_token_belongs_to_a_listed_item(examples):
    held = heldout()
    test_item = held[held.split == "test"].set_index("user_id")["item_id"]
    valid_item = held[held.split == "valid"].set_index("user_id")["item_id"]
    for row in examples.itertuples():
        ids = set(row.item_ids)
        assert test_item[row.user_id] not in ids, row.example_id
        if row.split == "train":
            assert valid_item[row.user_id] not in ids, row.example_id
        allowed = set(TOKEN.findall(user_scid(row.user_id) + "".join(item_scid(i) for i in ids)))
        assert set(TOKEN.findall(row.prompt + row.response)) <= allowed, row.example_id
    text = " ".join(examples["prompt"]) + " ".join(examples["response"])
    assert "<a_1><b_2>" not in text and "‹a_1›‹b_2›" in text and "<u_a_9>" not in text
    assert validate_table("sft_examples", examples, {"heldout": held}).success


def test_same_inputs_and_seed_give_the_same_table_and_config_limits_tasks(spark, examples):
    pd.testing.assert_frame_equal(build(spark), examples)
    other_seed = build(spark, seed=8)
    assert other_seed["example_id"].tolist() != examples["example_id"].tolist() or \
        other_seed["template"].tolist() != examples["template"].tolist()

    limited = build(spark, InstructionConfig(tasks=["seq", "b2"], max_seq_per_user=1), max_history=20)
    assert limited.groupby(["task", "split"]).size().to_dict() == {
        ("seq", "train"): 2, ("seq", "valid"): 3, ("b2_profile_to_user", "train"): 3,
        ("b2_user_to_profile", "train"): 3}
    assert sorted(limited.loc[(limited.task == "seq") & (limited.split == "train"), "example_id"]) == [
        "seq:1:3", "seq:2:2"]
    assert list(limited.set_index("example_id").loc["seq:1:4", "item_ids"]) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown task families \\['c9'\\]"):
        build(spark, InstructionConfig(tasks=["seq", "c9"]))


# --- the job shell --------------------------------------------------------------------------

def test_job_publishes_through_the_lake_and_skips_a_rerun(spark, lake_root):
    from a3gr.lake import Lake
    from etl.instructions import run

    lake = Lake(lake_root)
    for name, frame in frames().items():
        lake.write_arrow(name, frame)
    cfg = PipelineConfig()
    cfg.lake.root = lake_root
    record = run(cfg, spark=spark)
    assert record.status == "succeeded" and record.row_counts["sft_examples"] == 36
    stored = lake.read_pandas("sft_examples")
    assert len(stored) == 36 and stored["example_id"].is_unique
    assert run(cfg, spark=spark).status == "skipped"
