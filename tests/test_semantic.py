"""Semantic encoder job: incremental planning (pure), the bundled model, a local HF encoder, the job on a tiny lake."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from a3gr.config import PipelineConfig
from a3gr.lake import Lake
from tokenize_jobs.semantic import (
    TextEncoder,
    embed_texts,
    plan_embedding,
    resolve_model_dir,
    text_hash,
)


def _previous(rows: list[tuple[int, str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"id": [r[0] for r in rows], "text_hash": [text_hash(r[1]) for r in rows],
                         "vector": [np.full(3, r[0], dtype=np.float32) for r in rows],
                         "model": [r[2] for r in rows]})


def test_plan_embedding_reuses_unchanged_embeds_changed_and_new_drops_removed():
    previous = _previous([(1, "same", "m"), (2, "old text", "m"), (3, "removed", "m"), (4, "same too", "old-model")])
    current = pd.DataFrame({"id": [1, 2, 4, 5], "text": ["same", "new text", "same too", "brand new"]})

    to_embed, reused = plan_embedding(current, previous, "m")

    assert reused["id"].tolist() == [1]
    assert reused["vector"].iloc[0].tolist() == [1.0, 1.0, 1.0]
    assert sorted(to_embed["id"]) == [2, 4, 5]  # changed text, changed model, new id
    assert to_embed.set_index("id").loc[2, "text_hash"] == text_hash("new text")
    assert 3 not in set(to_embed["id"]) | set(reused["id"])


def test_plan_embedding_first_run_embeds_everything_and_rejects_duplicate_ids():
    current = pd.DataFrame({"id": [7, 8], "text": ["a", "b"]})
    to_embed, reused = plan_embedding(current, None, "m")
    assert to_embed["id"].tolist() == [7, 8] and reused.empty
    with pytest.raises(ValueError, match="duplicate ids"):
        plan_embedding(pd.DataFrame({"id": [7, 7], "text": ["a", "b"]}), None, "m")


@pytest.fixture(scope="module")
def bundled_dir():
    return resolve_model_dir(PipelineConfig())


@pytest.mark.integration
def test_bundled_model_gives_unit_vectors_that_rank_related_texts_closer(bundled_dir):
    assert resolve_model_dir(PipelineConfig()) == bundled_dir  # extracted once, then reused
    encoder = TextEncoder(str(bundled_dir), max_seq_length=256, torch_threads=1)
    out = encoder({"text": np.array(["electric guitar strings", "guitar strings set", "microphone stand"])})
    vectors = out["vector"]
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


@pytest.mark.integration
def test_local_hf_encoder_without_modules_json_runs_on_ray(tmp_path, bundled_dir, ray_session):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_dir))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model_dir = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = PipelineConfig()
    cfg.tokenize.semantic.model_dir = str(model_dir)
    cfg.tokenize.semantic.batch_size = 2

    texts = ["a long text " * 40, "guitar", "drum sticks", "piano", "violin bow"]  # the first exceeds 64 tokens
    vectors = embed_texts(pd.DataFrame({"text": texts}), cfg)

    assert vectors.shape == (5, 48)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # input order survives batching across blocks
    direct = TextEncoder(str(model_dir), max_seq_length=256, torch_threads=1).encode(texts)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)


def _items(texts: list[str]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame({"item_id": np.arange(n, dtype=np.int64), "item_key": [f"i{i}" for i in range(n)],
                         "title": texts, "brand": None, "categories": [["Instruments"]] * n, "description": None,
                         "text": texts, "text_source": "metadata"})


def _users(texts: list[str]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame({"user_id": np.arange(n, dtype=np.int64), "user_key": [f"u{i}" for i in range(n)],
                         "profile_text": texts, "profile_items": [[0, 1]] * n})


@pytest.mark.integration
def test_job_skips_when_unchanged_and_reembeds_only_changed_text(lake_root, ray_session):
    from tokenize_jobs.semantic import run

    lake = Lake(lake_root)
    item_texts = ["electric guitar strings", "microphone stand", "drum sticks maple"]
    lake.write_arrow("items", _items(item_texts))
    lake.write_arrow("users", _users(["likes guitars and amps", "plays drums"]))
    cfg = PipelineConfig()
    cfg.lake.root = lake_root

    first = run(cfg)
    assert first.status == "succeeded"
    assert first.row_counts["item_semantic_embedded"] == 3 and first.row_counts["user_semantic_embedded"] == 2
    before = lake.read_pandas("item_semantic").set_index("item_id")
    assert len(before.loc[0, "vector"]) == 384

    assert run(cfg).status == "skipped"

    lake.write_arrow("items", _items(["electric guitar strings", "boom microphone stand", "drum sticks maple"]))
    user_version = lake.version("user_semantic")
    third = run(cfg)
    assert third.status == "succeeded"
    assert (third.row_counts["item_semantic_embedded"], third.row_counts["item_semantic_reused"]) == (1, 2)
    assert third.row_counts["user_semantic_embedded"] == 0
    assert lake.version("user_semantic") == user_version  # unchanged users: not rewritten
    after = lake.read_pandas("item_semantic").set_index("item_id")
    for item in (0, 2):
        assert after.loc[item, "vector"].tobytes() == before.loc[item, "vector"].tobytes()
    assert after.loc[1, "text_hash"] == text_hash("boom microphone stand")
    assert after.loc[1, "vector"].tobytes() != before.loc[1, "vector"].tobytes()
