"""Airflow DAG `align3gr_nightly`: the pipeline's stages as tasks, nightly at 02:00 UTC.

One task per stage of a3gr.pipeline.STAGES, wired by a3gr.stage_graph.stage_dependencies.
Spark stages run through SparkSubmitOperator (native Delta: the Delta jars and SQL extensions),
Ray stages through `ray job submit` against $RAY_ADDRESS. Every stage still skips itself when its
inputs and config are unchanged (run records in the `runs` table), so a re-run redoes only what
changed.

The retrain stages (a3gr.stage_graph.RETRAIN_STAGES: tokenization and training) sit behind the
gate task `retrain_due`: they run when the last DPO run is A3GR_RETRAIN_EVERY_DAYS days old
(default 7) or when validation Recall@10 of the DPO model fell by more than A3GR_RECALL_DROP
(relative, default 0.10) between the last two evaluation runs. Otherwise they are skipped and
`infer` / `evaluate` run on the current model (trigger rule none_failed).

Airflow is needed only to build the DAG: without it this module still imports, `dag` is None
and `task_specs()` describes the same graph (the tests use that).

Environment (on the Airflow workers): A3GR_HOME (the repository checkout; default: two folders
above this file), A3GR_CONFIG (preset, relative to A3GR_HOME or absolute; default
configs/cluster.yaml), RAY_ADDRESS (the Ray dashboard, e.g. http://ray-head:8265),
A3GR_RETRAIN_EVERY_DAYS and A3GR_RECALL_DROP (or Airflow Variables of the same names), and the
object-store variables that the config's lake.storage_options_env names. The align3gr package
must be installed in the Airflow environment (the DAG imports a3gr.stage_graph; the gate reads
Delta tables through a3gr.lake).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path

from a3gr.pipeline import STAGES
from a3gr.stage_graph import RETRAIN_STAGES, stage_dependencies, stage_kind

log = logging.getLogger("a3gr.airflow")

DAG_ID = "align3gr_nightly"
SCHEDULE = "0 2 * * *"
GATE_TASK = "retrain_due"

# The Delta jars for pyspark 4.2 / delta-spark 4.4.1 (pyproject.toml pins both; from Delta 4.1 on the
# artifact name carries the Spark line it is built for).
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.1"
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.sql.session.timeZone": "UTC",
}
# Ray stages whose driver must sit on a GPU node (they run the policy in the driver: preferences
# generates candidates, evaluate ranks); sft, dpo and infer ask for GPUs through their Ray Train /
# Ray Data workers (train.use_gpu, infer.gpus_per_actor in the config).
ENTRYPOINT_GPUS = {"preferences": 1, "evaluate": 1}
# Not uploaded with the Ray working directory: environments, the local lake, build outputs.
RAY_EXCLUDES = [".git", ".venv", ".venv-vllm", "lake", "**/__pycache__", "*.egg-info"]

# What the gate compares: validation Recall@10 of the DPO policy, last evaluation run vs the one before.
DRIFT_MODEL, DRIFT_SPLIT, DRIFT_METRIC, DRIFT_K = "dpo", "valid", "recall", 10


def _home() -> Path:
    return Path(os.environ.get("A3GR_HOME", Path(__file__).resolve().parents[2]))


def _config() -> str:
    return os.environ.get("A3GR_CONFIG", "configs/cluster.yaml")


def _ray_command(stage: str, home: Path, config: str) -> str:
    runtime_env = json.dumps({"working_dir": str(home), "excludes": RAY_EXCLUDES})
    gpus = ENTRYPOINT_GPUS.get(stage)
    return " ".join([
        'ray job submit --address "$RAY_ADDRESS"',
        f"--submission-id {stage}-$(date -u +%Y%m%dT%H%M%S)",
        f"--runtime-env-json {shlex.quote(runtime_env)}",
        *([f"--entrypoint-num-gpus {gpus}"] if gpus else []),
        f"-- python -m {STAGES[stage][0]} --config {shlex.quote(config)}",
    ])


def task_specs() -> list[dict]:
    """The DAG as data: one dict per task (task_id, kind, upstream, gate, trigger_rule, what it runs).

    Stage tasks have kind 'spark' (application, application_args, conf, packages) or 'ray'
    (command); the gate task has kind 'gate'. `upstream` lists stage dependencies only; a task
    with `gate` set also waits for the gate and is skipped when the gate says no.
    """
    home, config = _home(), _config()
    config_path = str(home / config)  # absolute: spark-submit runs the application from elsewhere
    deps = stage_dependencies()
    specs: list[dict] = [{"task_id": GATE_TASK, "kind": "gate", "upstream": [], "gate": None,
                          "trigger_rule": "all_success"}]
    for stage, upstream in deps.items():
        gated = stage in RETRAIN_STAGES
        # A nightly stage after a retrain stage runs on the current model when retraining was skipped.
        after_gated = not gated and bool(upstream & set(RETRAIN_STAGES))
        spec = {"task_id": stage, "kind": stage_kind(stage), "upstream": sorted(upstream),
                "gate": GATE_TASK if gated else None,
                "trigger_rule": "none_failed" if after_gated else "all_success"}
        if spec["kind"] == "spark":
            module = STAGES[stage][0]
            spec.update(application=str(home / (module.replace(".", "/") + ".py")),
                        application_args=["--config", config_path], conf=dict(DELTA_CONF), packages=DELTA_PACKAGE)
        else:
            spec["command"] = _ray_command(stage, home, config)
        specs.append(spec)
    return specs


def retrain_decision(now: datetime, last_retrain: datetime | None, every_days: float,
                     recalls: list[float], max_drop: float) -> tuple[bool, str]:
    """Whether the retrain stages run tonight, and why.

    recalls: the drift metric of recent evaluation runs, oldest first (only the last two count);
    max_drop: relative fall of the metric between them that counts as drift.
    """
    if last_retrain is None:
        return True, "no DPO model has been trained yet"
    age = now - last_retrain
    if age >= timedelta(days=every_days):
        return True, f"last retrain {age.days} days ago (every {every_days:g} days)"
    if len(recalls) >= 2 and recalls[-2] > 0:
        drop = (recalls[-2] - recalls[-1]) / recalls[-2]
        if drop > max_drop:
            return True, (f"{DRIFT_METRIC}@{DRIFT_K} fell {drop:.1%} ({recalls[-2]:.4f} -> {recalls[-1]:.4f}), "
                          f"more than {max_drop:.0%}")
    return False, f"model is {age.days} days old and {DRIFT_METRIC}@{DRIFT_K} has not drifted"


def _setting(name: str, default: float) -> float:
    """A number from the environment, else from the Airflow Variable of the same name, else the default."""
    if name in os.environ:
        return float(os.environ[name])
    try:
        from airflow.sdk import Variable
    except ImportError:
        from airflow.models import Variable
    value = Variable.get(name, None)  # positional: Airflow 2 calls it default_var, Airflow 3 default
    return float(value) if value is not None else default


def _last_retrain(lake) -> datetime | None:
    """Start of the latest DPO run that left an up-to-date model (succeeded, or skipped as current)."""
    from a3gr.runs import list_runs

    return next((r.started_at for r in list_runs(lake, "dpo") if r.status in ("succeeded", "skipped")), None)


def _recent_recalls(lake) -> list[float]:
    """The drift metric of the last two evaluation runs, oldest first (run ids sort by start time)."""
    if not lake.exists("eval_metrics"):
        return []
    m = lake.read_pandas("eval_metrics", columns=["run_id", "model", "split", "metric", "k", "value"])
    m = m[(m["model"] == DRIFT_MODEL) & (m["split"] == DRIFT_SPLIT) & (m["metric"] == DRIFT_METRIC)
          & (m["k"] == DRIFT_K)]
    return m.groupby("run_id")["value"].mean().sort_index().tail(2).tolist()


def retrain_due() -> bool:
    """The gate's callable: reads `runs` and `eval_metrics` through delta-rs and decides."""
    from a3gr.config import load_config
    from a3gr.lake import Lake

    config = _config()
    lake = Lake.from_config(load_config(config if os.path.isabs(config) else _home() / config))
    due, reason = retrain_decision(datetime.now(timezone.utc), _last_retrain(lake),
                                   _setting("A3GR_RETRAIN_EVERY_DAYS", 7), _recent_recalls(lake),
                                   _setting("A3GR_RECALL_DROP", 0.10))
    log.info("retrain %s: %s", "due" if due else "not due", reason)
    return due


def build_dag():
    """The Airflow DAG built from task_specs(); needs Airflow 2.x/3.x and the apache-spark provider."""
    try:  # Airflow 3
        from airflow.providers.standard.operators.bash import BashOperator
        from airflow.providers.standard.operators.python import ShortCircuitOperator
        from airflow.sdk import DAG
    except ImportError:  # Airflow 2
        from airflow import DAG
        from airflow.operators.bash import BashOperator
        from airflow.operators.python import ShortCircuitOperator
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    specs = task_specs()
    with DAG(DAG_ID, schedule=SCHEDULE, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), catchup=False,
             max_active_runs=1, tags=["align3gr"], doc_md=__doc__,
             default_args={"retries": 2, "retry_delay": timedelta(minutes=10)}) as dag:
        tasks = {}
        for spec in specs:
            common = {"task_id": spec["task_id"], "trigger_rule": spec["trigger_rule"]}
            if spec["kind"] == "gate":
                # Skips only its direct downstream tasks (the retrain stages); later tasks keep their trigger rules.
                tasks[spec["task_id"]] = ShortCircuitOperator(python_callable=retrain_due,
                                                              ignore_downstream_trigger_rules=False, **common)
            elif spec["kind"] == "spark":
                tasks[spec["task_id"]] = SparkSubmitOperator(
                    application=spec["application"], application_args=spec["application_args"], conf=spec["conf"],
                    packages=spec["packages"], name=f"a3gr-{spec['task_id']}", conn_id="spark_default", **common)
            else:
                tasks[spec["task_id"]] = BashOperator(bash_command=spec["command"], cwd=str(_home()), **common)
        for spec in specs:
            for upstream in spec["upstream"] + ([spec["gate"]] if spec["gate"] else []):
                tasks[upstream] >> tasks[spec["task_id"]]
    return dag


dag = build_dag() if importlib.util.find_spec("airflow") is not None else None
