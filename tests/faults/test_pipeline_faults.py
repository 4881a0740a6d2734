"""Kill, re-run, compare: the ETL pipeline under kills, concurrent runs, an unwritable or full lake, bad config.

Covered elsewhere and not repeated here: a Delta commit killed in a bare Spark job
(tests/integration/test_delta_datasource.py), SFT killed after a checkpoint and a damaged
checkpoint (tests/test_training.py), inference killed mid-night (tests/test_infer.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pyspark import cloudpickle
from typer.testing import CliRunner

from a3gr.cli import app
from a3gr.lake import Lake
from a3gr.locks import LakeNotWritableError, lock_path
from a3gr.pipeline import ETL_STAGES, STAGES, run_pipeline
from a3gr.runs import list_runs
from a3gr.spark_delta import register
from a3gr.validation import validate_stored
from faults import helpers
from faults.helpers import ROOT, cli_args, table_contents, tiny_config
from integration.test_delta_datasource import data_files

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ETL_TABLES = [t for stage in ETL_STAGES for t in STAGES[stage][2]]
# `a3gr` with the interactions job's run id fixed in advance, so the commit failpoint can name it.
CLI_WITH_KNOWN_RUN_ID = """
import sys
import a3gr.jobs
new_run_id = a3gr.jobs.new_run_id
a3gr.jobs.new_run_id = lambda job: "interactions-faulted" if job == "interactions" else new_run_id(job)
from a3gr.cli import app
app(sys.argv[1:], prog_name="a3gr")
"""


def _env(**failpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A3GR_FAILPOINT")}
    return env | {"PYTHONPATH": str(ROOT)} | failpoint


def _start(code: list[str], env: dict) -> subprocess.Popen:
    # Its own session, so a kill takes the Spark JVM and its Python workers with it.
    return subprocess.Popen([sys.executable, *code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(spark, tmp_path_factory):
    """The ETL run once without faults: the tables every faulted run must end with."""
    cfg = tiny_config(tmp_path_factory.mktemp("clean") / "lake")
    records = run_pipeline(cfg, list(ETL_STAGES))
    assert [r.status for r in records] == ["succeeded"] * len(ETL_STAGES)
    lake = Lake.from_config(cfg)
    return cfg, lake, {t: table_contents(lake, t) for t in ETL_TABLES}


def test_concurrent_runs_then_kills_inside_and_between_stages_end_with_the_uninterrupted_tables(
        request, spark, tmp_path):
    root = tmp_path / "lake"
    cfg = tiny_config(root)
    lake = Lake.from_config(cfg)

    # 1. Two runs started at once on one lake: one takes the lock, the other fails at once naming it.
    #    The one that runs is then killed (SIGKILL, whole process group) inside the interactions
    #    job's Delta commit, after its tasks wrote their files.
    marker = tmp_path / "at-commit"
    env = _env(A3GR_FAILPOINT="pause_before_delta_commit:interactions-faulted", A3GR_FAILPOINT_MARKER=str(marker))
    launcher = tmp_path / "a3gr_known_run_id.py"  # a script file: under `python -c` the Spark jobs exit early
    launcher.write_text(CLI_WITH_KNOWN_RUN_ID)
    runs = [_start([str(launcher), "etl", "all", *cli_args(root)], env) for _ in range(2)]
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and not all(p.poll() is not None for p in runs):
            if marker.exists() and any(p.poll() is not None for p in runs):
                break
            time.sleep(0.2)
    finally:
        for p in runs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    outputs = [p.communicate()[0] for p in runs]
    assert marker.exists(), "\n-----\n".join(o[-4000:] for o in outputs)
    winner = next((p for p in runs if p.returncode == -signal.SIGKILL), runs[0])
    loser = runs[1 - runs.index(winner)]
    loser_output = outputs[runs.index(loser)]
    assert loser.returncode != 0
    assert "is locked by another pipeline run" in loser_output, loser_output[-3000:]
    assert str(lock_path(str(root))) in loser_output and f"pid {winner.pid} " in loser_output
    assert winner.returncode == -signal.SIGKILL, outputs
    assert lake.versions(["raw_interactions", "id_map", "interactions"]) == {
        "raw_interactions": 0, "id_map": None, "interactions": None}  # ingest committed; the killed job nothing
    killed = {r.run_id: r for r in list_runs(lake)}["interactions-faulted"]
    assert killed.status == "running" and killed.ended_at is None
    assert len(list_runs(lake)) == 2  # the winner's ingest and its killed job; the loser recorded nothing

    # 2. A re-run is killed between two stages: right after feedback, before features.
    rerun = subprocess.run([sys.executable, "-m", "a3gr", "etl", "all", *cli_args(root)], cwd=ROOT,
                           env=_env(A3GR_FAILPOINT="kill_after_stage:feedback"), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == -signal.SIGKILL, rerun.stderr[-3000:]
    assert lake.versions(["id_map", "interactions", "feedback", "items"]) == {
        "id_map": 0, "interactions": 0, "feedback": 0, "items": None}

    # 3. The last re-run resumes at features (earlier stages are up to date) and ends where the
    #    uninterrupted run ended: same rows, none lost or duplicated, every table valid.
    _, _, expected = request.getfixturevalue("uninterrupted")
    records = run_pipeline(cfg, list(ETL_STAGES))
    assert [(r.job, r.status) for r in records] == [
        ("ingest", "skipped"), ("interactions", "skipped"), ("feedback", "skipped"), ("features", "succeeded")]
    for table in ETL_TABLES:
        pd.testing.assert_frame_equal(table_contents(lake, table), expected[table], obj=table)
        assert validate_stored(lake, cfg, table).success, table
    newest = {}
    for r in sorted(list_runs(lake), key=lambda r: r.started_at):
        if r.status == "succeeded":
            newest.update(r.outputs)
    assert lake.versions(ETL_TABLES) == {t: newest[t] for t in ETL_TABLES}  # every table at its recorded version


@pytest.fixture
def full_disk(spark):
    """While active, every `a3gr_delta` write in the session finds the disk full mid-write."""
    cloudpickle.register_pickle_by_value(helpers)  # Spark's Python workers cannot import the tests
    spark.dataSource.register(helpers.FullDiskDataSource)
    yield
    register(spark)
    cloudpickle.unregister_pickle_by_value(helpers)


def test_a_full_disk_mid_write_fails_the_job_naming_the_table_and_keeps_the_previous_version(
        uninterrupted, spark, full_disk, tmp_path):
    from etl import feedback

    clean_cfg, _, expected = uninterrupted
    root = tmp_path / "lake"
    shutil.copytree(clean_cfg.lake.root, root)
    # another label threshold: new rows to write (identical rows would not be re-committed at all)
    cfg = tiny_config(root, "etl.neutral_max_rating=2.0")
    lake = Lake.from_config(cfg)
    files_before = data_files(lake.uri("feedback"))
    with pytest.raises(Exception, match="No space left on device") as err:
        feedback.run(cfg, spark=spark, force=True)
    assert lake.uri("feedback") in str(err.value)
    failed = list_runs(lake, "feedback")[0]
    assert failed.status == "failed" and "No space left on device" in failed.message
    assert lake.uri("feedback") in failed.message
    assert lake.version("feedback") == 0  # nothing half-written: same version, same files, same rows
    assert data_files(lake.uri("feedback")) == files_before
    pd.testing.assert_frame_equal(table_contents(lake, "feedback"), expected["feedback"])


def _unwritable_root(tmp_path: Path) -> Path:
    """A lake root that cannot be written, for root too (which ignores directory permissions)."""
    if os.geteuid() != 0:
        directory = tmp_path / "readonly"
        directory.mkdir()
        directory.chmod(0o555)
        return directory / "lake"
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    return not_a_directory / "lake"


def test_an_unwritable_lake_root_fails_before_any_stage_naming_the_root(tmp_path):
    root = _unwritable_root(tmp_path)
    try:
        with pytest.raises(LakeNotWritableError, match="is not writable") as err:
            run_pipeline(tiny_config(root), list(ETL_STAGES))
        assert str(root) in str(err.value) and str(lock_path(str(root))) in str(err.value)
        assert not root.exists()
    finally:
        if root.parent.is_dir():
            root.parent.chmod(0o755)


def test_object_store_roots_take_no_lock_and_say_so(caplog):
    from a3gr.locks import pipeline_lock

    with pipeline_lock("s3://bucket/lake") as held:
        assert held is None
    assert "no pipeline lock" in caplog.text and "s3://bucket/lake" in caplog.text


def test_a_mistyped_config_key_is_rejected_by_the_cli_naming_the_closest_key(tmp_path):
    result = CliRunner().invoke(app, ["pipeline", "run", "--set", f"lake.root={tmp_path / 'lake'}",
                                      "--set", "etl.k_cor=5"])
    assert result.exit_code == 2
    assert "unknown config key 'etl.k_cor'; did you mean 'etl.k_core'?" in result.output
    assert not (tmp_path / "lake").exists()  # rejected before anything ran
