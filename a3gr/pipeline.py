"""The stage graph and the runner behind `a3gr pipeline run` and `a3gr etl <job>`.

Stages are found by module name, so the kernel never imports a stage's code until it runs it.
Each stage skips itself when its inputs and config are unchanged (see a3gr.jobs.JobRun).
"""
from __future__ import annotations

import importlib
import logging
import time

from a3gr.config import PipelineConfig
from a3gr.runs import RunRecord

log = logging.getLogger("a3gr.pipeline")

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
    "infer": ("batch_infer.infer", ("user_features", "user_scid", "item_scid", "models"), ("recommendations",)),
    "evaluate": ("batch_infer.evaluate", ("user_features", "user_scid", "item_scid", "item_features", "interactions",
                                          "models"), ("eval_metrics",)),
}
ETL_STAGES = ("ingest", "interactions", "feedback", "features")
TOKENIZE_STAGES = ("semantic", "collaborative", "train_tokenizer", "assign_scid")
TRAIN_STAGES = ("instructions", "sft", "preferences", "dpo")


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
    return module.run(cfg, force=force)


def run_pipeline(cfg: PipelineConfig, stages: list[str], forced: set[str] = frozenset()) -> list[RunRecord]:
    """Run stages in order; stages in `forced` run even when up to date.

    Spark jobs share the process's one Spark session, Ray jobs its one Ray connection.
    """
    records = []
    t0 = time.perf_counter()
    for i, name in enumerate(stages, 1):
        log.info("stage %d/%d: %s", i, len(stages), name)
        records.append(run_stage(name, cfg, force=name in forced))
    log.info("pipeline finished in %.1fs: %s", time.perf_counter() - t0,
             ", ".join(f"{r.job}={r.status}" for r in records))
    return records
