"""One great-expectations suite per catalog table.

A suite is built from two parts:

* the generic rules every table gets from its catalog schema: the column names match the
  schema exactly, non-nullable fields hold no nulls, and (when the run record gives it) the
  row count equals the expected count;
* the table's own rules, registered in ``RULES``. A rule that cannot be stated on the raw
  columns (per-user counts, "item not in a list column", ...) is a ``DerivedCheck``: a small
  pure pandas function adds one check column (named ``_...``) to the frame, and an ordinary GE
  expectation checks that column, so the GE engine still evaluates every rule.

Every expectation carries ``meta["a3gr"]``: the readable column label, how to phrase its
violation, and for derived checks which columns identify an offending row. The runner turns
that into one sentence per expectation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import great_expectations as gx
import numpy as np
import pandas as pd
import pyarrow as pa
from great_expectations.expectations.expectation import Expectation

from a3gr.catalog import TableSpec, spec

SPLITS = ("train", "valid", "test")
FEEDBACK_LABELS = ("disliked", "neutral", "liked")
LABELERS = ("rating", "vader")
RUN_STATUSES = ("running", "succeeded", "failed", "skipped")
EVAL_AT_K_METRICS = ("recall", "ndcg", "coverage")  # eval_metrics rows with k set
EVAL_RATE_METRICS = ("duplicate_rate", "invalid_scid_rate")  # eval_metrics rows with k null
EVAL_SPLITS = ("valid", "test")
DEFAULT_MAX_HISTORY = 20
CONTEXT_KEYS = {
    "expected_row_count": "rows the run record says were written (row-count reconciliation)",
    "heldout": "users, sft_examples: DataFrame(user_id, item_id, split) of the valid/test rows, for the leakage "
               "checks (users needs no split)",
    "max_history": f"user_features only: history cap (default {DEFAULT_MAX_HISTORY})",
    "vector_dims": "vector tables: {column: configured dimension}; default: all rows share one length",
    "scid_levels": "item_scid / user_scid / sft_examples: number of code levels (default 4 for items, 3 for users)",
    "n_rejected": "preference_pairs only: rejected items per row (default 20)",
    "top_k": "recommendations only: rows per (run_date, user_id); default: each user's highest rank",
    "item_ids": "recommendations only: array of the valid item ids (item_scid.item_id)",
    "item_scids": "recommendations only: array of the SCIDs of item_ids, same order (each row's scid must match)",
}


# ---------------------------------------------------------------------------------------------
# Expectation builders: each returns a GE expectation that knows how to phrase its violation.

def _meta(columns: str | None, noun: str, phrase: str, report: tuple[str, ...] = ()) -> dict:
    return {"a3gr": {"columns": columns, "noun": noun, "phrase": phrase, "report": list(report)}}


def columns_match(names: list[str]) -> Expectation:
    return gx.expectations.ExpectTableColumnsToMatchSet(
        column_set=names, exact_match=True, meta=_meta(None, "column", "differing from the catalog schema"))


def row_count_equals(n: int) -> Expectation:
    return gx.expectations.ExpectTableRowCountToEqual(
        value=int(n), meta=_meta(None, "row", "counted"))


def not_null(column: str) -> Expectation:
    return gx.expectations.ExpectColumnValuesToNotBeNull(column=column, meta=_meta(column, "value", "null"))


def unique(column: str) -> Expectation:
    return gx.expectations.ExpectColumnValuesToBeUnique(
        column=column, meta=_meta(column, "row", "with a duplicate value"))


def unique_together(*columns: str) -> Expectation:
    label = "(" + ", ".join(columns) + ")"
    return gx.expectations.ExpectCompoundColumnsToBeUnique(
        column_list=list(columns), meta=_meta(label, "row", f"with a duplicate {label}"))


def in_set(column: str, values, report: tuple[str, ...] = (), label: str | None = None,
           noun: str = "value", phrase: str | None = None) -> Expectation:
    values = list(values)
    return gx.expectations.ExpectColumnValuesToBeInSet(
        column=column, value_set=values,
        meta=_meta(label or column, noun, phrase or f"outside {{{', '.join(map(str, values))}}}", report))


def between(column: str, min_value=None, max_value=None, report: tuple[str, ...] = (), label: str | None = None,
            noun: str = "value", phrase: str | None = None) -> Expectation:
    lo = "-inf" if min_value is None else min_value
    hi = "inf" if max_value is None else max_value
    return gx.expectations.ExpectColumnValuesToBeBetween(
        column=column, min_value=min_value, max_value=max_value,
        meta=_meta(label or column, noun, phrase or f"outside [{lo}, {hi}]", report))


def non_empty(column: str) -> Expectation:
    """Strings with at least one non-whitespace character (nulls are left to not_null)."""
    return gx.expectations.ExpectColumnValuesToMatchRegex(
        column=column, regex=r"\S", meta=_meta(column, "value", "empty or blank"))


def equal_pair(column_a: str, column_b: str, report: tuple[str, ...], label: str, phrase: str) -> Expectation:
    """Row-wise equality; rows where either side is null are left to the not-null checks."""
    return gx.expectations.ExpectColumnPairValuesToBeEqual(
        column_A=column_a, column_B=column_b, ignore_row_if="either_value_is_missing",
        meta=_meta(label, "row", phrase, report))


# ---------------------------------------------------------------------------------------------
# Derived checks: pure pandas steps that make a cross-row or list rule checkable by GE.

@dataclass(frozen=True)
class DerivedCheck:
    """A rule GE cannot state on raw columns: ``compute`` adds ``column``; ``expectation`` checks it."""

    column: str
    inputs: tuple[str, ...]
    compute: Callable[[pd.DataFrame], pd.Series]
    expectation: Expectation


@dataclass(frozen=True)
class TableRules:
    expectations: list[Expectation] = field(default_factory=list)
    derived: list[DerivedCheck] = field(default_factory=list)


def list_lengths(lists: pd.Series) -> pd.Series:
    """Length of each cell of a list column (list or array cells); null stays null, a non-list cell is -1."""
    return lists.map(lambda v: len(v) if hasattr(v, "__len__") and not isinstance(v, str) else -1,
                     na_action="ignore").astype("Int64")


def flatten_lists(lists: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(row position of each element, the elements) of a list column; null and non-list cells count as empty."""
    lengths = list_lengths(lists).fillna(0).clip(lower=0).to_numpy("int64")
    cells = [np.asarray(v) for v, n in zip(lists.to_numpy(), lengths) if n]
    elements = np.concatenate(cells) if cells else np.empty(0, dtype="int64")
    return np.repeat(np.arange(len(lists)), lengths), elements


def item_in_list(frame: pd.DataFrame, item_column: str, list_column: str) -> pd.Series:
    """Per row: is ``frame[item_column]`` one of the elements of ``frame[list_column]``."""
    rows, elements = flatten_lists(frame[list_column])
    hits = elements == frame[item_column].to_numpy()[rows]
    return pd.Series(np.bincount(rows[hits], minlength=len(frame)) > 0, index=frame.index)


def pairs_in_list(frame: pd.DataFrame, id_column: str, list_column: str, pairs: pd.DataFrame,
                  pair_columns: tuple[str, str]) -> pd.Series:
    """Per row: does any (row's id, list element) pair occur in ``pairs[pair_columns]``."""
    rows, elements = flatten_lists(frame[list_column])
    exploded = pd.DataFrame({"_id": frame[id_column].to_numpy()[rows].astype("int64"),
                             "_element": elements.astype("int64"), "_row": rows})
    keyed = pairs[list(pair_columns)].astype("int64").drop_duplicates().set_axis(["_id", "_element"], axis=1)
    hit_rows = exploded.merge(keyed, on=["_id", "_element"], how="inner")["_row"].to_numpy()
    return pd.Series(np.bincount(hit_rows, minlength=len(frame)) > 0, index=frame.index)


def per_user_on_first_row(frame: pd.DataFrame, per_row: pd.Series, how: str = "sum") -> pd.Series:
    """Aggregate ``per_row`` per user_id, written on each user's first row (null elsewhere).

    One value per user makes the expectation's unexpected_count a count of users, not rows.
    """
    per_user = per_row.groupby(frame["user_id"]).transform(how)
    return per_user.astype("Int64").where(~frame["user_id"].duplicated())


def _split_rows_per_user(split: str, exactly: int | None = None, at_least: int | None = None) -> DerivedCheck:
    column = f"_user_{split}_rows"

    def compute(frame: pd.DataFrame) -> pd.Series:
        return per_user_on_first_row(frame, frame["split"].eq(split).astype("int64"))

    label = "split (rows per user_id)"
    report = ("user_id", column)
    if exactly is not None:
        check = in_set(column, [exactly], report=report, label=label, noun="user",
                       phrase=f"without exactly {exactly} {split} row{'s' if exactly != 1 else ''}")
    else:
        check = between(column, min_value=at_least, report=report, label=label, noun="user",
                        phrase=f"with fewer than {at_least} {split} row{'s' if at_least != 1 else ''}")
    return DerivedCheck(column, ("user_id", "split"), compute, check)


def _heldout_out_of_order(frame: pd.DataFrame) -> pd.Series:
    from_end = frame.groupby("user_id")["position"].rank(method="first", ascending=False)
    return ((frame["split"].eq("test") & from_end.ne(1)) | (frame["split"].eq("valid") & from_end.ne(2))).astype(bool)


def _flag(column: str, inputs: tuple[str, ...], compute: Callable[[pd.DataFrame], pd.Series],
          report: tuple[str, ...], label: str, phrase: str, noun: str = "row") -> DerivedCheck:
    """A boolean violation flag per row that must be False everywhere."""
    return DerivedCheck(column, inputs, compute,
                        in_set(column, [False], report=report, label=label, noun=noun, phrase=phrase))


# ---------------------------------------------------------------------------------------------
# Table rules. Each takes the validation context (see CONTEXT_KEYS).

def _raw_interactions(context: dict) -> TableRules:
    # (source, user_key, item_key) may repeat here: duplicates are removed downstream.
    return TableRules([between("rating", 1, 5), non_empty("user_key"), non_empty("item_key")])


def _raw_items(context: dict) -> TableRules:
    return TableRules([unique_together("source", "item_key"), non_empty("item_key")])


def _raw_users(context: dict) -> TableRules:
    return TableRules([unique_together("source", "user_key"), non_empty("user_key")])


def _quarantine(context: dict) -> TableRules:
    return TableRules([non_empty("reason")])


def _id_map(context: dict) -> TableRules:
    return TableRules([
        in_set("kind", ["user", "item"]),
        unique_together("kind", "key"),
        unique_together("kind", "id"),
        between("id", min_value=0),
    ])


def _interactions(context: dict) -> TableRules:
    return TableRules(
        [
            unique_together("user_id", "item_id"),
            unique_together("user_id", "position"),
            in_set("split", SPLITS),
            between("rating", 1, 5),
        ],
        [
            _split_rows_per_user("valid", exactly=1),
            _split_rows_per_user("test", exactly=1),
            _split_rows_per_user("train", at_least=1),
            _flag("_heldout_out_of_order", ("user_id", "position", "split"), _heldout_out_of_order,
                  report=("user_id", "item_id", "position", "split"), label="split, position",
                  phrase="where the test row is not the user's last position or valid not the second-to-last"),
        ],
    )


def _feedback(context: dict) -> TableRules:
    return TableRules(
        [
            unique_together("user_id", "item_id"),
            in_set("label", FEEDBACK_LABELS),
            in_set("labeler", LABELERS),
            between("sentiment", -1, 1),
            between("rating", 1, 5),
            in_set("split", SPLITS),
        ],
        [
            _flag("_label_labeler_nullness_differs", ("label", "labeler"),
                  lambda f: f["label"].isna() != f["labeler"].isna(),
                  report=("user_id", "item_id", "label", "labeler"), label="label, labeler",
                  phrase="where exactly one of label and labeler is null"),
        ],
    )


def _items(context: dict) -> TableRules:
    return TableRules([unique("item_id"), non_empty("text"), in_set("text_source", ["metadata", "reviews", "none"])])


def _users(context: dict) -> TableRules:
    rules = TableRules([unique("user_id"), non_empty("user_key")])
    heldout = context.get("heldout")
    if heldout is not None:
        missing = {"user_id", "item_id"} - set(heldout.columns)
        if missing:
            raise ValueError(f"users: context['heldout'] lacks columns {sorted(missing)}; "
                             "expected a DataFrame with user_id, item_id of the valid/test rows")
        rules.derived.append(_flag(
            "_heldout_in_profile", ("user_id", "profile_items"),
            lambda f: pairs_in_list(f, "user_id", "profile_items", heldout, ("user_id", "item_id")),
            report=("user_id",), label="profile_items", noun="user",
            phrase="whose profile_items contain one of their held-out (valid/test) items"))
    return rules


def _item_features(context: dict) -> TableRules:
    return TableRules([
        unique("item_id"),
        between("n_train", min_value=0),
        between("n_users", min_value=0),
        between("popularity", 0, 1),
        non_empty("text"),
    ])


def _user_features(context: dict) -> TableRules:
    max_history = int(context.get("max_history", DEFAULT_MAX_HISTORY))
    # test_item != valid_item is a derived flag: GE's within-record uniqueness calls Python per row.
    return TableRules(
        [
            unique("user_id"),
            between("history_len", 0, max_history),
        ],
        [
            DerivedCheck("_history_length", ("history",), lambda f: list_lengths(f["history"]),
                         equal_pair("history_len", "_history_length",
                                    report=("user_id", "history_len", "_history_length"),
                                    label="history_len, history", phrase="where history_len != len(history)")),
            _flag("_test_equals_valid", ("test_item", "valid_item"), lambda f: f["test_item"] == f["valid_item"],
                  report=("user_id", "test_item", "valid_item"), label="test_item, valid_item",
                  phrase="where test_item == valid_item"),
            _flag("_test_item_in_history", ("test_item", "history"),
                  lambda f: item_in_list(f, "test_item", "history"),
                  report=("user_id", "test_item"), label="test_item, history",
                  phrase="whose test_item is in history"),
            _flag("_valid_item_in_history", ("valid_item", "history"),
                  lambda f: item_in_list(f, "valid_item", "history"),
                  report=("user_id", "valid_item"), label="valid_item, history",
                  phrase="whose valid_item is in history"),
        ],
    )


def _runs(context: dict) -> TableRules:
    return TableRules([unique("run_id"), in_set("status", RUN_STATUSES)])


def _vector_flag(column: str, dim: int | None) -> DerivedCheck:
    """Each vector is finite and of the configured dimension (else all vectors of one length)."""

    def compute(frame: pd.DataFrame) -> pd.Series:
        lengths = list_lengths(frame[column])
        expected = dim if dim is not None else (int(lengths.mode().iloc[0]) if lengths.notna().any() else 0)
        # Null vectors are left to the not-null checks (the column may be nullable by design).
        not_finite = frame[column].map(lambda v: v is not None and not np.isfinite(np.asarray(v, "float64")).all())
        return (lengths.notna() & ((lengths != expected) | not_finite.astype(bool))).astype(bool)

    label = f"{column} (dimension {dim})" if dim is not None else f"{column} (one dimension)"
    return _flag(f"_{column}_bad_vector", (column,), compute, report=(column,), label=label,
                 phrase="with a wrong dimension or a non-finite value")


def _vector_table(id_column: str, *vector_columns: str):
    def rules(context: dict) -> TableRules:
        dims = context.get("vector_dims", {})
        return TableRules([unique(id_column)], [_vector_flag(c, dims.get(c)) for c in vector_columns])

    return rules


def _scid_table(kind: str, id_column: str, default_levels: int, unique_scid: bool):
    from a3gr.scid import is_valid_scid, parse_scid

    def malformed(frame: pd.DataFrame, levels: int) -> pd.Series:
        def bad(scid, codes) -> bool:
            if not is_valid_scid(scid, kind, levels):
                return True
            return parse_scid(scid, kind) != [int(c) for c in codes]

        return pd.Series([bad(s_, c) for s_, c in zip(frame["scid"], frame["codes"])], index=frame.index, dtype=bool)

    def rules(context: dict) -> TableRules:
        levels = int(context.get("scid_levels", default_levels))
        expectations = [unique(id_column)] + ([unique("scid")] if unique_scid else [])
        return TableRules(expectations, [_flag(
            "_scid_malformed", ("scid", "codes"), lambda f: malformed(f, levels), report=(id_column, "scid"),
            label=f"scid ({levels}-level {kind} SCID)", phrase="malformed or not matching codes")])

    return rules


def _models(context: dict) -> TableRules:
    return TableRules([unique_together("name", "version"), non_empty("path")])


def _sft_examples(context: dict) -> TableRules:
    from a3gr.prompts import ITEM_TASKS, TASKS, USER_ANSWER_TASKS
    from a3gr.scid import is_valid_scid

    levels = int(context.get("scid_levels", 4))
    user_token = r"<u_a_\d+>"

    def scids(frame: pd.DataFrame, kind: str, n_levels: int | None) -> pd.Series:
        return frame["response"].map(lambda r: isinstance(r, str) and is_valid_scid(r, kind, n_levels)).astype(bool)

    def target_not_listed(frame: pd.DataFrame) -> pd.Series:
        target = pd.to_numeric(frame["target_item"], errors="coerce")
        listed = item_in_list(frame.assign(_target=target.fillna(-1).astype("int64")), "_target", "item_ids")
        return (target.notna() & ~listed).astype(bool)

    report = ("example_id", "task")
    rules = TableRules(
        [unique("example_id"), in_set("task", TASKS), in_set("split", ["train", "valid"]),
         non_empty("prompt"), non_empty("response")],
        [
            _flag("_prompt_without_user_scid", ("task", "prompt"),
                  lambda f: ~f["task"].isin(USER_ANSWER_TASKS)
                  & ~f["prompt"].str.contains(user_token, regex=True, na=False).astype(bool),
                  report=report, label="prompt (user SCID)", phrase="without a user SCID token"),
            _flag("_response_not_item_scid", ("task", "response"),
                  lambda f: f["task"].isin(ITEM_TASKS) & ~scids(f, "item", levels),
                  report=report + ("response",), label=f"response ({levels}-level item SCID)",
                  phrase="of an item-predicting task that is not exactly one item SCID"),
            _flag("_user_answer_malformed_or_in_prompt", ("task", "prompt", "response"),
                  lambda f: f["task"].isin(USER_ANSWER_TASKS) & (~scids(f, "user", None) | pd.Series(
                      [isinstance(r, str) and isinstance(p, str) and r in p
                       for p, r in zip(f["prompt"], f["response"])], index=f.index, dtype=bool)),
                  report=report + ("response",), label="response (user SCID)",
                  phrase="whose answer is not a user SCID or is given away in the prompt"),
            _flag("_target_not_in_item_ids", ("target_item", "item_ids"), target_not_listed,
                  report=report + ("target_item",), label="target_item, item_ids",
                  phrase="whose target_item is not in item_ids"),
            _flag("_valid_row_not_seq", ("task", "split"), lambda f: f["split"].eq("valid") & f["task"].ne("seq"),
                  report=report, label="split, task", phrase="with split 'valid' and a task other than seq"),
        ],
    )
    heldout = context.get("heldout")
    if heldout is not None:
        missing = {"user_id", "item_id", "split"} - set(heldout.columns)
        if missing:
            raise ValueError(f"sft_examples: context['heldout'] lacks columns {sorted(missing)}; "
                             "expected a DataFrame with user_id, item_id, split of the valid/test rows")
        test = heldout[heldout["split"] == "test"]
        rules.derived.extend([
            _flag("_heldout_item_in_train_row", ("user_id", "split", "item_ids"),
                  lambda f: f["split"].eq("train")
                  & pairs_in_list(f, "user_id", "item_ids", heldout, ("user_id", "item_id")),
                  report=("example_id", "user_id"), label="item_ids (train rows)",
                  phrase="of split 'train' that mention one of their user's valid/test items"),
            _flag("_test_item_in_row", ("user_id", "item_ids"),
                  lambda f: pairs_in_list(f, "user_id", "item_ids", test, ("user_id", "item_id")),
                  report=("example_id", "user_id"), label="item_ids (test items)",
                  phrase="that mention their user's test item"),
        ])
    return rules


PREFERENCE_STAGES = ("sp_easy", "sp_medium", "sp_hard", "rf_easy", "rf_hard")
# Self-play buckets by the number of leading RQ-VAE codes (of 3) a rejected SCID shares with the chosen one.
SP_SHARED_PREFIX = {"sp_easy": (0, 0), "sp_medium": (1, 1), "sp_hard": (2, 3)}
STAGE_SOURCES = {**{stage: ("generated", "prefix_fill") for stage in SP_SHARED_PREFIX},
                 "rf_easy": ("disliked", "model_unchosen", "random_fill"),
                 "rf_hard": ("neutral", "model_unchosen", "random_fill")}
DEFAULT_N_REJECTED = 20


def _preference_pairs(context: dict) -> TableRules:
    from a3gr.scid import is_valid_scid, parse_scid

    n_rejected = int(context.get("n_rejected", DEFAULT_N_REJECTED))
    list_columns = ("rejected", "rejected_items", "rejected_sources")

    def rows_with(frame: pd.DataFrame, column: str, bad_element: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        """Rows with at least one element of ``column`` for which ``bad_element(rows, elements)`` holds."""
        rows, elements = flatten_lists(frame[column])
        bad = np.asarray(bad_element(rows, elements), dtype=bool) if len(rows) else np.zeros(0, bool)
        return pd.Series(np.bincount(rows[bad], minlength=len(frame)) > 0, index=frame.index)

    def wrong_count(frame: pd.DataFrame) -> pd.Series:
        wrong = pd.concat([list_lengths(frame[c]).ne(n_rejected) for c in list_columns], axis=1)
        return wrong.fillna(False).any(axis=1).astype(bool)  # null lists are left to the not-null checks

    def has_duplicates(frame: pd.DataFrame) -> pd.Series:
        duplicated = [rows_with(frame, c, lambda r, e: pd.DataFrame({"r": r, "e": e}).duplicated().to_numpy())
                      for c in ("rejected", "rejected_items")]
        return duplicated[0] | duplicated[1]

    def wrong_bucket(frame: pd.DataFrame) -> pd.Series:
        parsed = {}  # SCID -> its 3 RQ-VAE codes, or None when malformed (left to the malformed checks)

        def codes(scid) -> np.ndarray | None:
            if scid not in parsed:
                valid = isinstance(scid, str) and is_valid_scid(scid, "item", 4)
                parsed[scid] = np.asarray(parse_scid(scid, "item")[:3]) if valid else None
            return parsed[scid]

        stages, chosen = frame["stage"].to_numpy(), frame["chosen"].to_numpy()

        def bad(rows: np.ndarray, elements: np.ndarray) -> np.ndarray:
            out = np.zeros(len(rows), bool)
            for k, (row, scid) in enumerate(zip(rows, elements)):
                bounds, mine, theirs = SP_SHARED_PREFIX.get(stages[row]), codes(chosen[row]), codes(scid)
                if bounds is not None and mine is not None and theirs is not None:
                    shared = int(np.cumprod(mine == theirs).sum())
                    out[k] = not bounds[0] <= shared <= bounds[1]
            return out

        return rows_with(frame, "rejected", bad)

    def unknown_source(frame: pd.DataFrame) -> pd.Series:
        stages = frame["stage"].to_numpy()
        return rows_with(frame, "rejected_sources", lambda rows, sources: [
            s not in STAGE_SOURCES.get(stages[r], ()) for r, s in zip(rows, sources)])

    report = ("pair_id",)
    return TableRules(
        [unique("pair_id"), in_set("stage", PREFERENCE_STAGES), non_empty("prompt")],
        [
            _flag("_chosen_malformed", ("chosen",),
                  lambda f: ~f["chosen"].map(lambda s: isinstance(s, str) and is_valid_scid(s, "item", 4)).astype(bool),
                  report=report + ("chosen",), label="chosen (4-level item SCID)", phrase="malformed"),
            _flag("_rejected_malformed", ("rejected",),
                  lambda f: rows_with(f, "rejected", lambda r, e: [not (isinstance(s, str) and is_valid_scid(
                      s, "item", 4)) for s in e]),
                  report=report, label="rejected (4-level item SCIDs)", phrase="with a malformed rejected SCID"),
            _flag("_rejected_count_wrong", list_columns, wrong_count, report=report,
                  label="rejected, rejected_items, rejected_sources",
                  phrase=f"without exactly {n_rejected} entries in each"),
            _flag("_rejected_has_chosen", ("chosen", "chosen_item", "rejected", "rejected_items"),
                  lambda f: item_in_list(f, "chosen", "rejected") | item_in_list(f, "chosen_item", "rejected_items"),
                  report=report + ("chosen_item",), label="rejected, chosen",
                  phrase="whose rejected contain the chosen item"),
            _flag("_rejected_duplicated", ("rejected", "rejected_items"), has_duplicates, report=report,
                  label="rejected (distinct)", phrase="with a repeated rejected item"),
            _flag("_rejected_wrong_bucket", ("stage", "chosen", "rejected"), wrong_bucket, report=report + ("stage",),
                  label="rejected (prefix bucket of the sp_* stage)",
                  phrase="with a rejected SCID whose shared prefix with chosen does not match the stage"),
            _flag("_rejected_source_unknown", ("stage", "rejected_sources"), unknown_source,
                  report=report + ("stage",), label="rejected_sources",
                  phrase="with a source that is not one of the stage's known sources"),
        ],
    )


def _recommendations(context: dict) -> TableRules:
    top_k = context.get("top_k")
    item_ids = context.get("item_ids")
    item_scids = context.get("item_scids")
    night = ["run_date", "user_id"]

    def wrong_count(frame: pd.DataFrame) -> pd.Series:
        """Per (run_date, user): rows != top_k (or != the highest rank), on the user's first row only."""
        groups = frame.groupby(night, sort=False, dropna=False)["rank"]
        expected = top_k if top_k is not None else groups.transform("max")
        wrong = groups.transform("size").ne(expected).astype("boolean")
        return wrong.where(~frame.duplicated(night), False)

    def unknown_item(frame: pd.DataFrame) -> pd.Series:
        return pd.Series(~np.isin(frame["item_id"].to_numpy(), np.asarray(item_ids)), index=frame.index)

    def scid_mismatch(frame: pd.DataFrame) -> pd.Series:
        scid_of = pd.Series(np.asarray(item_scids, dtype=object), index=np.asarray(item_ids))
        expected = frame["item_id"].map(scid_of)
        return (expected.notna() & expected.ne(frame["scid"])).astype(bool)  # unknown items: the rule above

    def score_rises(frame: pd.DataFrame) -> pd.Series:
        ordered = frame.sort_values(night + ["rank"], kind="stable")
        score = ordered["score"].astype("float64")
        previous = score.groupby([ordered[c] for c in night], sort=False, dropna=False).shift()
        return pd.Series(score.to_numpy() > previous.to_numpy(), index=ordered.index).reindex(frame.index)

    report = ("run_date", "user_id")
    derived = [
        _flag("_user_row_count_wrong", ("run_date", "user_id", "rank"), wrong_count, report=report,
              label="rank (rows per run_date, user_id)", noun="user",
              phrase=f"without exactly {top_k if top_k is not None else 'max(rank)'} rows"),
        _flag("_score_not_finite", ("score",), lambda f: ~np.isfinite(f["score"].astype("float64")),
              report=report + ("rank",), label="score", phrase="not finite"),
        _flag("_score_rises_with_rank", ("run_date", "user_id", "rank", "score"), score_rises,
              report=report + ("rank",), label="score (by rank)", phrase="with a higher score than the rank before"),
    ]
    if item_ids is not None:
        derived.append(_flag("_item_unknown", ("item_id",), unknown_item, report=report + ("item_id",),
                             label="item_id (in item_scid)", phrase="whose item is not in item_scid"))
        if item_scids is not None:
            derived.append(_flag("_scid_mismatch", ("item_id", "scid"), scid_mismatch,
                                 report=report + ("item_id", "scid"), label="scid (of item_id)",
                                 phrase="whose scid is not its item's SCID"))
    return TableRules(
        [unique_together("run_date", "user_id", "rank"), unique_together("run_date", "user_id", "item_id"),
         between("rank", 1, top_k, report=report + ("rank",))],
        derived,
    )



def _eval_metrics(context: dict) -> TableRules:
    group = ["run_id", "model", "split"]
    report = ("run_id", "model", "split", "metric", "k")

    def k_misplaced(frame: pd.DataFrame) -> pd.Series:
        k_null = frame["k"].isna()
        return ((frame["metric"].isin(EVAL_AT_K_METRICS) & k_null)
                | (frame["metric"].isin(EVAL_RATE_METRICS) & ~k_null)).astype(bool)

    def duplicate_key(frame: pd.DataFrame) -> pd.Series:
        return frame.duplicated(group + ["metric", "k"], keep=False).astype(bool)  # a null k equals a null k

    def recall_falls(frame: pd.DataFrame) -> pd.Series:
        recall = frame[frame["metric"].eq("recall") & frame["k"].notna()].sort_values(group + ["k"], kind="stable")
        previous = recall.groupby(group, sort=False)["value"].shift()
        return (recall["value"] < previous - 1e-12).reindex(frame.index, fill_value=False).astype(bool)

    def ndcg_above_recall(frame: pd.DataFrame) -> pd.Series:
        keys = group + ["k"]
        recall = (frame.loc[frame["metric"].eq("recall"), keys + ["value"]].drop_duplicates(keys)
                  .rename(columns={"value": "_recall"}))
        ndcg = frame.loc[frame["metric"].eq("ndcg") & frame["k"].notna(), keys + ["value"]]
        paired = ndcg.reset_index().merge(recall, on=keys, how="left").set_index("index")
        return (paired["value"] > paired["_recall"] + 1e-12).reindex(frame.index, fill_value=False).astype(bool)

    return TableRules(
        [in_set("metric", EVAL_AT_K_METRICS + EVAL_RATE_METRICS), in_set("split", EVAL_SPLITS),
         between("value", 0, 1, report=report), between("k", min_value=1), non_empty("run_id"), non_empty("model"),
         non_empty("dataset")],
        [
            _flag("_duplicate_metric", ("run_id", "model", "split", "metric", "k"), duplicate_key, report=report,
                  label="(run_id, model, split, metric, k)", phrase="with a duplicate (run_id, model, split, metric, k)"),
            _flag("_k_misplaced", ("metric", "k"), k_misplaced, report=report, label="metric, k",
                  phrase=f"where k is null for {'/'.join(EVAL_AT_K_METRICS)} or set for a rate"),
            _flag("_recall_falls_with_k", ("run_id", "model", "split", "metric", "k", "value"), recall_falls,
                  report=report, label="recall (by k)", phrase="lower than recall at a smaller k"),
            _flag("_ndcg_above_recall", ("run_id", "model", "split", "metric", "k", "value"), ndcg_above_recall,
                  report=report, label="ndcg (vs recall)", phrase="above recall at the same k"),
        ],
    )


RULES: dict[str, Callable[[dict], TableRules]] = {
    "raw_interactions": _raw_interactions,
    "raw_items": _raw_items,
    "raw_users": _raw_users,
    "quarantine": _quarantine,
    "id_map": _id_map,
    "interactions": _interactions,
    "feedback": _feedback,
    "items": _items,
    "users": _users,
    "item_features": _item_features,
    "user_features": _user_features,
    "runs": _runs,
    "item_semantic": _vector_table("item_id", "vector"),
    "user_semantic": _vector_table("user_id", "vector"),
    "item_collab": _vector_table("item_id", "vector"),
    "user_collab": _vector_table("user_id", "vector"),
    "item_embeddings": _vector_table("item_id", "semantic", "collaborative", "sc"),
    "user_embeddings": _vector_table("user_id", "semantic", "collaborative", "sc"),
    # Item SCIDs are unique by construction (the 4th level); users may share one.
    "item_scid": _scid_table("item", "item_id", 4, unique_scid=True),
    "user_scid": _scid_table("user", "user_id", 3, unique_scid=False),
    "models": _models,
    "sft_examples": _sft_examples,
    "preference_pairs": _preference_pairs,
    "eval_metrics": _eval_metrics,
    "recommendations": _recommendations,
}


# ---------------------------------------------------------------------------------------------

def generic_expectations(table: TableSpec, context: dict, extra_columns: list[str]) -> list[Expectation]:
    """Schema rules every table gets: exact column names, non-nullable fields, optional row count."""
    expectations = [columns_match(table.schema.names + extra_columns)]
    expectations += [not_null(f.name) for f in table.schema if not f.nullable]
    if context.get("expected_row_count") is not None:
        expectations.append(row_count_equals(context["expected_row_count"]))
    return expectations


def _check_context(table: str, context: dict) -> None:
    unknown = set(context) - set(CONTEXT_KEYS)
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in CONTEXT_KEYS.items())
        raise ValueError(f"{table}: unknown validation context keys {sorted(unknown)}; known keys: {known}")


def prepare(table: str, df: pd.DataFrame, context: dict | None = None) -> tuple[pd.DataFrame, gx.ExpectationSuite]:
    """The frame GE validates (``df`` with a fresh 0..n-1 index, derived check columns added and list
    columns as their lengths) and its suite.

    Raises ``UnknownTableError`` (naming the known tables) for a table outside the catalog.
    """
    context = dict(context or {})
    table_spec = spec(table)
    _check_context(table, context)
    rules = RULES[table](context) if table in RULES else TableRules()

    frame = df.reset_index(drop=True)
    derived_expectations, added = [], []
    for check in rules.derived:
        expectation = check.expectation
        missing = [c for c in check.inputs if c not in frame.columns]
        if missing:
            note = f"not evaluated: input column(s) {missing} missing"
        else:
            try:
                frame[check.column] = check.compute(frame)
                added.append(check.column)
                note = None
            except Exception as err:  # bad data must give a failed check, not a crashed job
                note = f"not evaluated: computing {check.column} failed: {type(err).__name__}: {err}"
        if note:
            expectation.meta["a3gr"]["not_evaluated"] = note
        derived_expectations.append(expectation)

    # GE's pandas engine fingerprints every batch by hashing it, and a frame with list cells can
    # only be fingerprinted by pickling it (seconds per 100k rows). Every rule on a list column is
    # a derived check computed above, so GE gets each list column as its cell lengths (nulls kept).
    for f in table_spec.schema:
        if pa.types.is_list(f.type) and f.name in frame.columns:
            frame[f.name] = list_lengths(frame[f.name])

    expectations = generic_expectations(table_spec, context, added) + rules.expectations + derived_expectations
    for order, expectation in enumerate(expectations):
        expectation.meta["a3gr"]["order"] = order
    return frame, gx.ExpectationSuite(name=f"a3gr.{table}", expectations=expectations)


__all__ = ["RULES", "CONTEXT_KEYS", "DerivedCheck", "TableRules", "prepare", "generic_expectations",
           "list_lengths", "flatten_lists", "item_in_list", "pairs_in_list", "per_user_on_first_row"]
