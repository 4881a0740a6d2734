"""The thin shell every job runs in: skip when up to date, validate before publish, record the run.

    with JobRun("interactions", cfg, input_tables=["raw_interactions"]) as job:
        if job.up_to_date:
            return job.record
        ...pure transform...
        job.publish("interactions", df)

A job is skipped when its inputs (table versions, file contents) and its config are the same as
in its last successful run and its outputs are still at the versions that run wrote.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from a3gr.config import PipelineConfig, config_hash, config_to_dict
from a3gr.lake import Lake
from a3gr.runs import RunRecord, last_succeeded, new_run_id, save_run

log = logging.getLogger("a3gr")


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    for noisy in ("py4j", "great_expectations", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def file_fingerprint(path: str | Path) -> str:
    """Content hash of an input file, so a changed raw file re-runs its job and an untouched one does not."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


class JobRun:
    def __init__(self, job: str, cfg: PipelineConfig, input_tables: list[str] = (),
                 input_files: dict[str, str] | None = None, config_sections: dict | None = None,
                 force: bool = False, lake: Lake | None = None):
        self.job = job
        self.cfg = cfg
        self.lake = lake or Lake.from_config(cfg)
        self.input_tables = list(input_tables)
        self.input_files = dict(input_files or {})
        self.force = force
        sections = config_sections if config_sections is not None else config_to_dict(cfg)
        self.record = RunRecord(run_id=new_run_id(job), job=job, config_hash=config_hash(sections),
                                config=config_to_dict(cfg))
        self.up_to_date = False
        self._t0 = 0.0

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def _current_inputs(self) -> dict:
        inputs = {f"table:{t}": self.lake.version(t) for t in self.input_tables}
        inputs.update({f"file:{name}": file_fingerprint(p) for name, p in self.input_files.items() if p})
        return inputs

    def _outputs_unchanged(self, previous: RunRecord) -> bool:
        return all(self.lake.version(t) == v for t, v in previous.outputs.items())

    def __enter__(self) -> "JobRun":
        setup_logging()
        self._t0 = time.perf_counter()
        self.record.inputs = self._current_inputs()
        previous = last_succeeded(self.lake, self.job)
        if (not self.force and previous is not None and previous.inputs == self.record.inputs
                and previous.config_hash == self.record.config_hash and self._outputs_unchanged(previous)):
            self.up_to_date = True
            self.record.outputs = previous.outputs
            self.record.row_counts = previous.row_counts
            log.info("%s: up to date (inputs and config unchanged since %s), skipped", self.job, previous.run_id)
            save_run(self.lake, self.record.finish("skipped", f"up to date with {previous.run_id}"))
            return self
        log.info("%s: run %s started", self.job, self.run_id)
        save_run(self.lake, self.record)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.up_to_date:
            return False
        if exc is None:
            self.record.finish("succeeded")
            log.info("%s: succeeded in %.1fs, wrote %s", self.job, self.record.duration_s,
                     ", ".join(f"{t}@v{v} ({self.record.row_counts.get(t, '?')} rows)"
                               for t, v in self.record.outputs.items()))
        else:
            self.record.finish("failed", f"{exc_type.__name__}: {exc}"[:4000])
            log.error("%s: failed after %.1fs: %s", self.job, self.record.duration_s, exc_type.__name__)
        save_run(self.lake, self.record)
        return False

    def count(self, name: str, value: int) -> None:
        """Record a row count that is not a table (e.g. lines read) for reconciliation."""
        self.record.row_counts[name] = int(value)

    def publish(self, table: str, df, context: dict | None = None, mode: str = "overwrite",
                replace_partition: dict | None = None) -> int:
        """Validate a Spark DataFrame against the table's suite, then commit it in one transaction.

        A failing suite raises ValidationFailed and leaves the table at its last good version.
        """
        from expectations.runner import require_valid

        from a3gr.spark_delta import write_df

        t0 = time.perf_counter()
        # Materialise once: validation and the write then read the same rows.
        df = df.localCheckpoint(eager=True)
        frame = df.toPandas()
        require_valid(table, frame, context)
        version = self._version_if_unchanged(table, frame) if mode == "overwrite" and not replace_partition else None
        if version is None:
            version = write_df(df, self.lake, table, mode=mode, replace_partition=replace_partition,
                               run_id=self.run_id, engine=self.cfg.lake.engine)
        self._record_output(table, version, len(frame))
        elapsed = time.perf_counter() - t0
        log.info("%s: published %s v%d: %d rows validated and committed in %.1fs (%.0f rows/s)", self.job, table,
                 version, len(frame), elapsed, len(frame) / max(elapsed, 1e-9))
        return version

    def publish_arrow(self, table: str, data, context: dict | None = None, mode: str = "overwrite") -> int:
        """Validate and write a pyarrow/pandas table through delta-rs (for small, non-Spark outputs)."""
        from expectations.runner import require_valid

        frame = data if hasattr(data, "iloc") else data.to_pandas()
        require_valid(table, frame, context)
        version = self._version_if_unchanged(table, frame) if mode == "overwrite" else None
        if version is None:
            version = self.lake.write_arrow(table, frame, mode=mode, run_id=self.run_id)
        self._record_output(table, version, len(frame))
        return version

    def _version_if_unchanged(self, table: str, frame) -> int | None:
        """The table's current version when it already holds exactly these rows, else None.

        Rewriting identical rows would give the table a new version and re-run every stage
        downstream; leaving it untouched re-runs only the stages whose inputs really changed.
        Columns that only name the writing run (`*run_id`) are not content.
        """
        import pyarrow as pa

        from a3gr.catalog import spec
        from a3gr.lake import conform_arrow

        s = spec(table)
        if not s.keys or not self.lake.exists(table):
            return None
        version = self.lake.version(table)
        current = conform_arrow(self.lake.read_arrow(table, version=version), s.schema, table)
        if current.num_rows != len(frame):
            return None
        new = conform_arrow(pa.Table.from_pandas(frame, preserve_index=False), s.schema, table)
        content = [n for n in s.schema.names if not n.endswith("run_id")]
        order = [(k, "ascending") for k in s.keys]
        if not current.select(content).sort_by(order).equals(new.select(content).sort_by(order)):
            return None
        log.info("%s: %s unchanged (%d rows), kept at v%d", self.job, table, len(frame), version)
        return version

    def _record_output(self, table: str, version: int, rows: int) -> None:
        self.record.outputs[table] = version
        self.record.row_counts[table] = rows


def skipped_run(job: str, cfg: PipelineConfig, reason: str, config_sections: dict | None = None,
                lake: Lake | None = None) -> RunRecord:
    """Record a run of `job` that did nothing because the config turns it off (status 'skipped', the reason)."""
    setup_logging()
    sections = config_sections if config_sections is not None else config_to_dict(cfg)
    record = RunRecord(run_id=new_run_id(job), job=job, config_hash=config_hash(sections), config=config_to_dict(cfg))
    log.info("%s: skipped: %s", job, reason)
    save_run(lake or Lake.from_config(cfg), record.finish("skipped", reason))
    return record


def job_main(run_fn) -> None:
    """Entry point for `spark-submit etl/<job>.py --config FILE [--set key=value ...] [--force]`."""
    import argparse

    from a3gr.config import load_config

    parser = argparse.ArgumentParser(description=run_fn.__module__)
    parser.add_argument("--config", default=None, help="preset YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--force", action="store_true", help="run even if inputs and config are unchanged")
    args = parser.parse_args()
    record = run_fn(load_config(args.config, args.set), force=args.force)
    print(f"{record.job}: {record.status} ({record.run_id})")
