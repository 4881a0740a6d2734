"""The expectation suites on tiny frames: good frames pass, each planted defect fails by name."""
from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from a3gr.catalog import CATALOG, TableSpec, UnknownTableError
from expectations import ValidationFailed, require_valid, validate_table
from expectations.suites import RULES

UTC = pd.Timestamp("2024-01-01", tz="UTC")


# ---------------------------------------------------------------------------------------------
# Good frames (three users, four interactions each: train, train, valid, test).

def interactions() -> pd.DataFrame:
    rows = []
    for user in range(3):
        for position, split in enumerate(["train", "train", "valid", "test"]):
            rows.append({"user_id": user, "item_id": 10 * user + position, "ts": UTC + pd.Timedelta(days=position),
                         "position": position, "rating": 1.0 + position, "split": split})
    return pd.DataFrame(rows)


def feedback() -> pd.DataFrame:
    f = interactions()[["user_id", "item_id", "split", "rating"]].copy()
    f["sentiment"] = [0.5, -0.2, None, 0.9] * 3
    f["label"] = ["liked", "disliked", None, "neutral"] * 3
    f["labeler"] = ["rating", "vader", None, "rating"] * 3
    return f


def user_features() -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": [0, 1, 2],
        "history": [[0, 1], [10, 11], np.array([20, 21])],  # lists or arrays, as arrow gives them
        "history_len": [2, 2, 2],
        "n_train": [2, 2, 2],
        "avg_rating": [1.5, None, 2.0],
        "valid_item": [2, 12, 22],
        "test_item": [3, 13, 23],
    })


def users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": [0, 1, 2], "user_key": ["u0", "u1", "u2"],
                         "profile_text": ["a", "b", "c"], "profile_items": [[0, 1], [10, 11], [20, 21]]})


def heldout() -> pd.DataFrame:
    i = interactions()
    return i.loc[i["split"] != "train", ["user_id", "item_id", "split"]]


def sft_examples() -> pd.DataFrame:
    """Per user of interactions(): a train SEQ row, the valid SEQ row and a profile -> user SCID row."""
    def item(i: int) -> str:
        return f"<a_{i}><b_0><c_0><d_0>"

    rows = []
    for u in range(3):
        user, (first, second, valid) = f"<u_a_{u}><u_b_0><u_c_0>", (10 * u, 10 * u + 1, 10 * u + 2)
        rows += [(f"seq:{u}:1", "seq", u, f"User {user} bought {item(first)}. Next?", item(second), second,
                  [first, second], "train"),
                 (f"seq:{u}:2", "seq", u, f"User {user} bought {item(first)}, {item(second)}. Next?", item(valid),
                  valid, [first, second, valid], "valid"),
                 (f"b2_profile_to_user:{u}:profile", "b2_profile_to_user", u, "Which user likes ‹a_1› picks?", user,
                  None, [first], "train")]
    df = pd.DataFrame(rows, columns=["example_id", "task", "user_id", "prompt", "response", "target_item",
                                     "item_ids", "split"])
    return df.assign(template=0, target_item=df["target_item"].astype("Int64"))[
        ["example_id", "task", "template", "user_id", "prompt", "response", "target_item", "item_ids", "split"]]


def id_map() -> pd.DataFrame:
    return pd.DataFrame({"kind": ["user", "user", "item", "item"], "key": ["u0", "u1", "i0", "i1"], "id": [0, 1, 0, 1]})


def raw_interactions() -> pd.DataFrame:
    return pd.DataFrame({"source": ["s"] * 3, "user_key": ["u0", "u0", "u1"], "item_key": ["i0", "i0", "i1"],
                         "ts": [UTC, UTC, None], "position": [0, 0, None], "rating": [5.0, 5.0, None],
                         "review_text": ["ok", "ok", None], "summary": [None] * 3, "ingest_run_id": ["r1"] * 3})


def items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [0, 1], "item_key": ["i0", "i1"], "title": ["T", None], "brand": [None, "B"],
                         "categories": [["c"], None], "description": ["d", None], "text": ["T d", "B"],
                         "text_source": ["metadata", "none"]})


def item_features() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [0, 1], "text": ["T d", "B"], "n_train": [3, 0], "n_users": [2, 0],
                         "popularity": [1.0, 0.0], "avg_rating": [4.5, None]})


def preference_pairs() -> pd.DataFrame:
    """One row per stage, two rejected each (context n_rejected=2); chosen is item 1 = <a_1><b_1><c_1><d_0>."""
    rejected = {  # stage: (rejected items, their SCIDs, sources)
        "sp_easy": ([2, 3], ["<a_2><b_1><c_1><d_0>", "<a_3><b_1><c_1><d_0>"], ["generated", "prefix_fill"]),
        "sp_medium": ([4, 5], ["<a_1><b_2><c_1><d_0>", "<a_1><b_3><c_1><d_0>"], ["generated", "generated"]),
        "sp_hard": ([6, 7], ["<a_1><b_1><c_2><d_0>", "<a_1><b_1><c_1><d_1>"], ["prefix_fill", "prefix_fill"]),
        "rf_easy": ([2, 6], ["<a_2><b_1><c_1><d_0>", "<a_1><b_1><c_2><d_0>"], ["disliked", "random_fill"]),
        "rf_hard": ([4, 3], ["<a_1><b_2><c_1><d_0>", "<a_3><b_1><c_1><d_0>"], ["neutral", "model_unchosen"]),
    }
    return pd.DataFrame({
        "pair_id": [f"{stage}:0:3" for stage in rejected], "stage": list(rejected), "user_id": [0] * 5,
        "prompt": ["user 0 bought ..."] * 5, "chosen_item": [1] * 5, "chosen": ["<a_1><b_1><c_1><d_0>"] * 5,
        "rejected_items": [r[0] for r in rejected.values()], "rejected": [r[1] for r in rejected.values()],
        "rejected_sources": [r[2] for r in rejected.values()], "model_version": ["sft-v1"] * 5,
    })


def recommendations() -> pd.DataFrame:
    """Two users, top-3 each (context top_k=3), items 1..4 of ITEM_SCIDS, scores falling with rank."""
    rows = [(0, 1, 2, -0.1), (0, 2, 1, -0.5), (0, 3, 4, -0.5), (1, 1, 4, -0.2), (1, 2, 3, -1.0), (1, 3, 1, -2.0)]
    frame = pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score"])
    frame.insert(0, "run_date", pd.Timestamp("2024-01-02").date())
    return frame.assign(rank=frame["rank"].astype("int32"), scid=frame["item_id"].map(ITEM_SCIDS),
                        model_version="dpo/v1")[["run_date", "user_id", "rank", "item_id", "scid", "score",
                                                 "model_version"]]


ITEM_SCIDS = {i: f"<a_{i}><b_0><c_0><d_0>" for i in range(1, 5)}
RECOMMENDATIONS_CONTEXT = {"top_k": 3, "item_ids": np.array(list(ITEM_SCIDS)), "item_scids": list(ITEM_SCIDS.values())}


def runs() -> pd.DataFrame:
    return pd.DataFrame({"run_id": ["r1", "r2"], "job": ["etl.ingest"] * 2, "status": ["succeeded", "skipped"],
                         "config_hash": ["h"] * 2, "code_version": ["v"] * 2, "started_at": [UTC, UTC],
                         "ended_at": [UTC, None], "duration_s": [1.0, None], "inputs": ["{}", None],
                         "outputs": ["{}", None], "row_counts": ["{}", None], "message": [None, None],
                         "config": [None, None]})



def eval_metrics() -> pd.DataFrame:
    """One run, two models, both splits: recall, ndcg and coverage at k 5 and 10, and the two rates."""
    rows = []
    for model, base in (("popular", 0.02), ("sft", 0.1)):
        for split in ("valid", "test"):
            for k, grow in ((5, 1.0), (10, 1.5)):
                rows += [(model, split, "recall", k, base * grow), (model, split, "ndcg", k, 0.7 * base * grow),
                         (model, split, "coverage", k, 0.1 * grow)]
            rows += [(model, split, "duplicate_rate", None, 0.0), (model, split, "invalid_scid_rate", None, 0.0)]
    frame = pd.DataFrame(rows, columns=["model", "split", "metric", "k", "value"])
    return frame.assign(run_id="evaluate-1", dataset="synthetic", k=pd.array(frame["k"], dtype="Int32"))[
        ["run_id", "model", "dataset", "split", "metric", "k", "value"]]


GOOD = {
    "preference_pairs": (preference_pairs, {"n_rejected": 2}),
    "eval_metrics": (eval_metrics, {}),
    "recommendations": (recommendations, RECOMMENDATIONS_CONTEXT),
    "interactions": (interactions, {}),
    "feedback": (feedback, {}),
    "user_features": (user_features, {"max_history": 2}),
    "users": (users, {"heldout": heldout()}),
    "sft_examples": (sft_examples, {"heldout": heldout()}),
    "id_map": (id_map, {}),
    "raw_interactions": (raw_interactions, {}),
    "raw_items": (lambda: pd.DataFrame({"source": ["s", "s"], "item_key": ["i0", "i1"], "title": ["T", None],
                                        "description": [None, None], "brand": [None, None],
                                        "categories": [["c"], None], "ingest_run_id": ["r1", "r1"]}), {}),
    "raw_users": (lambda: pd.DataFrame({"source": ["s", "t"], "user_key": ["u0", "u0"], "user_name": ["a", None],
                                        "ingest_run_id": ["r1", "r1"]}), {}),
    "quarantine": (lambda: pd.DataFrame({"source": ["s"], "record": ["{bad json"], "reason": ["unparseable"],
                                         "ingest_run_id": ["r1"]}), {}),
    "items": (items, {}),
    "item_features": (item_features, {}),
    "runs": (runs, {}),
    "item_semantic": (lambda: vectors("item_id", vector=4, text_hash="h", model="m"), {"vector_dims": {"vector": 4}}),
    "user_semantic": (lambda: vectors("user_id", vector=4, text_hash="h", model="m"), {}),
    "item_collab": (lambda: vectors("item_id", vector=3, model_version="v"), {}),
    "user_collab": (lambda: vectors("user_id", vector=3, model_version="v"), {}),
    "item_embeddings": (lambda: vectors("item_id", semantic=4, collaborative=3, sc=2, model_version="v"), {}),
    "user_embeddings": (lambda: vectors("user_id", semantic=4, collaborative=None, sc=2, model_version="v"), {}),
    "item_scid": (lambda: pd.DataFrame({"item_id": [1, 2], "codes": [[1, 2, 3, 0], [1, 2, 3, 1]],
                                        "scid": ["<a_1><b_2><c_3><d_0>", "<a_1><b_2><c_3><d_1>"],
                                        "tokenizer_version": ["t", "t"]}), {}),
    "user_scid": (lambda: pd.DataFrame({"user_id": [1, 2], "codes": [[1, 2, 3], [1, 2, 3]],
                                        "scid": ["<u_a_1><u_b_2><u_c_3>"] * 2, "tokenizer_version": ["t", "t"]}), {}),
    "models": (lambda: pd.DataFrame({"name": ["item_rqvae", "item_rqvae"], "version": ["a", "b"],
                                     "kind": ["tokenizer"] * 2, "path": ["/m/a", "/m/b"], "run_id": ["r1", "r2"],
                                     "created_at": [UTC, UTC], "metrics": ["{}", None], "config_hash": ["h", "h"]}),
               {}),
}


def vectors(id_column: str, **columns) -> pd.DataFrame:
    """Three rows; an int value makes a float32 vector column of that size, None a null column."""
    frame = pd.DataFrame({id_column: [1, 2, 3]})
    for name, value in columns.items():
        if isinstance(value, int):
            frame[name] = [np.full(value, 0.5, "float32")] * 3
        else:
            frame[name] = [value] * 3
    return frame


def failed(report, expectation: str, column: str | None):
    """The one failed outcome of ``expectation`` on ``column``; fails the test when absent."""
    hits = [o for o in report.failures() if o.expectation == expectation and o.column == column]
    assert len(hits) == 1, f"expected {expectation} on {column} to fail; report:\n{report.summary()}"
    return hits[0]


# ---------------------------------------------------------------------------------------------

def test_every_catalog_table_has_a_good_frame_and_every_rule_table_is_in_the_catalog():
    assert set(RULES) <= set(CATALOG)
    assert set(GOOD) == set(CATALOG)


@pytest.mark.parametrize("table", sorted(GOOD))
def test_good_frame_passes(table):
    build, context = GOOD[table]
    df = build()
    report = require_valid(table, df, {**context, "expected_row_count": len(df)})
    assert report.success and report.failures() == [] and report.row_count == len(df)
    kinds = {o.expectation for o in report.outcomes}
    assert {"expect_table_columns_to_match_set", "expect_table_row_count_to_equal"} <= kinds
    assert len(report.outcomes) > 2 + sum(not f.nullable for f in CATALOG[table].schema)  # table rules ran too
    assert report.summary().startswith(f"{table}: PASS")
    pd.testing.assert_frame_equal(df, build())  # derived columns and list lengths never leak into the input


@pytest.mark.parametrize("table", sorted(GOOD))
def test_good_frame_passes_as_read_back_from_arrow_and_when_empty(table):
    build, context = GOOD[table]
    as_read = pa.Table.from_pandas(build(), schema=CATALOG[table].schema, preserve_index=False).to_pandas()
    assert validate_table(table, as_read, context).success  # tz-aware timestamps, list cells as numpy arrays
    assert validate_table(table, as_read.iloc[:0], {**context, "expected_row_count": 0}).success


def test_duplicate_compound_key_fails_with_the_key_as_sample():
    df = pd.concat([id_map(), pd.DataFrame({"kind": ["item"], "key": ["i1"], "id": [7]})], ignore_index=True)
    report = validate_table("id_map", df)
    outcome = failed(report, "expect_compound_columns_to_be_unique", "(kind, key)")
    assert outcome.unexpected_count == 2
    assert outcome.sample_values == [{"kind": "item", "key": "i1"}]
    summary = report.summary()
    assert summary.startswith("id_map: FAIL") and "(kind, key): 2 rows with a duplicate (kind, key)" in summary
    assert len(report.failures()) == 1  # (kind, id) is still bijective


def test_duplicate_item_id_fails_with_the_id_as_sample():
    df = items()
    df.loc[1, "item_id"] = 0
    outcome = failed(validate_table("items", df), "expect_column_values_to_be_unique", "item_id")
    assert (outcome.unexpected_count, outcome.sample_values) == (2, [0])


def test_label_outside_the_set_fails():
    df = feedback()
    df.loc[3, "label"] = "loved"
    report = validate_table("feedback", df)
    outcome = failed(report, "expect_column_values_to_be_in_set", "label")
    assert (outcome.unexpected_count, outcome.sample_values) == (1, ["loved"])
    assert "label: 1 value outside {disliked, neutral, liked}" in report.summary()


def test_label_without_labeler_fails_the_derived_check():
    df = feedback()
    df.loc[0, "labeler"] = None
    outcome = failed(validate_table("feedback", df), "expect_column_values_to_be_in_set", "label, labeler")
    assert outcome.sample_values == [{"user_id": 0, "item_id": 0, "label": "liked", "labeler": None}]


def test_test_item_inside_history_fails():
    df = user_features()
    df.at[1, "history"] = [10, 13]  # user 1's test item
    report = validate_table("user_features", df)
    outcome = failed(report, "expect_column_values_to_be_in_set", "test_item, history")
    assert (outcome.unexpected_count, outcome.sample_values) == (1, [{"user_id": 1, "test_item": 13}])
    assert [o.column for o in report.failures()] == ["test_item, history"]


def test_null_history_fails_only_the_not_null_check():
    df = user_features()
    df.at[1, "history"] = None
    report = validate_table("user_features", df)
    assert [(o.expectation, o.column, o.unexpected_count) for o in report.failures()] == [
        ("expect_column_values_to_not_be_null", "history", 1)]


def test_history_len_mismatch_cap_and_equal_targets_fail():
    df = user_features()
    df.at[0, "history"] = [0, 1, 4]
    df.loc[0, "history_len"] = 3
    df.loc[2, "history_len"] = 1
    df.loc[1, "valid_item"] = 13
    report = validate_table("user_features", df, {"max_history": 2})
    assert failed(report, "expect_column_values_to_be_between", "history_len").sample_values == [3]
    mismatch = failed(report, "expect_column_pair_values_to_be_equal", "history_len, history")
    assert mismatch.sample_values == [{"user_id": 2, "history_len": 1, "_history_length": 2}]
    same = failed(report, "expect_column_values_to_be_in_set", "test_item, valid_item")
    assert same.sample_values == [{"user_id": 1, "test_item": 13, "valid_item": 13}]


def test_user_with_two_test_rows_fails():
    df = interactions()
    df.loc[6, "split"] = "test"  # user 1's valid row -> a second test row, and no valid row
    report = validate_table("interactions", df)
    two = [o for o in report.failures() if o.detail.endswith("without exactly 1 test row")]
    assert len(two) == 1 and two[0].expectation == "expect_column_values_to_be_in_set"
    assert (two[0].unexpected_count, two[0].sample_values) == (1, [{"user_id": 1, "_user_test_rows": 2}])
    assert "split (rows per user_id): 1 user without exactly 1 test row" in report.summary()
    order = failed(report, "expect_column_values_to_be_in_set", "split, position")
    assert order.sample_values == [{"user_id": 1, "item_id": 12, "position": 2, "split": "test"}]


def test_user_without_train_rows_and_duplicate_position_fail():
    df = interactions()
    df = df[~((df["user_id"] == 2) & (df["split"] == "train"))]
    df.loc[1, "position"] = 0
    report = validate_table("interactions", df)
    assert failed(report, "expect_column_values_to_be_between", "split (rows per user_id)").sample_values == [
        {"user_id": 2, "_user_train_rows": 0}]
    assert failed(report, "expect_compound_columns_to_be_unique", "(user_id, position)").sample_values == [
        {"user_id": 0, "position": 0}]


def test_heldout_item_in_profile_fails():
    df = users()
    df.at[2, "profile_items"] = [20, 23]  # 23 is user 2's test item
    outcome = failed(validate_table("users", df, {"heldout": heldout()}), "expect_column_values_to_be_in_set",
                     "profile_items")
    assert (outcome.unexpected_count, outcome.sample_values) == (1, [{"user_id": 2}])
    assert validate_table("users", df).success  # without the held-out rows the leak check does not run


def test_sft_example_mentioning_a_heldout_item_or_lacking_the_user_scid_fails():
    df = sft_examples()
    df.at[0, "item_ids"] = [0, 1, 2]  # user 0's train row mentions the valid item 2
    df.at[4, "item_ids"] = [10, 11, 12, 13]  # user 1's valid row mentions the test item 13
    df.loc[6, "prompt"] = "User bought <a_20><b_0><c_0><d_0>. Next?"
    report = validate_table("sft_examples", df, {"heldout": heldout()})
    assert failed(report, "expect_column_values_to_be_in_set", "item_ids (train rows)").sample_values == [
        {"example_id": "seq:0:1", "user_id": 0}]
    assert failed(report, "expect_column_values_to_be_in_set", "item_ids (test items)").sample_values == [
        {"example_id": "seq:1:2", "user_id": 1}]
    assert failed(report, "expect_column_values_to_be_in_set", "prompt (user SCID)").sample_values == [
        {"example_id": "seq:2:1", "task": "seq"}]
    assert len(report.failures()) == 3
    with pytest.raises(ValueError, match="sft_examples.*heldout.*lacks columns \\['split'\\]"):
        validate_table("sft_examples", df, {"heldout": heldout()[["user_id", "item_id"]]})


def test_wrong_row_count_fails_with_the_observed_count():
    report = validate_table("interactions", interactions(), {"expected_row_count": 11})
    outcome = failed(report, "expect_table_row_count_to_equal", None)
    assert outcome.sample_values == [12]
    assert "row count 12, expected 11" in report.summary()
    assert len(report.failures()) == 1


def test_missing_and_extra_columns_fail_and_dependent_rules_are_not_evaluated():
    df = interactions().drop(columns="split").assign(note="x")
    report = validate_table("interactions", df)
    columns = failed(report, "expect_table_columns_to_match_set", None)
    assert sorted(columns.sample_values) == ["note", "split"]
    assert "missing ['split']" in columns.detail and "unexpected ['note']" in columns.detail
    not_evaluated = [o for o in report.failures() if o.unexpected_count is None and "not evaluated" in o.detail]
    assert {o.column for o in not_evaluated} >= {"split", "split (rows per user_id)", "split, position"}


def test_raw_rating_range_and_empty_keys_fail():
    df = raw_interactions()
    df.loc[0, "rating"] = 7.0
    df.loc[1, "user_key"] = "  "
    report = validate_table("raw_interactions", df)
    assert failed(report, "expect_column_values_to_be_between", "rating").sample_values == [7.0]
    assert failed(report, "expect_column_values_to_match_regex", "user_key").sample_values == ["  "]


def test_non_nullable_field_with_null_fails():
    df = runs()
    df.loc[1, "status"] = None
    outcome = failed(validate_table("runs", df), "expect_column_values_to_not_be_null", "status")
    assert outcome.unexpected_count == 1 and "status: 1 value null" == outcome.detail


def test_require_valid_raises_with_the_summary():
    df = item_features()
    df.loc[0, "popularity"] = 1.5
    with pytest.raises(ValidationFailed) as caught:
        require_valid("item_features", df)
    assert str(caught.value) == caught.value.report.summary()
    assert pickle.loads(pickle.dumps(caught.value)).report == caught.value.report  # crosses Ray workers intact
    assert "popularity: 1 value outside [0, 1]" in str(caught.value) and "[1.5]" in str(caught.value)


def test_report_is_json_serialisable():
    df = user_features()
    df.at[0, "history"] = np.array([0, 3])
    report = validate_table("user_features", df)
    assert not report.success
    json.dumps(dataclasses.asdict(report))


def test_results_do_not_carry_over_between_frames():
    bad = interactions()
    bad.loc[0, "split"] = "bogus"
    assert not validate_table("interactions", bad).success
    assert validate_table("interactions", interactions()).success
    assert not validate_table("interactions", bad).success


def test_table_without_registered_rules_gets_the_generic_checks(monkeypatch):
    schema = pa.schema([pa.field("a", pa.int64(), nullable=False), pa.field("b", pa.string())])
    scratch = TableSpec("scratch", "ops", schema)
    monkeypatch.setitem(CATALOG, "scratch", scratch)
    assert validate_table("scratch", pd.DataFrame({"a": [1], "b": [None]})).success
    report = validate_table("scratch", pd.DataFrame({"a": [None, 2.0], "c": ["x", "y"]}))
    assert {(o.expectation, o.column) for o in report.failures()} == {
        ("expect_table_columns_to_match_set", None), ("expect_column_values_to_not_be_null", "a")}


def test_unknown_table_and_context_key_are_named():
    with pytest.raises(UnknownTableError, match="known tables: .*interactions"):
        validate_table("interaction", interactions())
    with pytest.raises(ValueError, match="unknown validation context keys \\['expected_rows'\\]"):
        validate_table("interactions", interactions(), {"expected_rows": 12})
    with pytest.raises(ValueError, match="heldout.*lacks columns \\['item_id'\\]"):
        validate_table("users", users(), {"heldout": heldout()[["user_id"]]})


# --- tokens tables ---------------------------------------------------------------------------

def _scid_frame():
    import pandas as pd

    return pd.DataFrame({"item_id": [1, 2, 3], "codes": [[1, 2, 3, 0], [1, 2, 3, 1], [4, 0, 0, 0]],
                         "scid": ["<a_1><b_2><c_3><d_0>", "<a_1><b_2><c_3><d_1>", "<a_4><b_0><c_0><d_0>"],
                         "tokenizer_version": ["t1"] * 3})


def test_item_scid_good_frame_passes():
    assert validate_table("item_scid", _scid_frame()).success


def test_item_scid_duplicate_and_malformed_scids_fail():
    frame = _scid_frame()
    frame.loc[1, "scid"] = frame.loc[0, "scid"]          # a collision
    frame.loc[2, "scid"] = "<a_4><b_0><c_0>"               # 3 levels where 4 are expected
    report = validate_table("item_scid", frame)
    failed = {o.expectation for o in report.failures()}
    assert "expect_column_values_to_be_unique" in failed
    malformed = [o for o in report.failures() if "scid (4-level item SCID)" == o.column]
    assert malformed and malformed[0].unexpected_count == 2  # row 1: scid != codes; row 2: wrong levels


def test_user_scid_may_repeat_but_must_use_user_tokens():
    import pandas as pd

    frame = pd.DataFrame({"user_id": [1, 2], "codes": [[1, 2, 3], [1, 2, 3]],
                          "scid": ["<u_a_1><u_b_2><u_c_3>"] * 2, "tokenizer_version": ["t"] * 2})
    assert validate_table("user_scid", frame).success
    frame.loc[1, "scid"] = "<a_1><b_2><c_3>"
    assert not validate_table("user_scid", frame).success


def test_vectors_must_be_finite_and_of_the_configured_dimension():
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"item_id": [1, 2, 3], "text_hash": ["h"] * 3, "model": ["m"] * 3,
                          "vector": [np.ones(4, "float32"), np.ones(4, "float32"), np.ones(4, "float32")]})
    assert validate_table("item_semantic", frame, {"vector_dims": {"vector": 4}}).success
    assert not validate_table("item_semantic", frame, {"vector_dims": {"vector": 8}}).success
    frame.at[2, "vector"] = np.array([1, np.nan, 1, 1], "float32")
    report = validate_table("item_semantic", frame)
    assert not report.success and report.failures()[0].unexpected_count == 1


# --- preference_pairs ----------------------------------------------------------------------------

def test_rejected_equal_to_chosen_fails_only_that_rule():
    df = preference_pairs()
    df.at[3, "rejected_items"] = [1, 6]  # rf_easy row
    df.at[3, "rejected"] = ["<a_1><b_1><c_1><d_0>", "<a_1><b_1><c_2><d_0>"]
    report = validate_table("preference_pairs", df, {"n_rejected": 2})
    outcome = failed(report, "expect_column_values_to_be_in_set", "rejected, chosen")
    assert outcome.sample_values == [{"pair_id": "rf_easy:0:3", "chosen_item": 1}]
    assert len(report.failures()) == 1


def test_rejected_outside_the_stage_prefix_bucket_fails():
    df = preference_pairs()
    df.at[1, "rejected"] = ["<a_1><b_2><c_1><d_0>", "<a_1><b_1><c_3><d_0>"]  # sp_medium row; the 2nd is hard
    df.at[2, "rejected"] = ["<a_1><b_1><c_2><d_0>", "<a_2><b_1><c_1><d_0>"]  # sp_hard row; the 2nd is easy
    report = validate_table("preference_pairs", df, {"n_rejected": 2})
    outcome = failed(report, "expect_column_values_to_be_in_set", "rejected (prefix bucket of the sp_* stage)")
    assert outcome.unexpected_count == 2
    assert outcome.sample_values == [{"pair_id": "sp_medium:0:3", "stage": "sp_medium"},
                                     {"pair_id": "sp_hard:0:3", "stage": "sp_hard"}]
    assert len(report.failures()) == 1  # rf rows have no prefix rule


def test_preference_pairs_count_duplicates_sources_and_malformed_scids_fail():
    df = preference_pairs()
    df.at[0, "rejected_items"] = [2, 2]
    df.at[1, "rejected_sources"] = ["generated", "disliked"]  # a real-feedback source on a self-play row
    df.at[4, "chosen"] = "<a_1><b_1><c_1>"
    df.at[4, "rejected"] = ["<a_1><b_2><c_1><d_0>", "<a_3>"]
    report = validate_table("preference_pairs", df, {"n_rejected": 2})
    assert {o.column for o in report.failures()} == {
        "rejected (distinct)", "rejected_sources", "chosen (4-level item SCID)", "rejected (4-level item SCIDs)"}
    counted = validate_table("preference_pairs", preference_pairs())  # default n_rejected = 20
    outcome = failed(counted, "expect_column_values_to_be_in_set", "rejected, rejected_items, rejected_sources")
    assert outcome.unexpected_count == 5 and "without exactly 20 entries in each" in outcome.detail


# --- recommendations -----------------------------------------------------------------------------

def test_recommendations_short_user_unknown_item_wrong_scid_and_rising_score_fail():
    df = recommendations()
    df = df[~((df["user_id"] == 1) & (df["rank"] == 3))]  # user 1 is one row short
    df.loc[1, "item_id"] = 9  # unknown item (its scid still says item 1)
    df.loc[2, "scid"] = ITEM_SCIDS[3]  # item 4 labelled with item 3's SCID
    df.loc[3, "score"] = 0.0  # user 1 rank 1 ...
    df.loc[4, "score"] = 1.0  # ... rank 2 scores higher
    report = validate_table("recommendations", df, RECOMMENDATIONS_CONTEXT)
    assert {o.column for o in report.failures()} == {
        "rank (rows per run_date, user_id)", "item_id (in item_scid)", "scid (of item_id)", "score (by rank)"}
    short = failed(report, "expect_column_values_to_be_in_set", "rank (rows per run_date, user_id)")
    assert short.unexpected_count == 1 and short.sample_values == [{"run_date": "2024-01-02", "user_id": 1}]
    assert "without exactly 3 rows" in short.detail
    unknown = failed(report, "expect_column_values_to_be_in_set", "item_id (in item_scid)")
    assert unknown.sample_values == [{"run_date": "2024-01-02", "user_id": 0, "item_id": 9}]
    rising = failed(report, "expect_column_values_to_be_in_set", "score (by rank)")
    assert rising.sample_values == [{"run_date": "2024-01-02", "user_id": 1, "rank": 2}]


def test_recommendations_duplicate_item_and_rank_outside_top_k_fail():
    df = recommendations()
    df.loc[1, "item_id"], df.loc[1, "scid"] = 2, ITEM_SCIDS[2]  # user 0 gets item 2 twice
    df.loc[5, "rank"] = 4  # user 1: ranks 1, 2, 4
    report = validate_table("recommendations", df, RECOMMENDATIONS_CONTEXT)
    assert {o.column for o in report.failures()} == {"(run_date, user_id, item_id)", "rank"}
    assert failed(report, "expect_compound_columns_to_be_unique", "(run_date, user_id, item_id)").unexpected_count == 2
    # without top_k, a user's rows must still run 1..max(rank): ranks 1, 2, 4 are three rows, not four
    loose = validate_table("recommendations", df.drop(index=1), {})
    assert {o.column for o in loose.failures()} == {"rank (rows per run_date, user_id)"}


# --- eval_metrics --------------------------------------------------------------------------------

def _metric_row(df: pd.DataFrame, model: str, split: str, metric: str, k) -> int:
    k_match = df["k"].isna() if k is None else df["k"].eq(k)
    return df.index[df["model"].eq(model) & df["split"].eq(split) & df["metric"].eq(metric) & k_match][0]


def test_eval_metrics_falling_recall_ndcg_above_recall_and_out_of_range_values_fail():
    df = eval_metrics()
    df.loc[_metric_row(df, "sft", "test", "recall", 10), "value"] = 0.05  # below recall@5 = 0.1
    df.loc[_metric_row(df, "sft", "test", "ndcg", 10), "value"] = 0.04  # still below its recall
    df.loc[_metric_row(df, "popular", "valid", "ndcg", 5), "value"] = 0.03  # above recall@5 = 0.02
    df.loc[_metric_row(df, "popular", "test", "coverage", 10), "value"] = 1.5
    df.loc[_metric_row(df, "sft", "valid", "coverage", 5), "metric"] = "hit_rate"
    report = validate_table("eval_metrics", df)
    assert {o.column for o in report.failures()} == {"recall (by k)", "ndcg (vs recall)", "value", "metric"}
    falls = failed(report, "expect_column_values_to_be_in_set", "recall (by k)")
    assert falls.sample_values == [{"run_id": "evaluate-1", "model": "sft", "split": "test", "metric": "recall",
                                    "k": 10}]
    above = failed(report, "expect_column_values_to_be_in_set", "ndcg (vs recall)")
    assert above.sample_values == [{"run_id": "evaluate-1", "model": "popular", "split": "valid", "metric": "ndcg",
                                    "k": 5}]
    assert failed(report, "expect_column_values_to_be_between", "value").sample_values == [
        {"run_id": "evaluate-1", "model": "popular", "split": "test", "metric": "coverage", "k": 10}]
    assert failed(report, "expect_column_values_to_be_in_set", "metric").sample_values == ["hit_rate"]


def test_eval_metrics_duplicate_key_misplaced_k_bad_split_and_k_zero_fail():
    df = eval_metrics()
    duplicate = df.loc[[_metric_row(df, "sft", "test", "duplicate_rate", None)]]  # a second null-k row of a rate
    df = pd.concat([df, duplicate], ignore_index=True)
    df.loc[_metric_row(df, "popular", "test", "invalid_scid_rate", None), "k"] = 10  # a rate with k
    df.loc[_metric_row(df, "popular", "valid", "coverage", 5), "k"] = 0
    df.loc[df["model"].eq("popular") & df["split"].eq("valid"), "split"] = "train"
    report = validate_table("eval_metrics", df)
    assert {o.column for o in report.failures()} == {"(run_id, model, split, metric, k)", "metric, k", "split", "k"}
    assert failed(report, "expect_column_values_to_be_in_set", "(run_id, model, split, metric, k)"
                  ).unexpected_count == 2
    assert failed(report, "expect_column_values_to_be_in_set", "metric, k").sample_values == [
        {"run_id": "evaluate-1", "model": "popular", "split": "test", "metric": "invalid_scid_rate", "k": 10}]
    assert failed(report, "expect_column_values_to_be_between", "k").sample_values == [0]
