"""Validate a table's frame against its suite with the real GE engine, and report readably.

Every job calls ``require_valid(table, df, context)`` between transform and publish: nothing
is published that failed its suite (write-audit-publish).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.validator.v1_validator import Validator

from expectations import suites

SAMPLE_SIZE = 5
# GE keeps the first N offending rows; a few more than we show, so duplicates of one key
# (every copy is "unexpected") still leave SAMPLE_SIZE distinct values to show.
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 4 * SAMPLE_SIZE}

# One pandas data source, asset and batch definition serve every validation in the process.
# Their execution engine is shared: it holds the loaded frame under one batch id (the same for
# every frame of the asset) and a cache of resolved metrics. So validations are serialised, and
# afterwards both caches are emptied, so no frame stays alive after its validation.
_LOCK = threading.Lock()


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int | None
    sample_values: list = field(default_factory=list)
    detail: str = ""


@dataclass
class ValidationReport:
    table: str
    success: bool
    outcomes: list[ExpectationOutcome]
    row_count: int

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        failed = self.failures()
        lines = [f"{self.table}: {'PASS' if self.success else 'FAIL'} ({self.row_count} rows; "
                 f"{len(self.outcomes) - len(failed)} of {len(self.outcomes)} expectations passed)"]
        for o in failed:
            lines.append(f"  FAILED {o.expectation}: {o.detail}")
            if o.sample_values:
                lines.append(f"    sample: {o.sample_values}")
        return "\n".join(lines)


class ValidationFailed(Exception):
    """A frame failed its table's suite; ``str(e)`` is the report summary."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self):  # survives pickling (Ray, multiprocessing) with its report
        return ValidationFailed, (self.report,)


@lru_cache(maxsize=1)
def _batch_definition():
    """The process-wide GE ephemeral context's whole-dataframe batch definition (slow to create)."""
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    ))
    asset = context.data_sources.add_pandas("a3gr").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


def _release_engine_caches(batch_definition) -> None:
    engine = batch_definition.data_asset.datasource.get_execution_engine()
    engine._metric_cache.clear()  # GE 1.24 has no public way to drop it; holds per-row masks
    engine.batch_manager.batch_data_cache.clear()
    engine.batch_manager.reset_batch_cache()


def validate_table(table: str, df: pd.DataFrame, context: dict | None = None) -> ValidationReport:
    """Run ``table``'s suite on ``df``; never raises for bad data (see ``require_valid``).

    context: ``expected_row_count`` (int), ``heldout`` (users), ``max_history`` (user_features).
    """
    frame, suite = suites.prepare(table, df, context)
    batch_definition = _batch_definition()
    with _LOCK:
        try:
            # the validator GE's Batch.validate builds, used directly: it loads the frame once
            validator = Validator(batch_definition, _RESULT_FORMAT, batch_parameters={"dataframe": frame})
            result = validator.validate_expectation_suite(suite)
        finally:
            _release_engine_caches(batch_definition)
    ordered = sorted(result.results, key=lambda r: r.expectation_config.meta["a3gr"]["order"])
    outcomes = [_outcome(r, frame) for r in ordered]
    return ValidationReport(table=table, success=all(o.success for o in outcomes), outcomes=outcomes,
                            row_count=len(df))


def require_valid(table: str, df: pd.DataFrame, context: dict | None = None) -> ValidationReport:
    """``validate_table``, raising ``ValidationFailed`` when any expectation failed."""
    report = validate_table(table, df, context)
    if not report.success:
        raise ValidationFailed(report)
    return report


# ---------------------------------------------------------------------------------------------

def _outcome(result, frame: pd.DataFrame) -> ExpectationOutcome:
    config = result.expectation_config
    meta = config.meta["a3gr"]
    kind = config.type
    res = result.result or {}
    label = meta["columns"]
    exception = (result.exception_info or {})
    if not exception.get("raised_exception"):
        # a failed metric is reported per metric id: {id: {"raised_exception": ..., ...}}
        exception = next((v for v in exception.values() if isinstance(v, dict) and v.get("raised_exception")), {})
    if exception.get("raised_exception") or meta.get("not_evaluated"):
        reason = meta.get("not_evaluated") or f"not evaluated: {exception.get('exception_message')}"
        return ExpectationOutcome(kind, label, False, None, [], f"{label}: {reason}")

    if kind == "expect_table_columns_to_match_set":
        mismatch = (res.get("details") or {}).get("mismatched") or {}
        missing, extra = list(mismatch.get("missing") or []), list(mismatch.get("unexpected") or [])
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        detail = f"table columns differ from the catalog schema: {'; '.join(parts)}" if parts else "columns match"
        return ExpectationOutcome(kind, label, result.success, len(missing) + len(extra),
                                  _json(missing + extra), detail)
    if kind == "expect_table_row_count_to_equal":
        observed = res.get("observed_value")
        return ExpectationOutcome(kind, label, result.success, None, [] if result.success else [_json(observed)],
                                  f"row count {observed}, expected {config.kwargs['value']} (run record)")

    count = res.get("unexpected_count")
    count = None if count is None else int(count)
    samples = [] if result.success else _samples(res, frame, meta["report"])
    noun = meta["noun"] if count == 1 else meta["noun"] + "s"
    return ExpectationOutcome(kind, label, result.success, count, samples,
                              f"{label}: {count} {noun} {meta['phrase']}")


def _samples(res: dict, frame: pd.DataFrame, report: list[str]) -> list:
    """Up to SAMPLE_SIZE distinct offending values (or identifying rows, for derived checks)."""
    if report:
        rows = frame.loc[res.get("partial_unexpected_index_list") or [], report]
        values = [{k: _json(v) for k, v in rec.items()} for rec in rows.to_dict("records")]
    else:
        values = [_json(v) for v in res.get("partial_unexpected_list") or []]
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
        if len(distinct) == SAMPLE_SIZE:
            break
    return distinct


def _json(value):
    """A JSON-able copy of a value GE or pandas returned."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT or value is pd.NA or value is None:
        return None
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
