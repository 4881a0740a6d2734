"""The ETL end to end on real Spark + Delta + great-expectations, on the synthetic source."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from a3gr.config import load_config
from a3gr.jobs import JobRun
from a3gr.lake import Lake
from a3gr.pipeline import ETL_STAGES, STAGES, run_pipeline
from a3gr.runs import list_runs
from a3gr.validation import validate_stored

pytestmark = pytest.mark.integration

ETL_TABLES = [t for stage in ETL_STAGES for t in STAGES[stage][2]]


def small_config(root: Path, *extra: str):
    return load_config("configs/embedded.yaml", [f"lake.root={root}", "source.synthetic.n_users=250",
                                                  "source.synthetic.n_items=120", "spark.shuffle_partitions=2",
                                                  *extra])


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("etl") / "lake")
    records = run_pipeline(cfg, list(ETL_STAGES))
    return cfg, Lake.from_config(cfg), records


def test_first_run_writes_every_table_and_each_passes_its_suite(built):
    cfg, lake, records = built
    assert [r.status for r in records] == ["succeeded"] * len(ETL_STAGES)
    for table in ETL_TABLES:
        report = validate_stored(lake, cfg, table)
        assert report.success, report.summary()
        assert report.row_count > 0 or table == "quarantine"
    ingest = records[0].row_counts
    assert ingest["reviews_read"] == ingest["reviews_accepted"] + ingest["reviews_quarantined"]
    inter = lake.read_pandas("interactions")
    assert set(inter.groupby("user_id")["split"].apply(lambda s: tuple(sorted(s.value_counts()[["test", "valid"]])))) \
        == {(1, 1)}


def test_rerun_with_unchanged_input_skips_every_job_and_writes_no_version(built, spark):
    cfg, lake, _ = built
    before = lake.versions(ETL_TABLES)
    records = run_pipeline(cfg, list(ETL_STAGES))
    assert [r.status for r in records] == ["skipped"] * len(ETL_STAGES)
    assert lake.versions(ETL_TABLES) == before


def test_forced_rerun_keeps_ids_and_rows_identical(built, spark):
    cfg, lake, _ = built
    id_map = lake.read_pandas("id_map").sort_values(["kind", "key"]).reset_index(drop=True)
    inter = lake.read_pandas("interactions").sort_values(["user_id", "position"]).reset_index(drop=True)
    run_pipeline(cfg, ["interactions"], forced={"interactions"})
    assert lake.read_pandas("id_map").sort_values(["kind", "key"]).reset_index(drop=True).equals(id_map)
    after = lake.read_pandas("interactions").sort_values(["user_id", "position"]).reset_index(drop=True)
    assert after.equals(inter)


def test_failed_suite_keeps_the_last_good_version_and_records_the_failure(built, spark):
    from expectations.runner import ValidationFailed

    from a3gr.spark_delta import read_df

    cfg, lake, _ = built
    version = lake.version("interactions")
    good = read_df(spark, lake, "interactions")
    bad = good.unionByName(good.limit(3))  # three duplicated (user_id, item_id) keys
    with pytest.raises(ValidationFailed) as err:
        with JobRun("bad-interactions", cfg, force=True) as job:
            job.publish("interactions", bad)
    assert "interactions" in str(err.value) and "user_id" in str(err.value)
    assert lake.version("interactions") == version
    failed = list_runs(lake, "bad-interactions")[0]
    assert failed.status == "failed" and "ValidationFailed" in failed.message


def test_cli_validate_runs_and_tables(built):
    cfg, lake, _ = built
    runner = CliRunner()
    root = f"lake.root={cfg.lake.root}"
    result = runner.invoke(__import__("a3gr.cli", fromlist=["app"]).app, ["validate", "--set", root])
    assert result.exit_code == 0, result.output
    assert "interactions" in result.output
    result = runner.invoke(__import__("a3gr.cli", fromlist=["app"]).app, ["runs", "--set", root])
    assert result.exit_code == 0 and "ingest" in result.output and "skipped" in result.output


def test_corrupted_lines_are_quarantined_exactly_and_no_good_line_is_lost(built, spark, tmp_path):
    """A raw file with a few hundred corrupted lines: exactly those are quarantined, with reasons."""
    cfg, lake, _ = built
    from etl.ingest import source_files

    files = source_files(cfg)
    good_lines = [line for line in Path(files["reviews_path"]).read_text().splitlines() if line.strip()]
    good_keys = {(json.loads(x)["reviewerID"], json.loads(x)["asin"]) for x in good_lines}
    corrupt = []
    for i in range(300):
        kind = i % 6
        if kind == 0:
            corrupt.append('{"reviewerID": "X%d", "asin": ' % i)
        elif kind == 1:
            corrupt.append(json.dumps({"reviewerID": f"X{i}", "overall": 5.0, "unixReviewTime": 1400000000}))
        elif kind == 2:
            corrupt.append(json.dumps({"reviewerID": f"X{i}", "asin": "A1", "overall": 9.0,
                                       "unixReviewTime": 1400000000}))
        elif kind == 3:
            corrupt.append(json.dumps({"reviewerID": f"X{i}", "asin": "A1", "overall": 4.0,
                                       "unixReviewTime": "yesterday"}))
        elif kind == 4:
            corrupt.append(json.dumps({"reviewerID": f"X{i}", "asin": "A1", "overall": 4.0,
                                       "unixReviewTime": 4102444800}))  # 2100-01-01
        else:
            corrupt.append('{"reviewerID": "X%d", "asin": "A1", "overall": NaN, "unixReviewTime": 1400000000}' % i)
    mixed = []
    for i, line in enumerate(good_lines):
        mixed.append(line)
        if i % 10 == 0 and corrupt:
            mixed.append(corrupt.pop())
    mixed.extend(corrupt)
    path = tmp_path / "reviews_dirty.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write("\n".join(mixed) + "\n")
    dirty = load_config(None, [f"lake.root={tmp_path / 'lake'}", "source.kind=amazon",
                               f"source.reviews_path={path}", f"source.meta_path={files['meta_path']}"])
    record = run_pipeline(dirty, ["ingest"])[0]
    dirty_lake = Lake.from_config(dirty)
    quarantine = dirty_lake.read_pandas("quarantine")
    reviews_q = quarantine[quarantine["record"].str.contains('"X')]
    assert len(reviews_q) == 300
    assert reviews_q["reason"].str.len().min() > 0 and reviews_q["reason"].nunique() >= 4
    raw = dirty_lake.read_pandas("raw_interactions")
    assert set(zip(raw["user_key"], raw["item_key"])) == good_keys
    assert record.row_counts["reviews_read"] == len(good_lines) + 300
