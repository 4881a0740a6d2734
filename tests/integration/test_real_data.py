"""The ETL on the real Amazon Instruments data reproduces the reference figures (needs ../shared/data)."""
from __future__ import annotations

import pytest

from a3gr.config import load_config
from a3gr.lake import Lake
from a3gr.pipeline import ETL_STAGES, run_pipeline
from a3gr.validation import validate_stored
from conftest import shared_data

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def figures(lake: Lake) -> dict:
    inter = lake.read_pandas("interactions", columns=["user_id", "item_id", "split", "rating"])
    items = lake.read_pandas("items", columns=["text_source"])
    return {"users": inter["user_id"].nunique(), "items": inter["item_id"].nunique(), "interactions": len(inter),
            "valid": int((inter["split"] == "valid").sum()), "test": int((inter["split"] == "test").sum()),
            "with_metadata": int((items["text_source"] == "metadata").sum()),
            "rated": int(inter["rating"].notna().sum())}


def test_instruments_full_etl_reproduces_the_reference_figures(spark, tmp_path):
    data = shared_data("instruments")
    reviews = shared_data("amazon14_musical_instruments", "reviews_Musical_Instruments_5.csv.gz")
    cfg = load_config("configs/paper.yaml", [f"lake.root={tmp_path / 'lake'}", f"source.lcrec_dir={data}",
                                             f"source.meta_path={data / 'meta_Musical_Instruments.jsonl'}",
                                             f"source.reviews_path={reviews}"])
    records = run_pipeline(cfg, list(ETL_STAGES))
    assert [r.status for r in records] == ["succeeded"] * 4
    lake = Lake.from_config(cfg)
    got = figures(lake)
    assert {k: got[k] for k in ("users", "items", "interactions", "valid", "test", "with_metadata")} == {
        "users": 24772, "items": 9922, "interactions": 206153, "valid": 24772, "test": 24772,
        "with_metadata": 6250}
    assert 6100 <= got["rated"] <= 6250, got["rated"]
    for table in ("interactions", "feedback", "items", "users", "item_features", "user_features", "id_map"):
        report = validate_stored(lake, cfg, table)
        assert report.success, report.summary()


def test_instruments_mql4grec_reproduces_the_reference_figures(spark, tmp_path):
    data = shared_data("instruments_mql4grec")
    cfg = load_config("configs/paper.yaml", [f"lake.root={tmp_path / 'lake'}", f"source.lcrec_dir={data}",
                                             "source.meta_path=", "source.reviews_path="])
    records = run_pipeline(cfg, ["ingest", "interactions", "feedback", "features"])
    assert [r.status for r in records] == ["succeeded"] * 4
    got = figures(Lake.from_config(cfg))
    assert (got["users"], got["items"], got["interactions"]) == (17112, 6250, 136226)
    assert got["with_metadata"] == 6250
