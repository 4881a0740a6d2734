"""Synthetic raw files: deterministic, structured like a real catalogue, readable by the extractor."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from a3gr.config import ETLConfig, SyntheticConfig
from etl.sources import read_amazon, split_categories
from etl.synthetic import generate_synthetic


def _load(paths: dict[str, str]) -> tuple[list[dict], list[dict], dict]:
    reviews = [json.loads(line) for line in Path(paths["reviews_path"]).read_text().splitlines()]
    meta = [json.loads(line) for line in Path(paths["meta_path"]).read_text().splitlines()]
    return reviews, meta, json.loads(Path(paths["truth_path"]).read_text())


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cfg = SyntheticConfig()
    paths = generate_synthetic(str(tmp_path_factory.mktemp("synthetic")), cfg, seed=7)
    return cfg, paths, *_load(paths)


def _bytes(paths: dict[str, str]) -> dict[str, bytes]:
    return {k: Path(p).read_bytes() for k, p in paths.items()}


def test_same_seed_same_bytes_and_rewrite_is_idempotent(tmp_path, generated):
    cfg, paths = generated[0], generated[1]
    again = generate_synthetic(str(tmp_path / "a"), cfg, seed=7)
    assert _bytes(again) == _bytes(paths)
    assert _bytes(generate_synthetic(str(tmp_path / "a"), cfg, seed=7)) == _bytes(paths)  # rewrite in place
    other = generate_synthetic(str(tmp_path / "b"), cfg, seed=8)
    assert _bytes(other)["reviews_path"] != _bytes(paths)["reviews_path"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["meta.jsonl", "reviews.jsonl", "truth.json"]


def test_default_size_is_fast(tmp_path):
    start = time.perf_counter()
    generate_synthetic(str(tmp_path), SyntheticConfig(), seed=1)
    assert time.perf_counter() - start < 1.0


def test_rejects_impossible_config(tmp_path):
    with pytest.raises(ValueError, match="min_len"):
        generate_synthetic(str(tmp_path), SyntheticConfig(min_len=30, max_len=20), seed=1)
    with pytest.raises(ValueError, match="rating_fraction"):
        generate_synthetic(str(tmp_path), SyntheticConfig(rating_fraction=1.5), seed=1)


def test_users_concentrate_on_few_clusters(generated):
    _, _, reviews, _, truth = generated
    cluster = truth["item_cluster"]
    per_user: dict[str, list[int]] = {}
    for r in reviews:
        per_user.setdefault(r["reviewerID"], []).append(cluster[r["asin"]])

    def top_share(assign) -> float:
        return float(np.mean([Counter(assign(cs)).most_common(1)[0][1] / len(cs) for cs in per_user.values()]))

    rng = np.random.default_rng(0)
    n_clusters = len(truth["clusters"])
    observed = top_share(lambda cs: cs)
    shuffled = top_share(lambda cs: rng.integers(n_clusters, size=len(cs)).tolist())
    assert observed > 0.6 and observed > 2 * shuffled
    in_taste = np.mean([cluster[r["asin"]] in truth["user_clusters"][r["reviewerID"]] for r in reviews])
    assert in_taste > 0.75
    # sequential signal: consecutive items share a cluster far more often than chance
    same_next = np.mean([a == b for cs in per_user.values() for a, b in zip(cs, cs[1:])])
    assert same_next > 0.5


def test_ratings_follow_taste_and_text_follows_ratings(generated):
    cfg, _, reviews, _, truth = generated
    match, mismatch = [], []
    for r in reviews:
        if "overall" in r:
            in_taste = truth["item_cluster"][r["asin"]] in truth["user_clusters"][r["reviewerID"]]
            (match if in_taste else mismatch).append(r["overall"])
    assert np.mean(match) - np.mean(mismatch) > 1.5
    assert abs(sum("overall" in r for r in reviews) / len(reviews) - cfg.rating_fraction) < 0.03
    assert abs(sum("reviewText" in r for r in reviews) / len(reviews) - cfg.review_fraction) < 0.03

    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    scored = [(r["overall"], vader.polarity_scores(f"{r['summary']}. {r['reviewText']}")["compound"])
              for r in reviews[:1500] if "overall" in r and "reviewText" in r]
    stars, compound = np.array(scored).T
    assert np.corrcoef(stars, compound)[0, 1] > 0.7


def test_metadata_reflects_clusters_and_coverage(generated):
    cfg, _, reviews, meta, truth = generated
    assert abs(len(meta) / cfg.n_items - cfg.metadata_fraction) < 0.07
    for m in meta:
        assert set(m) == {"asin", "title", "description", "brand", "categories"}
        assert split_categories(m["categories"])[1] == truth["clusters"][truth["item_cluster"][m["asin"]]]
    brands_per_cluster: dict[int, set[str]] = {}
    for m in meta:
        brands_per_cluster.setdefault(truth["item_cluster"][m["asin"]], set()).add(m["brand"])
    all_brands = [b for bs in brands_per_cluster.values() for b in bs]
    assert len(all_brands) == len(set(all_brands))  # no brand shared across clusters


def test_most_users_survive_a_five_core(generated):
    _, _, reviews, _, _ = generated
    pairs = {(r["reviewerID"], r["asin"]) for r in reviews}
    while True:
        users = Counter(u for u, _ in pairs)
        items = Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= 5 and items[i] >= 5}
        if kept == pairs:
            break
        pairs = kept
    assert len({u for u, _ in pairs}) >= 0.9 * len({r["reviewerID"] for r in reviews})


def test_extractor_accepts_every_synthetic_record(spark, generated):
    cfg, paths, reviews, meta, _ = generated
    frames = read_amazon(spark, paths["reviews_path"], paths["meta_path"], "run-syn", ETLConfig(), source="synthetic")
    try:
        c = frames.counts
        assert c["reviews_quarantined"] == 0 and c["meta_quarantined"] == 0
        assert (c["interactions"], c["users"], c["items_with_metadata"]) == (len(reviews), cfg.n_users, len(meta))
        assert frames.items.filter("title like '%&amp;%' or array_join(categories, '|') like '%&amp;%'").count() == 0
    finally:
        frames.unpersist()
