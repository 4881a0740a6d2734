"""The stage graph and the runner behind `a3gr pipeline run` and `a3gr etl <job>`.

Stages are found by module name, so the kernel never imports a stage's code until it runs it.
Each stage skips itself when its inputs and config are unchanged (see a3gr.jobs.JobRun).
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import time

from a3gr.config import PipelineConfig
from a3gr.locks import one_run_per_lake
from a3gr.runs import RunRecord, new_run_id, utcnow

log = logging.getLogger("a3gr.pipeline")
# Fault injection for tests/faults: A3GR_FAILPOINT=kill_after_stage:<stage> SIGKILLs the run right after that stage.
FAILPOINT_ENV = "A3GR_FAILPOINT"

# stage -> (module with run(cfg, spark, force), tables it reads, tables it writes)
STAGES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "ingest": ("etl.ingest", (), ("raw_interactions", "raw_items", "raw_users", "quarantine")),
    "interactions": ("etl.interactions", ("raw_interactions",), ("id_map", "interactions")),
    "feedback": ("etl.feedback", ("interactions", "raw_interactions", "id_map"), ("feedback",)),
    "features": ("etl.features", ("interactions", "raw_items", "raw_interactions", "id_map", "feedback"),
                 ("items", "users", "item_features", "user_features")),
    "semantic": ("tokenize_jobs.semantic", ("items", "users"), ("item_semantic", "user_semantic")),
    "collaborative": ("tokenize_jobs.collaborative", ("interactions", "user_features"),
                      ("item_collab", "user_collab")),
    "train_tokenizer": ("tokenize_jobs.train_tokenizer",
                        ("item_semantic", "user_semantic", "item_collab", "user_collab", "interactions"),
                        ("item_embeddings", "user_embeddings")),
    "assign_scid": ("tokenize_jobs.assign_scid", ("item_embeddings", "user_embeddings", "items", "models"),
                    ("item_scid", "user_scid")),
    "instructions": ("etl.instructions", ("interactions", "items", "users", "item_scid", "user_scid"),
                     ("sft_examples",)),
    # the training stages register models; a later stage depends on the registered version
    "sft": ("training.sft", ("sft_examples", "item_scid", "user_scid"), ("models",)),
    "preferences": ("training.preferences", ("sft_examples", "item_scid", "feedback", "models"),
                    ("preference_pairs",)),
    "dpo": ("training.dpo", ("preference_pairs", "sft_examples", "item_scid", "models"), ("models",)),
    # the TIGER-style baseline: its own text-only item codes, trained apart from the policy
    "tiger": ("training.tiger", ("item_semantic", "interactions"), ("models",)),
    "infer": ("batch_infer.infer", ("user_features", "user_scid", "item_scid", "models"), ("recommendations",)),
    "evaluate": ("batch_infer.evaluate", ("user_features", "user_scid", "item_scid", "item_features", "interactions",
                                          "models"), ("eval_metrics",)),
}
ETL_STAGES = ("ingest", "interactions", "feedback", "features")
TOKENIZE_STAGES = ("semantic", "collaborative", "train_tokenizer", "assign_scid")
TRAIN_STAGES = ("instructions", "sft", "preferences", "dpo", "tiger")


def select_stages(start: str | None = None, only: list[str] | None = None) -> list[str]:
    names = list(STAGES)
    for name in ([start] if start else []) + list(only or []):
        if name not in STAGES:
            raise ValueError(f"unknown stage '{name}'; stages in order: {', '.join(names)}")
    if only:
        return [n for n in names if n in only]
    return names[names.index(start):] if start else names


def run_stage(name: str, cfg: PipelineConfig, force: bool = False) -> RunRecord:
    module = importlib.import_module(STAGES[name][0])
    record = module.run(cfg, force=force)
    if os.environ.get(FAILPOINT_ENV) == f"kill_after_stage:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
    return record


BLOCKED = "blocked"  # the status of a stage not run because a stage it depends on failed


def _failed_record(name: str, cfg: PipelineConfig, exc: BaseException, started) -> RunRecord:
    """The run record a failed stage saved (JobRun records every failure inside a job), or, for a
    failure before the job opened its run (e.g. a missing source file), one made here."""
    from a3gr.lake import Lake
    from a3gr.runs import list_runs

    try:
        latest = list_runs(Lake.from_config(cfg), name, limit=1)
    except Exception:  # the lake itself may be what failed
        latest = []
    if latest and latest[0].status == "failed" and latest[0].started_at >= started:
        return latest[0]
    record = RunRecord(run_id=new_run_id(name), job=name, config_hash="", started_at=started)
    return record.finish("failed", f"{type(exc).__name__}: {exc}"[:4000])


def failure_summary(record: RunRecord) -> str:
    """Why a stage failed, readably; a failed expectation suite gives its report (table, expectation,
    column, count, sample values)."""
    kind, _, detail = record.message.partition(": ")
    if kind.endswith("ValidationFailed"):  # also Ray's RayTaskError(ValidationFailed)
        return f"its output failed the expectation suite: {detail}"
    return record.message


@one_run_per_lake  # a second run on the same lake fails at once (a3gr.locks)
def run_pipeline(cfg: PipelineConfig, stages: list[str], forced: set[str] = frozenset()) -> list[RunRecord]:
    """Run stages in order; stages in `forced` run even when up to date. One record per stage.

    A stage that raises is recorded as failed; the stages downstream of it (a3gr.stage_graph) are
    not run and get an unsaved record with status BLOCKED; the independent stages still run.
    Spark jobs share the process's one Spark session, Ray jobs its one Ray connection.
    """
    from a3gr.stage_graph import downstream

    records = []
    blocked_by: dict[str, str] = {}  # stage -> the failed stage it depends on
    t0 = time.perf_counter()
    for i, name in enumerate(stages, 1):
        step = f"stage {i}/{len(stages)}: {name}"
        if name in blocked_by:
            record = RunRecord(run_id="", job=name, config_hash="", status=BLOCKED,
                               message=f"not run: it depends on '{blocked_by[name]}', which failed")
            log.warning("%s %s", step, record.message)
            records.append(record)
            continue
        log.info("%s (pipeline at %.1fs)", step, time.perf_counter() - t0)
        started = utcnow()
        try:
            record = run_stage(name, cfg, force=name in forced)
        except Exception as exc:
            record = _failed_record(name, cfg, exc, started)
            reason = failure_summary(record)
            # the traceback helps with a crash; a failed suite is fully described by its report
            log.error("%s failed: %s", step, reason, exc_info=reason == record.message)
            for later in downstream(name):
                blocked_by.setdefault(later, name)
        log.info("%s %s in %.1fs", step, record.status, record.duration_s or 0.0)
        records.append(record)
    log.info("pipeline finished in %.1fs: %s", time.perf_counter() - t0,
             ", ".join(f"{r.job}={r.status}" for r in records))
    return records
