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
# (the tokenizer, SASRec, the policies, the TIGER baseline). Only the trained recommenders count as
# its writers in the graph, each for the model line it registers: sft and dpo the policy (dpo last),
# tiger the baseline. A consumer of the tokenizer or SASRec already depends on the stage that made
# them through the tables that stage writes. A stage that reads `models` waits for the latest
# earlier writer of each line it uses (MODEL_LINES_READ, by default the policy only): infer serves
# the final policy, never waiting for the baseline; evaluate compares both.
MODEL_WRITERS = {"sft": "policy", "dpo": "policy", "tiger": "tiger"}
MODEL_LINES_READ = {"evaluate": ("policy", "tiger")}
POLICY_LINE = "policy"

# Cheap stages that run every night; the rest (tokenization and training) run on the retrain
# cadence or when validation metrics drift.
NIGHTLY_STAGES = ("ingest", "interactions", "feedback", "features", "infer", "evaluate")
RETRAIN_STAGES = tuple(s for s in STAGES if s not in NIGHTLY_STAGES)


def _read_keys(stage: str, reads: tuple[str, ...]) -> list[str]:
    """The tables a stage reads, with `models` split into the model lines it uses."""
    lines = MODEL_LINES_READ.get(stage, (POLICY_LINE,))
    return [key for t in reads for key in ([f"models:{line}" for line in lines] if t == "models" else [t])]


def _write_keys(stage: str, writes: tuple[str, ...]) -> list[str]:
    """The tables a stage writes, with `models` counted only for MODEL_WRITERS, as their line."""
    return [f"models:{MODEL_WRITERS[stage]}" if t == "models" else t for t in writes
            if t != "models" or stage in MODEL_WRITERS]


def stage_dependencies(stages: Stages = STAGES) -> dict[str, set[str]]:
    """stage -> the stages it directly depends on.

    A stage depends, for each table it reads, on the latest earlier stage (in `stages` order)
    that writes that table; tables that no earlier stage writes are external inputs. The
    `models` table is tracked per model line: written by MODEL_WRITERS only, read as
    MODEL_LINES_READ says (the policy line by default).
    """
    latest_writer: dict[str, str] = {}
    deps: dict[str, set[str]] = {}
    for name, (_, reads, writes) in stages.items():
        deps[name] = {latest_writer[t] for t in _read_keys(name, reads) if t in latest_writer}
        for key in _write_keys(name, writes):
            latest_writer[key] = name
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
