"""infra/: the cluster configs, the schedules and the image agree with the code they run.

Nothing here starts Spark, Ray or Airflow: files are parsed, the DAG module is imported without
Airflow, and the `a3gr` commands of the cron file are parsed by the CLI itself.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from a3gr.pipeline import STAGES
from a3gr.stage_graph import RETRAIN_STAGES, stage_dependencies

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
STAGE_MODULES = {module for module, _, _ in STAGES.values()}
RAYJOBS = sorted((INFRA / "k8s").glob("rayjob-*.yaml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _load_dag_module():
    spec = importlib.util.spec_from_file_location("align3gr_nightly", INFRA / "airflow" / "align3gr_nightly.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dag_module():
    return _load_dag_module()


def _pin(requirement_list: list[str], name: str) -> str:
    for req in requirement_list:
        if req.split("==")[0].split("[")[0] == name:
            return req.split("==")[1]
    raise AssertionError(f"pyproject.toml pins no '{name}'")


def _modules_in(command: str) -> list[str]:
    return re.findall(r"python -m ([\w.]+)", command)


# --- YAML ------------------------------------------------------------------------------------------

def test_every_yaml_under_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.name for p in files} >= {"cluster.yaml", "rayjob-tokenize.yaml", "rayjob-train.yaml",
                                      "rayjob-infer.yaml"}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_manifest_runs_stage_modules(path):
    (job,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    modules = _modules_in(job["spec"]["entrypoint"])
    assert modules, f"{path.name}: entrypoint runs no `python -m <module>`"
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{path.name}: module {module} not found"
        assert module in STAGE_MODULES, f"{path.name}: {module} is not a stage module of a3gr.pipeline.STAGES"
    assert job["spec"]["entrypoint"].count("--config /config/cluster.yaml") == len(modules)

    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                             for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        configmaps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
        for container in pod["containers"]:
            assert container["image"] == "registry.example.com/align3gr:0.1.0"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/config"] in configmaps, f"{path.name}: /config is not mounted from a ConfigMap"
            secret_env = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_env
            assert all("value" not in e for e in container["env"]), f"{path.name}: literal env values"

    worker_gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"]]
    if path.name in ("rayjob-train.yaml", "rayjob-infer.yaml"):
        assert all(worker_gpus), f"{path.name}: workers without nvidia.com/gpu"
    else:
        assert not any(worker_gpus)


def test_rayjobs_cover_every_ray_stage_after_etl():
    covered = {m for p in RAYJOBS for m in _modules_in(yaml.safe_load(p.read_text())["spec"]["entrypoint"])}
    ray_modules = {STAGES[s][0] for s in STAGES if not STAGES[s][0].startswith("etl.")}
    assert covered == ray_modules


def test_ray_cluster_installs_with_the_makefiles_command():
    import json

    import jsonschema  # a dependency of ray
    import ray.autoscaler

    cluster = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cluster, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    assert {"head", "cpu_worker", "gpu_worker"} <= set(cluster["available_node_types"])
    assert cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    assert any(_pip_install_args(c) == _makefile_install_args() for c in cluster["setup_commands"])
    assert cluster["docker"]["image"] == "registry.example.com/align3gr:0.1.0"


# --- Airflow DAG -----------------------------------------------------------------------------------

def test_dag_module_imports_without_airflow(dag_module):
    if importlib.util.find_spec("airflow") is None:
        assert dag_module.dag is None
    assert dag_module.SCHEDULE == "0 2 * * *"


def test_dag_graph_is_the_stage_graph(dag_module):
    specs = dag_module.task_specs()
    stage_specs = {s["task_id"]: s for s in specs if s["kind"] in ("spark", "ray")}
    assert {t: set(s["upstream"]) for t, s in stage_specs.items()} == stage_dependencies()
    assert len(stage_specs) == len(specs) - 1  # plus the gate
    gate = next(s for s in specs if s["kind"] == "gate")
    assert gate["upstream"] == []
    assert {t for t, s in stage_specs.items() if s["gate"] == gate["task_id"]} == set(RETRAIN_STAGES)
    # infer/evaluate follow retrain stages but must run when retraining is skipped
    assert {t for t, s in stage_specs.items() if s["trigger_rule"] == "none_failed"} == {"infer", "evaluate"}


def test_dag_tasks_run_the_stage_modules(dag_module, monkeypatch):
    monkeypatch.delenv("A3GR_HOME", raising=False)
    monkeypatch.delenv("A3GR_CONFIG", raising=False)
    for spec in dag_module.task_specs():
        if spec["kind"] == "spark":
            application = Path(spec["application"])
            assert application.is_file(), f"{spec['task_id']}: {application} does not exist"
            assert application == ROOT / (STAGES[spec["task_id"]][0].replace(".", "/") + ".py")
            config = Path(spec["application_args"][spec["application_args"].index("--config") + 1])
            assert config.is_file()
            assert spec["conf"]["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
            assert spec["conf"]["spark.sql.catalog.spark_catalog"] == \
                "org.apache.spark.sql.delta.catalog.DeltaCatalog"
        elif spec["kind"] == "ray":
            args = shlex.split(spec["command"])
            assert args[:3] == ["ray", "job", "submit"] and "--address" in args
            assert _modules_in(spec["command"]) == [STAGES[spec["task_id"]][0]]
            assert (ROOT / args[args.index("--config") + 1]).is_file()


def test_delta_package_matches_the_pins(dag_module):
    """io.delta:delta-spark_<spark line>_2.13:<delta-spark pin>, in the DAG and in spark-defaults.conf."""
    project = PYPROJECT["project"]
    pyspark = _pin(project["dependencies"], "pyspark")
    delta = _pin(project["optional-dependencies"]["cluster"], "delta-spark")
    expected = f"io.delta:delta-spark_{'.'.join(pyspark.split('.')[:2])}_2.13:{delta}"
    assert dag_module.DELTA_PACKAGE == expected
    defaults = _spark_defaults()
    packages = defaults["spark.jars.packages"].split(",")
    assert expected in packages
    for key, value in dag_module.DELTA_CONF.items():
        assert defaults[key] == value
    # hadoop-aws must be the Hadoop release that pyspark bundles
    jars = Path(importlib.util.find_spec("pyspark").origin).parent / "jars"
    hadoop = [p.name for p in jars.glob("hadoop-client-api-*.jar")]
    if hadoop:
        version = hadoop[0].removeprefix("hadoop-client-api-").removesuffix(".jar")
        assert f"org.apache.hadoop:hadoop-aws:{version}" in packages


def test_retrain_decision(dag_module):
    decide = dag_module.retrain_decision
    now = datetime(2026, 6, 10, 2, tzinfo=timezone.utc)
    assert decide(now, None, 7, [], 0.1)[0]
    assert decide(now, now - timedelta(days=7), 7, [0.1, 0.1], 0.1)[0]
    due, reason = decide(now, now - timedelta(days=2), 7, [0.10, 0.08], 0.1)
    assert due and "20.0%" in reason
    assert not decide(now, now - timedelta(days=2), 7, [0.10, 0.095], 0.1)[0]
    assert not decide(now, now - timedelta(days=2), 7, [0.08], 0.1)[0]  # one run: nothing to compare


def test_retrain_gate_reads_runs_and_eval_metrics(dag_module, tmp_path, monkeypatch):
    from a3gr.lake import Lake
    from a3gr.runs import RunRecord, save_run

    config = tmp_path / "gate.yaml"
    config.write_text(yaml.safe_dump({"lake": {"root": str(tmp_path / "lake")}}))
    monkeypatch.setenv("A3GR_CONFIG", str(config))
    monkeypatch.setenv("A3GR_RETRAIN_EVERY_DAYS", "7")
    monkeypatch.setenv("A3GR_RECALL_DROP", "0.1")
    lake = Lake(str(tmp_path / "lake"))
    assert dag_module.retrain_due()  # nothing trained yet

    save_run(lake, RunRecord(run_id="dpo-1", job="dpo", config_hash="h", code_version="test",
                             started_at=datetime.now(timezone.utc) - timedelta(days=1)).finish("succeeded"))
    assert not dag_module.retrain_due()  # fresh model, no metrics yet

    def metrics(run_id, recall_at_10):
        rows = [("dpo", "valid", "recall", 10, recall_at_10), ("dpo", "test", "recall", 10, 0.0),
                ("sasrec", "valid", "recall", 10, 0.0), ("dpo", "valid", "recall", 5, 0.0),
                ("dpo", "valid", "invalid_scid_rate", None, 0.0)]
        frame = pd.DataFrame(rows, columns=["model", "split", "metric", "k", "value"])
        frame.insert(0, "run_id", run_id)
        frame.insert(2, "dataset", "synthetic")
        frame["k"] = frame["k"].astype("Int32")
        lake.write_arrow("eval_metrics", frame, mode="append")

    metrics("evaluate-20260601T020000-aaaaaa", 0.100)
    metrics("evaluate-20260602T020000-bbbbbb", 0.098)
    assert not dag_module.retrain_due()  # 2 % drop
    metrics("evaluate-20260603T020000-cccccc", 0.080)
    assert dag_module.retrain_due()  # 18 % drop
    monkeypatch.setenv("A3GR_RECALL_DROP", "0.25")
    assert not dag_module.retrain_due()


# --- cron ------------------------------------------------------------------------------------------

def _cron():
    env, entries = {}, []
    for line in (INFRA / "cron" / "align3gr.cron").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            key, value = line.split("=", 1)
            env[key] = value
        else:
            fields = line.split(None, 5)
            entries.append((fields[:5], fields[5]))
    return env, entries


def test_cron_commands_are_valid_a3gr_commands():
    from typer.testing import CliRunner

    from a3gr.cli import app

    env, entries = _cron()
    assert entries
    invocations = []
    for _, command in entries:
        assert ">>" in command and "$A3GR_LOG" in command and "2>&1" in command, "cron entries log to a file"
        for match in re.finditer(r"(?:\S*/)?a3gr ([^&|>']+)", command):
            args = [a.replace("$A3GR_CONFIG", env["A3GR_CONFIG"]) for a in shlex.split(match.group(1))]
            invocations.append(args)
    assert ["pipeline", "run", "-c", env["A3GR_CONFIG"]] in invocations
    assert (ROOT / env["A3GR_CONFIG"]).is_file()
    runner = CliRunner()
    for args in invocations:
        # --help parses the subcommand path and every option before printing, and runs nothing
        result = runner.invoke(app, args + ["--help"])
        assert result.exit_code == 0, f"a3gr {' '.join(args)}: {result.output}"


def test_cron_runs_nightly_and_retrains_weekly():
    _, entries = _cron()
    days = []
    for (minute, hour, dom, month, dow), command in entries:
        assert (minute, hour, dom, month) == ("0", "2", "*", "*")
        low, _, high = dow.partition("-")
        days += list(range(int(low), int(high or low) + 1))
        assert "flock -n" in command
    assert sorted(days) == list(range(7))  # every night exactly once


# --- image -----------------------------------------------------------------------------------------

def _pip_install_args(command: str) -> list[str] | None:
    match = re.search(r"pip install ([^\n&;]+)", command)
    return shlex.split(match.group(1)) if match else None


def _makefile_install_args() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    setup_install = [_pip_install_args(line) for line in makefile.splitlines()
                     if "pip install" in line and ".[dev]" in line]
    assert len(setup_install) == 1, "the Makefile's setup install line"
    return setup_install[0]


def test_dockerfile_installs_with_the_makefiles_command():
    lines = (INFRA / "docker" / "Dockerfile").read_text().splitlines()
    assert [line for line in lines if line.startswith("FROM")] == ["FROM python:3.11-slim"]
    assert any("openjdk-17-jre-headless" in line for line in lines)
    installs = [_pip_install_args(line) for line in lines if line.startswith("RUN") and "pip install" in line]
    assert installs == [_makefile_install_args()]


# --- secrets ---------------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    # a literal value; placeholders ($VAR, ${VAR}, <...>, ...) are fine
    re.compile(r"aws_secret_access_key\s*=\s*(?![$<{]|\.\.\.)\S+", re.IGNORECASE),
    re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
]


def _secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_patterns_catch_secrets():
    assert _secrets_in("key = " + "AKIA" + "Q" * 16)
    assert _secrets_in("aws_secret_access_key = " + "abc/" * 10)
    assert _secrets_in("-----BEGIN RSA " + "PRIVATE KEY-----")
    assert not _secrets_in("--from-literal=AWS_SECRET_ACCESS_KEY=... AWS_SECRET_ACCESS_KEY=$SECRET")


def test_no_literal_secrets_under_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 10
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := _secrets_in(p.read_text()))}
    assert not found, f"literal secrets: {found}"


def _spark_defaults() -> dict[str, str]:
    out = {}
    for line in (INFRA / "spark" / "spark-defaults.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            out[key] = value.strip()
    return out
