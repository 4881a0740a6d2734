"""The stage graph as data: dependencies, engines and the nightly/retrain split of a3gr.pipeline.STAGES.

Pure Python (no Spark, Ray or Airflow), so schedulers (infra/airflow, infra/cron) and tests
derive their task graphs from the one table of stages instead of restating it.
"""
from __future__ import annotations

from a3gr.pipeline import STAGES

Stages = dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]

# Engine of a stage, by the package of its module: Spark jobs run under spark-submit, the rest
# under `ray job submit`.
PACKAGE_KIND = {"etl": "spark", "tokenize_jobs": "ray", "training": "ray", "batch_infer": "ray"}

# `models` is the registry of model artifacts, and several stages register artifacts there
# (the tokenizer, SASRec, the policies). Only the policies (sft, dpo) count as its writers in
# the graph: a consumer of the tokenizer or SASRec already depends on the stage that made them
# through the tables that stage writes, and `models` readers after training (infer, evaluate)
# must wait for the final policy, not for whichever stage registered something last.
MODEL_WRITERS = ("sft", "dpo")

# Cheap stages that run every night; the rest (tokenization and training) run on the retrain
# cadence or when validation metrics drift.
NIGHTLY_STAGES = ("ingest", "interactions", "feedback", "features", "infer", "evaluate")
RETRAIN_STAGES = tuple(s for s in STAGES if s not in NIGHTLY_STAGES)


def stage_dependencies(stages: Stages = STAGES) -> dict[str, set[str]]:
    """stage -> the stages it directly depends on.

    A stage depends, for each table it reads, on the latest earlier stage (in `stages` order)
    that writes that table; tables that no earlier stage writes are external inputs. The
    `models` table counts as written by MODEL_WRITERS only.
    """
    latest_writer: dict[str, str] = {}
    deps: dict[str, set[str]] = {}
    for name, (_, reads, writes) in stages.items():
        deps[name] = {latest_writer[t] for t in reads if t in latest_writer}
        for table in writes:
            if table != "models" or name in MODEL_WRITERS:
                latest_writer[table] = name
    return deps


def stage_kind(stage: str, stages: Stages = STAGES) -> str:
    """'spark' or 'ray': the engine that runs the stage, from its module's package."""
    module = stages[stage][0]
    package = module.split(".", 1)[0]
    if package not in PACKAGE_KIND:
        raise ValueError(f"stage '{stage}': module '{module}' is in package '{package}', which has no engine; "
                         f"expected one of {sorted(PACKAGE_KIND)}")
    return PACKAGE_KIND[package]


def downstream(stage: str, stages: Stages = STAGES) -> set[str]:
    """Every stage that depends on `stage`, directly or through other stages (not `stage` itself)."""
    if stage not in stages:
        raise ValueError(f"unknown stage '{stage}'; stages in order: {', '.join(stages)}")
    deps = stage_dependencies(stages)
    found: set[str] = set()
    frontier = {stage}
    while frontier:
        frontier = {s for s, ups in deps.items() if ups & frontier} - found
        found |= frontier
    return found
