"""The whole pipeline on the embedded synthetic default (scaled down): ETL to evaluation."""
from __future__ import annotations

import pytest

from a3gr.catalog import CATALOG
from a3gr.config import load_config
from a3gr.lake import Lake
from a3gr.pipeline import STAGES, run_pipeline
from a3gr.scid import is_valid_scid
from a3gr.validation import validate_stored

pytestmark = pytest.mark.integration


def test_embedded_pipeline_writes_valid_tables_and_a_second_run_skips_everything(spark, ray_session, tmp_path):
    cfg = load_config("configs/embedded.yaml", [
        f"lake.root={tmp_path / 'lake'}", "source.synthetic.n_users=200", "source.synthetic.n_items=100",
        "spark.shuffle_partitions=2", "tokenize.collaborative.epochs=3", "tokenize.sc.phase1_max_epochs=2",
        "tokenize.sc.phase2_epochs=2", "tokenize.item_rq.codebook_size=8", "tokenize.user_rq.codebook_size=8",
        "train.instructions.max_per_user=1", "train.backbone.vocab_size=400", "train.backbone.hidden_size=32",
        "train.backbone.num_layers=2", "train.backbone.num_heads=2", "train.backbone.num_kv_heads=1",
        "train.backbone.intermediate_size=64", "train.backbone.max_seq_len=160", "train.sft.epochs=1",
        "train.sft.eval_every=1000", "train.sft.val_users=50", "train.sft.val_beam=10", "train.dpo.max_prompts=40",
        "train.dpo.n_rejected=4", "train.dpo.candidates=12", "infer.beam=10", "infer.top_k=10",
        "eval.ks=[5,10,20]", "eval.paper_beam=10"])
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
    assert {"sft", "dpo", "dpo_sp_easy", "dpo_rf_hard"} <= models
    scids = lake.read_pandas("item_scid")
    assert scids["scid"].is_unique and len(scids) == len(lake.read_pandas("items"))
    assert all(is_valid_scid(s, "item", levels=4) for s in scids["scid"])

    data_tables = [t for t in written if t != "runs"]  # the run log records the skips, nothing else changes
    versions = lake.versions(data_tables)
    second = run_pipeline(cfg, stages)
    assert [r.status for r in second] == ["skipped"] * len(stages)
    assert lake.versions(data_tables) == versions
