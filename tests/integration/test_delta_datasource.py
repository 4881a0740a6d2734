"""The Spark -> delta-rs data source: one transaction per job, schema enforced, protocol (1,2)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from a3gr import catalog
from a3gr.catalog import TableSpec
from a3gr.lake import Lake, SchemaMismatchError
from a3gr.spark_delta import read_df, write_df

pytestmark = pytest.mark.integration

RAW_DDL = ("source string, user_key string, item_key string, ts timestamp, position long, rating double, "
           "review_text string, summary string, ingest_run_id string")


def raw_rows(n: int, run: str = "r1"):
    return [("src", f"u{i % 7}", f"i{i}", None, i, float(1 + i % 5), f"text {i}", None, run) for i in range(n)]


def data_files(table_dir: str) -> set[str]:
    return {str(p.relative_to(table_dir)) for p in Path(table_dir).rglob("*.parquet")}


def test_write_commits_one_version_readable_by_delta_rs_and_spark(spark, lake_root):
    lake = Lake(lake_root)
    df = spark.createDataFrame(raw_rows(50), RAW_DDL).repartition(3)
    version = write_df(df, lake, "raw_interactions", run_id="r1")
    assert version == 0
    table = lake.table("raw_interactions")
    assert len(table.file_uris()) == 3  # three tasks, three files, one commit
    assert lake.protocol("raw_interactions") == (1, 2)
    assert sorted(lake.read_pandas("raw_interactions")["item_key"]) == sorted(f"i{i}" for i in range(50))
    back = read_df(spark, lake, "raw_interactions")
    assert back.count() == 50
    assert back.schema.fieldNames() == catalog.spec("raw_interactions").schema.names
    assert table.history(1)[0]["run_id"] == "r1"


def test_overwrite_append_and_time_travel(spark, lake_root):
    lake = Lake(lake_root)
    write_df(spark.createDataFrame(raw_rows(10), RAW_DDL), lake, "raw_interactions")
    write_df(spark.createDataFrame(raw_rows(4, "r2"), RAW_DDL), lake, "raw_interactions", mode="append")
    assert lake.version("raw_interactions") == 1
    assert read_df(spark, lake, "raw_interactions").count() == 14
    write_df(spark.createDataFrame(raw_rows(3, "r3"), RAW_DDL), lake, "raw_interactions")
    assert read_df(spark, lake, "raw_interactions").count() == 3
    assert read_df(spark, lake, "raw_interactions", version=0).count() == 10
    assert read_df(spark, lake, "raw_interactions", version=1).count() == 14


@pytest.mark.parametrize("bad, message", [
    ("select source, user_key, item_key, ts, position, rating, review_text, ingest_run_id from t",
     "missing columns ['summary']"),
    ("select source, cast(null as string) as user_key, item_key, ts, position, rating, review_text, summary, "
     "ingest_run_id from t", "'user_key' is not nullable"),
    ("select source, user_key, item_key, ts, position, 'five' as rating, review_text, summary, ingest_run_id "
     "from t", "'rating' has type"),
])
def test_schema_violation_fails_the_job_and_leaves_the_table_and_its_files_untouched(spark, lake_root, bad,
                                                                                    message):
    lake = Lake(lake_root)
    write_df(spark.createDataFrame(raw_rows(20), RAW_DDL), lake, "raw_interactions")
    files_before = data_files(lake.uri("raw_interactions"))
    spark.createDataFrame(raw_rows(30, "bad"), RAW_DDL).createOrReplaceTempView("t")
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_df(spark.sql(bad), lake, "raw_interactions", run_id="bad")
    assert lake.version("raw_interactions") == 0
    assert data_files(lake.uri("raw_interactions")) == files_before
    assert len(lake.read_pandas("raw_interactions")) == 20


def test_partition_overwrite_replaces_only_that_partition(spark, lake_root, monkeypatch):
    schema = pa.schema([pa.field("run_date", pa.string(), False), pa.field("user_id", pa.int64(), False),
                        pa.field("score", pa.float64(), True)])
    monkeypatch.setitem(catalog.CATALOG, "scores_by_day",
                        TableSpec("scores_by_day", "serve", schema, ("run_date", "user_id"), ("run_date",)))
    lake = Lake(lake_root)
    ddl = "run_date string, user_id long, score double"
    write_df(spark.createDataFrame([("2026-12-04", i, 1.0) for i in range(5)], ddl), lake, "scores_by_day",
             replace_partition={"run_date": "2026-12-04"})
    write_df(spark.createDataFrame([("2026-12-05", i, 2.0) for i in range(3)], ddl), lake, "scores_by_day",
             replace_partition={"run_date": "2026-12-05"})
    write_df(spark.createDataFrame([("2026-12-05", i, 3.0) for i in range(4)], ddl), lake, "scores_by_day",
             replace_partition={"run_date": "2026-12-05"})
    frame = read_df(spark, lake, "scores_by_day").toPandas()
    counts = frame.groupby("run_date")["score"].agg(["count", "max"]).to_dict("index")
    assert counts == {"2026-12-04": {"count": 5, "max": 1.0}, "2026-12-05": {"count": 4, "max": 3.0}}
    assert lake.protocol("scores_by_day") == (1, 2)


def test_killed_before_commit_leaves_previous_version_readable(lake_root, tmp_path):
    """A job killed (SIGKILL) after its tasks wrote their files but before the commit publishes nothing."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from a3gr.config import PipelineConfig
        from a3gr.lake import Lake
        from a3gr.spark import get_spark
        from a3gr.spark_delta import write_df
        cfg = PipelineConfig(); cfg.spark.shuffle_partitions = 2
        spark = get_spark(cfg)
        lake = Lake({lake_root!r})
        ddl = {RAW_DDL!r}
        rows = lambda n, run: [("src", f"u{{i}}", f"i{{i}}", None, i, 4.0, None, None, run) for i in range(n)]
        write_df(spark.createDataFrame(rows(25, "good"), ddl), lake, "raw_interactions")
        write_df(spark.createDataFrame(rows(4000, "killed"), ddl).repartition(4), lake, "raw_interactions",
                 run_id="doomed")
        print("NOT REACHED")
    """))
    marker = tmp_path / "at-commit"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), A3GR_FAILPOINT_MARKER=str(marker),
               A3GR_FAILPOINT="pause_before_delta_commit:doomed")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "no commit within 240 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: Python driver, JVM and Python workers
        output = proc.communicate()[0]
    assert "NOT REACHED" not in output
    lake = Lake(lake_root)
    assert lake.version("raw_interactions") == 0
    frame = lake.read_pandas("raw_interactions")
    assert len(frame) == 25 and set(frame["ingest_run_id"]) == {"good"}
    # The killed job's files exist on disk but no version references them.
    referenced = {Path(u).name for u in lake.table("raw_interactions").file_uris()}
    on_disk = {Path(p).name for p in data_files(lake.uri("raw_interactions"))}
    assert referenced < on_disk


def test_concurrent_merges_are_retried_and_lose_nothing(lake_root):
    from a3gr.runs import RunRecord, list_runs, save_run

    lake = Lake(lake_root)
    save_run(lake, RunRecord(run_id="seed", job="t", config_hash="h"))
    errors = []

    def worker(k: int):
        try:
            for j in range(3):
                save_run(lake, RunRecord(run_id=f"w{k}-{j}", job="t", config_hash="h"))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = sorted(r.run_id for r in list_runs(lake))
    assert ids == sorted(["seed"] + [f"w{k}-{j}" for k in range(4) for j in range(3)])


def test_lake_write_arrow_enforces_schema(lake_root):
    lake = Lake(lake_root)
    good = pd.DataFrame({"kind": ["user", "item"], "key": ["a", "b"], "id": [0, 0]})
    assert lake.write_arrow("id_map", good) == 0
    with pytest.raises(SchemaMismatchError, match="'id'"):
        lake.write_arrow("id_map", good.drop(columns=["id"]))
    assert lake.version("id_map") == 0
