"""The `models` table: registered model artifacts, so a later stage finds the model it needs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from a3gr.config import PipelineConfig
from a3gr.lake import Lake
from a3gr.runs import utcnow


# A model with its own item codes (the TIGER baseline) keeps them in this file, in the `item_scid`
# schema, beside its weights: evaluation ranks over that map instead of the `item_scid` table.
ITEM_CODES_FILE = "item_scid.parquet"


def models_dir(cfg: PipelineConfig) -> Path:
    """Root of model artifacts: tokenize.models_dir, else <lake root>/_models."""
    return Path(cfg.tokenize.models_dir or f"{cfg.lake.root.rstrip('/')}/_models")


def register_model(lake: Lake, name: str, version: str, kind: str, path: str | Path, run_id: str,
                   metrics: dict | None = None, config_hash: str = "") -> None:
    row = {"name": name, "version": version, "kind": kind, "path": str(path), "run_id": run_id,
           "created_at": utcnow(), "metrics": json.dumps(metrics or {}, sort_keys=True, default=float),
           "config_hash": config_hash}
    lake.merge("models", pd.DataFrame([row]), run_id=run_id)


def latest_model(lake: Lake, name: str) -> dict | None:
    """The most recently registered version of a model, or None."""
    if not lake.exists("models"):
        return None
    frame = lake.read_pandas("models")
    frame = frame[frame["name"] == name].sort_values("created_at")
    return None if frame.empty else frame.iloc[-1].to_dict()


def require_model(lake: Lake, name: str, made_by: str) -> dict:
    """latest_model, or a LookupError saying which command registers it."""
    model = latest_model(lake, name)
    if model is None:
        raise LookupError(f"table 'models' has no '{name}' model; run {made_by} first")
    return model
