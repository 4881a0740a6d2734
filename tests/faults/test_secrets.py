"""A storage secret taken from the environment never reaches run records, logs, saved configs or lake files."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from a3gr.config import config_to_dict
from a3gr.lake import Lake
from a3gr.pipeline import run_pipeline
from faults.helpers import tiny_config

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SENTINEL = "a3gr-sentinel-7f3d9c1e"  # pragma: allowlist secret
# Set when the module is collected, before the session's Spark JVM starts: its Python workers resolve
# storage options from the environment they inherit, as executors do on a cluster.
os.environ.setdefault("A3GR_TEST_SECRET_KEY", SENTINEL)


def test_a_storage_secret_stays_in_the_environment(spark, tmp_path, caplog):
    cfg = tiny_config(tmp_path / "lake", 'lake.storage_options_env={"aws_secret_access_key": "A3GR_TEST_SECRET_KEY"}')
    assert Lake.from_config(cfg).storage_options == {"aws_secret_access_key": SENTINEL}  # it is really used
    with caplog.at_level(logging.DEBUG):
        record = run_pipeline(cfg, ["ingest"])[0]
    assert record.status == "succeeded"

    lake = Lake.from_config(cfg)
    runs = lake.read_pandas("runs")
    assert len(runs) == 1 and SENTINEL not in runs.to_json()
    assert record.config["lake"]["storage_options_env"] == {
        "aws_secret_access_key": "A3GR_TEST_SECRET_KEY"}  # pragma: allowlist secret (an env var name)
    assert SENTINEL not in json.dumps(config_to_dict(cfg))
    assert SENTINEL not in caplog.text
    leaked = [p for p in Path(tmp_path).rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert leaked == []  # Delta logs, data files, the lock file, generated raw files
