"""Run records: the `runs` table says what ran, on which input versions, with what result.

A run is appended as 'running' when it starts and updated to succeeded / failed / skipped when
it ends, so a killed run stays visible as 'running' with no end time.
"""
from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import pandas as pd

from a3gr.lake import Lake

STATUSES = ("running", "succeeded", "failed", "skipped")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code (with '+dirty' for local edits), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"align3gr-{version('align3gr')}"


def new_run_id(job: str) -> str:
    return f"{job}-{utcnow().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunRecord:
    run_id: str
    job: str
    config_hash: str
    status: str = "running"
    code_version: str = field(default_factory=code_version)
    started_at: datetime = field(default_factory=utcnow)
    ended_at: datetime | None = None
    duration_s: float | None = None
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    row_counts: dict = field(default_factory=dict)
    message: str = ""
    config: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {"run_id": self.run_id, "job": self.job, "status": self.status, "config_hash": self.config_hash,
                "code_version": self.code_version, "started_at": self.started_at, "ended_at": self.ended_at,
                "duration_s": self.duration_s, "inputs": json.dumps(self.inputs, sort_keys=True),
                "outputs": json.dumps(self.outputs, sort_keys=True),
                "row_counts": json.dumps(self.row_counts, sort_keys=True), "message": self.message,
                "config": json.dumps(self.config, sort_keys=True, default=str)}

    @classmethod
    def from_row(cls, row: dict) -> "RunRecord":
        def ts(v):
            return None if v is None or pd.isna(v) else pd.Timestamp(v).to_pydatetime()

        return cls(run_id=row["run_id"], job=row["job"], status=row["status"], config_hash=row["config_hash"],
                   code_version=row["code_version"], started_at=ts(row["started_at"]),
                   ended_at=ts(row["ended_at"]),
                   duration_s=None if pd.isna(row["duration_s"]) else float(row["duration_s"]),
                   inputs=json.loads(row["inputs"] or "{}"), outputs=json.loads(row["outputs"] or "{}"),
                   row_counts=json.loads(row["row_counts"] or "{}"), message=row["message"] or "",
                   config=json.loads(row["config"] or "{}"))

    def finish(self, status: str, message: str = "") -> "RunRecord":
        assert status in STATUSES, status
        self.status = status
        self.message = message
        self.ended_at = utcnow()
        self.duration_s = (self.ended_at - self.started_at).total_seconds()
        return self


def save_run(lake: Lake, record: RunRecord) -> None:
    """Insert or update the record (merge on run_id, retried if another run commits first)."""
    lake.merge("runs", pd.DataFrame([record.to_row()]), run_id=record.run_id)


def list_runs(lake: Lake, job: str | None = None, limit: int | None = None) -> list[RunRecord]:
    """Runs, newest first."""
    if not lake.exists("runs"):
        return []
    frame = lake.read_pandas("runs")
    if job:
        frame = frame[frame["job"] == job]
    frame = frame.sort_values("started_at", ascending=False)
    if limit:
        frame = frame.head(limit)
    return [RunRecord.from_row(r) for r in frame.to_dict("records")]


def last_succeeded(lake: Lake, job: str) -> RunRecord | None:
    for record in list_runs(lake, job):
        if record.status == "succeeded":
            return record
    return None
