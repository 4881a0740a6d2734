"""The whole pipeline on the embedded synthetic default (scaled down): ETL to evaluation, then the
incremental runs: nothing changed, one raw file changed, and a failing suite."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from a3gr.catalog import CATALOG
from a3gr.config import load_config
from a3gr.lake import Lake
from a3gr.pipeline import STAGES, run_pipeline
from a3gr.scid import is_valid_scid
from a3gr.stage_graph import downstream
from a3gr.validation import validate_stored

pytestmark = pytest.mark.integration

OVERRIDES = [
    "source.synthetic.n_users=200", "source.synthetic.n_items=100",
    "spark.shuffle_partitions=2", "tokenize.collaborative.epochs=3", "tokenize.sc.phase1_max_epochs=2",
    "tokenize.sc.phase2_epochs=2", "tokenize.item_rq.codebook_size=8", "tokenize.user_rq.codebook_size=8",
    "train.instructions.max_per_user=1", "train.backbone.vocab_size=400", "train.backbone.hidden_size=32",
    "train.backbone.num_layers=2", "train.backbone.num_heads=2", "train.backbone.num_kv_heads=1",
    "train.backbone.intermediate_size=64", "train.backbone.max_seq_len=160", "train.sft.epochs=1",
    "train.sft.eval_every=1000", "train.sft.val_users=50", "train.sft.val_beam=10", "train.dpo.max_prompts=40",
    "train.dpo.n_rejected=4", "train.dpo.candidates=12", "infer.beam=10", "infer.top_k=10",
    "eval.ks=[5,10,20]", "eval.paper_beam=10"]
RENAMED = " Mk II"  # appended to one item's title in the changed metadata file
# `a3gr` with item_semantic's suite replaced by one that every row fails (run as a script file: under
# `python -c` pyspark's connect module takes the process for a doctest run and exits)
CLI_WITH_FAILING_SUITE = """
from expectations import suites

suites.RULES["item_semantic"] = lambda context: suites.TableRules([suites.between("item_id", max_value=-1)])
from a3gr.cli import app

app(prog_name="a3gr")
"""


def generate_with_one_title_changed(generate, item_key: str):
    """The synthetic generator, then one edit to the metadata file it wrote: the title of `item_key`.

    The generator rewrites its files on every ingest, so the edit follows each generation, as a
    changed upstream file would.
    """
    def generate_and_edit(out_dir, cfg, seed):
        paths = generate(out_dir, cfg, seed)
        with open(paths["meta_path"], encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        (edited,) = [r for r in records if r["asin"] == item_key]
        edited["title"] += RENAMED
        with open(paths["meta_path"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return paths

    return generate_and_edit


@pytest.mark.timeout(1800)  # two full runs, a partial one and a skipped one on 2 cores
def test_embedded_pipeline_end_to_end_and_incremental(spark, ray_session, tmp_path, monkeypatch):
    overrides = [f"lake.root={tmp_path / 'lake'}", *OVERRIDES]
    cfg = load_config("configs/embedded.yaml", overrides)
    stages = list(STAGES)
    first = run_pipeline(cfg, stages)
    assert [r.status for r in first] == ["succeeded"] * len(stages)

    lake = Lake.from_config(cfg)
    written = [t for t in CATALOG if lake.exists(t)]
    assert {"item_embeddings", "user_embeddings", "item_scid", "user_scid", "user_features"} <= set(written)
    for table in written:
        report = validate_stored(lake, cfg, table)
        assert report.success, report.summary()
    assert {"sft_examples", "preference_pairs", "recommendations", "eval_metrics"} <= set(written)
    models = set(lake.read_pandas("models")["name"])
    assert {"sft", "dpo", "dpo_sp_easy", "dpo_rf_hard", "tiger"} <= models
    # every model of eval.models, the TIGER baseline (its own text-only item codes) included, was evaluated
    assert set(lake.read_pandas("eval_metrics")["model"]) == set(cfg.eval.models)
    scids = lake.read_pandas("item_scid")
    assert scids["scid"].is_unique and len(scids) == len(lake.read_pandas("items"))
    assert all(is_valid_scid(s, "item", levels=4) for s in scids["scid"])

    # Nothing changed: every stage skips and no table gets a new version.
    data_tables = [t for t in written if t != "runs"]  # the run log records the skips, nothing else changes
    versions = lake.versions(data_tables)
    second = run_pipeline(cfg, stages)
    assert [r.status for r in second] == ["skipped"] * len(stages)
    assert lake.versions(data_tables) == versions

    # One raw file changed (one item's title in the metadata): exactly the stages downstream of the
    # stages whose outputs changed run again; the rest skip.
    import etl.ingest

    items = lake.read_pandas("items")
    item_key = items.loc[items["text_source"] == "metadata", "item_key"].iloc[0]
    monkeypatch.setattr(etl.ingest, "generate_synthetic",
                        generate_with_one_title_changed(etl.ingest.generate_synthetic, item_key))
    third = run_pipeline(cfg, stages)
    status = {r.job: r.status for r in third}
    ran = {s for s, st in status.items() if st == "succeeded"}
    assert ran | {s for s, st in status.items() if st == "skipped"} == set(stages), status
    after = lake.versions(data_tables)
    changed = {t for t in data_tables if after[t] != versions[t]}
    # a stage runs when its raw input file or a table it reads changed; identical outputs are not
    # re-committed, so the change stops where the data stops changing
    expected = {"ingest"} | {s for s in stages if changed & set(STAGES[s][1])}
    assert ran == expected, status
    assert {"raw_items", "items", "item_semantic", "item_scid", "sft_examples", "recommendations"} <= changed
    assert not {"raw_interactions", "interactions", "feedback", "user_features"} & changed
    assert {"ingest", "features", "semantic", "assign_scid", "instructions", "infer", "evaluate"} <= ran
    assert {"interactions", "feedback", "collaborative"} <= {s for s, st in status.items() if st == "skipped"}
    for table in ("raw_items", "items"):
        titles = lake.read_pandas(table).set_index("item_key")["title"]
        assert titles[item_key].endswith(RENAMED) and titles.str.endswith(RENAMED).sum() == 1

    # A failing expectation suite: the stage fails with the suite's report, the stages downstream of it
    # do not run, an independent one still does, and the command exits non-zero. A new encoder setting
    # makes semantic re-embed every text (with identical texts and encoder it keeps its tables as they are).
    semantic_version = lake.version("item_semantic")
    args = ["pipeline", "run", "-c", "configs/embedded.yaml", "--from", "semantic"]
    sets = [*overrides, "tokenize.semantic.max_seq_length=128"]
    cli = tmp_path / "a3gr_with_failing_suite.py"
    cli.write_text(CLI_WITH_FAILING_SUITE)
    result = subprocess.run([sys.executable, str(cli), *args, *[a for o in sets for a in ("--set", o)]],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "stage 'semantic' failed" in result.stdout, result.stdout
    assert "expect_column_values_to_be_between: item_id" in result.stdout, result.stdout
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in STAGES}
    assert rows == {"semantic": "failed", "collaborative": "succeeded",
                    **{s: "blocked" for s in downstream("semantic")}}, result.stdout
    assert lake.version("item_semantic") == semantic_version
    assert "recommendations:" in result.stdout and "evaluation report:" in result.stdout
