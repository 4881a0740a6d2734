"""The `a3gr` command line."""
from __future__ import annotations

import json
import textwrap
from typing import List, Optional

import typer

from a3gr.config import ConfigError, PipelineConfig, config_to_dict, field_help, load_config

app = typer.Typer(help="align3gr: Align3GR generative recommendation as a nightly data pipeline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
pipeline_app = typer.Typer(help="The whole DAG of stages.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the merged configuration.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="Preset YAML (e.g. configs/embedded.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: --set etl.k_core=10 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Run even when inputs and config are unchanged.")


def _config(config: Optional[str], overrides: Optional[List[str]]) -> PipelineConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None


WIDTH = 120  # summaries and run listings stay readable in a 120-column terminal


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def _version(v) -> str:
    return "absent" if v is None else f"v{v}"


def _stage_detail(record) -> str:
    if record.status == "succeeded":
        return ", ".join(f"{t} v{v} ({record.row_counts.get(t, '?')} rows)" for t, v in record.outputs.items())
    if record.status == "failed":
        return "FAILED (below)"
    return record.message


def _summarize(records) -> bool:
    """Print each stage's status, duration and outputs, then why any stage failed; True if none failed."""
    from a3gr.pipeline import failure_summary

    if records and all(r.status == "skipped" for r in records):
        only = f"all {len(records)} stages" if len(records) > 1 else records[0].job
        typer.echo(f"nothing changed: {only} up to date")
        return True
    typer.echo(f"{'stage':<16}{'status':<10}{'duration':>9}  outputs")
    for r in records:
        took = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        typer.echo(_fit(f"{r.job:<16}{r.status:<10}{took:>9}  {_stage_detail(r)}"))
    failed = [r for r in records if r.status == "failed"]
    for r in failed:
        typer.echo(f"\nstage '{r.job}' failed (run {r.run_id}):")
        for line in failure_summary(r).splitlines():
            typer.echo(f"  {line}")
    return not failed


def _finish(records) -> None:
    if not _summarize(records):
        raise typer.Exit(1)


def _run_pipeline(cfg: PipelineConfig, stages: list[str], forced: set[str]):
    """run_pipeline, with a busy or unwritable lake reported in one line (exit 1) instead of a traceback."""
    from a3gr.locks import LakeLockedError, LakeNotWritableError
    from a3gr.pipeline import run_pipeline

    try:
        return run_pipeline(cfg, stages, forced)
    except (LakeLockedError, LakeNotWritableError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _run_group(group: str, stages: tuple[str, ...], job: str, config, overrides, force: bool) -> None:
    """Run one job of a stage group, or all of them in order ('all')."""

    if job != "all" and job not in stages:
        typer.echo(f"unknown {group} job '{job}'; choose from {', '.join(stages)} or all", err=True)
        raise typer.Exit(2)
    cfg = _config(config, overrides)
    chosen = list(stages) if job == "all" else [job]
    _finish(_run_pipeline(cfg, chosen, forced=set(chosen) if force else set()))


@app.command()
def etl(job: str = typer.Argument(..., help="ingest | interactions | feedback | features | all"),
        config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Run one ETL job (or all of them in order) on local Spark or under the configured master."""
    from a3gr.pipeline import ETL_STAGES

    _run_group("ETL", ETL_STAGES, job, config, set_, force)


@app.command()
def tokenize(job: str = typer.Argument(..., help="semantic | collaborative | train_tokenizer | assign_scid | all"),
             config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Run one tokenization job (or all in order) on a local Ray, or on tokenize.ray_address."""
    from a3gr.pipeline import TOKENIZE_STAGES

    _run_group("tokenize", TOKENIZE_STAGES, job, config, set_, force)


@app.command()
def train(job: str = typer.Argument(..., help="instructions | sft | preferences | dpo | tiger | all"),
          config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Build the instruction table, run SFT, build the preference table, run progressive Softmax-DPO; train the
    TIGER-style baseline."""
    from a3gr.pipeline import TRAIN_STAGES

    _run_group("train", TRAIN_STAGES, job, config, set_, force)


@app.command()
def infer(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Nightly batch inference: top-K items per user into recommendations[run_date] (infer.* settings)."""
    from a3gr.catalog import table_uri

    cfg = _config(config, set_)
    records = _run_pipeline(cfg, ["infer"], forced={"infer"} if force else set())
    _finish(records)
    uri = table_uri(cfg.lake.root, "recommendations")
    night = records[0].config["infer"]["run_date"]
    typer.echo(f"recommendations: {uri} (Delta, one partition per run_date; this run: {night})")
    typer.echo(f"read that night: python -c \"from deltalake import DeltaTable; import datetime; print(DeltaTable("
               f"'{uri}').to_pandas(filters=[('run_date', '=', datetime.date.fromisoformat('{night}'))]))\"")


@app.command()
def evaluate(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt):
    """Offline evaluation of every model of eval.models and the baselines in one protocol: eval_metrics + a report."""
    from batch_infer.evaluate import latest_report

    cfg = _config(config, set_)
    _finish(_run_pipeline(cfg, ["evaluate"], forced={"evaluate"} if force else set()))
    path = latest_report(cfg)
    if path is not None:
        typer.echo(f"report: {path} (and {path.with_suffix('.html').name}); show it with: a3gr report"
                   f"{' -c ' + config if config else ''}")


@app.command()
def report(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           open_: bool = typer.Option(False, "--open", help="Open the HTML report in a web browser.")):
    """Print the latest evaluation report's path and its Markdown."""
    from batch_infer.evaluate import latest_report

    path = latest_report(_config(config, set_))
    if path is None:
        typer.echo("no evaluation report yet; run: a3gr evaluate", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}\n")
    typer.echo(path.read_text())
    if open_:
        import webbrowser

        webbrowser.open(path.with_suffix(".html").resolve().as_uri())


@pipeline_app.command("run")
def pipeline_run(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 from_: Optional[str] = typer.Option(None, "--from", help="Force this stage and all after it."),
                 only: Optional[List[str]] = typer.Option(None, "--only", help="Run (forced) only these stages."),
                 force: bool = ForceOpt):
    """Run every stage in order; stages whose inputs and config are unchanged are skipped."""
    from a3gr.catalog import table_uri
    from a3gr.lake import Lake
    from a3gr.pipeline import select_stages
    from batch_infer.evaluate import latest_report

    cfg = _config(config, set_)
    try:
        stages = select_stages(from_, only)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    forced = set(stages) if (from_ or only or force) else set()
    records = _run_pipeline(cfg, stages, forced)
    ok = _summarize(records)
    lake = Lake.from_config(cfg)
    if lake.exists("recommendations"):
        typer.echo(f"recommendations: {table_uri(cfg.lake.root, 'recommendations')} (v{lake.version('recommendations')})")
    report_path = latest_report(cfg)
    if report_path is not None:
        typer.echo(f"evaluation report: {report_path}")
    opts = f"{' -c ' + config if config else ''}"
    typer.echo(f"every table: a3gr tables{opts}; check them: a3gr validate{opts}; run history: a3gr runs{opts}")
    if not ok:
        raise typer.Exit(1)


@app.command()
def validate(tables: Optional[List[str]] = typer.Argument(None, help="Tables to validate (default: all written)."),
             config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             version: Optional[int] = typer.Option(None, help="Validate this Delta version (one table only).")):
    """Run the expectation suite of each table on demand; exits 1 if any fails."""
    from a3gr.catalog import CATALOG
    from a3gr.lake import Lake
    from a3gr.validation import validate_stored

    cfg = _config(config, set_)
    lake = Lake.from_config(cfg)
    names = tables or [t for t in CATALOG if lake.exists(t)]
    if not names:
        typer.echo(f"no tables under {cfg.lake.root}", err=True)
        raise typer.Exit(1)
    ok = True
    for name in names:
        report = validate_stored(lake, cfg, name, version=version)
        typer.echo(report.summary())
        ok &= report.success
    raise typer.Exit(0 if ok else 1)


@app.command()
def runs(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
         job: Optional[str] = typer.Option(None, help="Only this job."),
         limit: int = typer.Option(20, help="How many recent runs.")):
    """List recent runs: status, duration, input and output versions."""
    from a3gr.lake import Lake
    from a3gr.runs import list_runs

    cfg = _config(config, set_)
    listed = list_runs(Lake.from_config(cfg), job, limit)
    if not listed:
        typer.echo(f"no runs recorded under {cfg.lake.root}")
        return
    typer.echo(f"{'started (UTC)':<21}{'job':<16}{'status':<10}{'duration':>9}  run id")
    for r in listed:
        took = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        typer.echo(f"{r.started_at:%Y-%m-%d %H:%M:%S}  {r.job:<16}{r.status:<10}{took:>9}  {r.run_id}")
        inputs = [f"{k.removeprefix('table:')}@{_version(v)}" if k.startswith("table:") else
                  f"{k.removeprefix('file:')}={str(v).removeprefix('sha256:')[:8]}" for k, v in r.inputs.items()]
        outputs = [f"{t}@{_version(v)}" for t, v in r.outputs.items()]
        for label, items in (("in", inputs), ("out", outputs)):
            if items:
                typer.echo(textwrap.fill(" ".join(items), WIDTH, initial_indent=f"    {label + ':':<5}",
                                         subsequent_indent=" " * 9, break_on_hyphens=False,
                                         break_long_words=False))
        if r.status in ("failed", "skipped") and r.message:
            typer.echo(_fit(f"    {r.message.splitlines()[0]}"))


@app.command()
def tables(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """List the catalog: each table's layer, location, current version and row count."""
    from a3gr.catalog import CATALOG
    from a3gr.lake import Lake

    cfg = _config(config, set_)
    lake = Lake.from_config(cfg)
    for name, spec in CATALOG.items():
        if lake.exists(name):
            table = lake.table(name)
            rows = table.to_pyarrow_dataset().count_rows()
            state = f"v{table.version()}  {rows} rows"
        else:
            state = "(not written)"
        typer.echo(f"{spec.layer:<7} {name:<17} {state:<22} {lake.uri(name)}")


@config_app.command("show")
def config_show(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                reference: bool = typer.Option(False, help="Print every key with its default and help.")):
    """Print the merged config (defaults < preset < --set) as JSON, or the configuration reference."""
    if reference:
        for key, default, help_text in field_help():
            typer.echo(f"{key} = {default}\n    {help_text}")
        return
    typer.echo(json.dumps(config_to_dict(_config(config, set_)), indent=2))


