"""The table catalog: logical table name -> location under the lake root, schema and keys.

One schema per table; every writer enforces it, so a stage can rely on what it reads.
Timestamps are UTC microseconds (Delta protocol (1,2) readers accept them everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    name: str
    layer: str
    schema: pa.Schema
    keys: tuple[str, ...] = ()
    partition_by: tuple[str, ...] = ()
    description: str = ""


def _s(*fields: tuple) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=nl) for n, t, nl in fields])


_SPECS = [
    TableSpec("raw_interactions", "bronze", _s(
        ("source", pa.string(), False), ("user_key", pa.string(), False), ("item_key", pa.string(), False),
        ("ts", TS, True), ("position", pa.int64(), True), ("rating", pa.float64(), True),
        ("review_text", pa.string(), True), ("summary", pa.string(), True), ("ingest_run_id", pa.string(), False),
    ), keys=("source", "user_key", "item_key"), description="Accepted raw interactions, one per (user, item)."),
    TableSpec("raw_items", "bronze", _s(
        ("source", pa.string(), False), ("item_key", pa.string(), False), ("title", pa.string(), True),
        ("description", pa.string(), True), ("brand", pa.string(), True),
        ("categories", pa.list_(pa.string()), True), ("ingest_run_id", pa.string(), False),
    ), keys=("source", "item_key"), description="Item metadata as ingested (HTML unescaped)."),
    TableSpec("raw_users", "bronze", _s(
        ("source", pa.string(), False), ("user_key", pa.string(), False), ("user_name", pa.string(), True),
        ("ingest_run_id", pa.string(), False),
    ), keys=("source", "user_key"), description="User records as ingested."),
    TableSpec("quarantine", "bronze", _s(
        ("source", pa.string(), False), ("record", pa.string(), True), ("reason", pa.string(), False),
        ("ingest_run_id", pa.string(), False),
    ), description="Rejected raw records with the reason; never silently dropped."),
    TableSpec("id_map", "silver", _s(
        ("kind", pa.string(), False), ("key", pa.string(), False), ("id", pa.int64(), False),
    ), keys=("kind", "key"), description="Stable integer ids for user and item keys, kept across runs."),
    TableSpec("interactions", "silver", _s(
        ("user_id", pa.int64(), False), ("item_id", pa.int64(), False), ("ts", TS, True),
        ("position", pa.int64(), False), ("rating", pa.float64(), True), ("split", pa.string(), False),
    ), keys=("user_id", "item_id"), description="k-core filtered interactions in order with a leave-one-out split."),
    TableSpec("feedback", "silver", _s(
        ("user_id", pa.int64(), False), ("item_id", pa.int64(), False), ("split", pa.string(), False),
        ("rating", pa.float64(), True), ("sentiment", pa.float64(), True), ("label", pa.string(), True),
        ("labeler", pa.string(), True),
    ), keys=("user_id", "item_id"), description="Feedback level per interaction: disliked / neutral / liked."),
    TableSpec("items", "silver", _s(
        ("item_id", pa.int64(), False), ("item_key", pa.string(), False), ("title", pa.string(), True),
        ("brand", pa.string(), True), ("categories", pa.list_(pa.string()), True),
        ("description", pa.string(), True), ("text", pa.string(), False), ("text_source", pa.string(), False),
    ), keys=("item_id",), description="Clean item text for the semantic encoder."),
    TableSpec("users", "silver", _s(
        ("user_id", pa.int64(), False), ("user_key", pa.string(), False), ("profile_text", pa.string(), False),
        ("profile_items", pa.list_(pa.int64()), False),
    ), keys=("user_id",), description="User profile text built from the training history only (profile_items: "
                                      "the items it was built from, so leakage is checkable)."),
    TableSpec("item_features", "gold", _s(
        ("item_id", pa.int64(), False), ("text", pa.string(), False), ("n_train", pa.int64(), False),
        ("n_users", pa.int64(), False), ("popularity", pa.float64(), False), ("avg_rating", pa.float64(), True),
    ), keys=("item_id",), description="Semantic text and collaborative statistics per item (training split)."),
    TableSpec("user_features", "gold", _s(
        ("user_id", pa.int64(), False), ("history", pa.list_(pa.int64()), False),
        ("history_len", pa.int64(), False), ("n_train", pa.int64(), False), ("avg_rating", pa.float64(), True),
        ("valid_item", pa.int64(), False), ("test_item", pa.int64(), False),
    ), keys=("user_id",), description="Training history (<= max_history, oldest first) and held-out targets."),
    TableSpec("item_semantic", "tokens", _s(
        ("item_id", pa.int64(), False), ("text_hash", pa.string(), False), ("vector", pa.list_(pa.float32()), False),
        ("model", pa.string(), False),
    ), keys=("item_id",), description="Semantic vector of each item's text (re-embedded only when the text changes)."),
    TableSpec("user_semantic", "tokens", _s(
        ("user_id", pa.int64(), False), ("text_hash", pa.string(), False), ("vector", pa.list_(pa.float32()), False),
        ("model", pa.string(), False),
    ), keys=("user_id",), description="Semantic vector of each user's profile text."),
    TableSpec("item_collab", "tokens", _s(
        ("item_id", pa.int64(), False), ("vector", pa.list_(pa.float32()), False), ("model_version", pa.string(), False),
    ), keys=("item_id",), description="Item vectors of the collaborative (SASRec-style) encoder."),
    TableSpec("user_collab", "tokens", _s(
        ("user_id", pa.int64(), False), ("vector", pa.list_(pa.float32()), False), ("model_version", pa.string(), False),
    ), keys=("user_id",), description="User vectors of the collaborative encoder (from the training history)."),
    TableSpec("item_embeddings", "tokens", _s(
        ("item_id", pa.int64(), False), ("semantic", pa.list_(pa.float32()), False), ("collaborative", pa.list_(pa.float32()), True),
        ("sc", pa.list_(pa.float32()), False), ("model_version", pa.string(), False),
    ), keys=("item_id",), description="Semantic, collaborative and SC vectors per item."),
    TableSpec("user_embeddings", "tokens", _s(
        ("user_id", pa.int64(), False), ("semantic", pa.list_(pa.float32()), False), ("collaborative", pa.list_(pa.float32()), True),
        ("sc", pa.list_(pa.float32()), False), ("model_version", pa.string(), False),
    ), keys=("user_id",), description="Semantic, collaborative and SC vectors per user."),
    TableSpec("item_scid", "tokens", _s(
        ("item_id", pa.int64(), False), ("codes", pa.list_(pa.int32()), False), ("scid", pa.string(), False),
        ("tokenizer_version", pa.string(), False),
    ), keys=("item_id",), description="Item SCID: 3 RQ-VAE codes plus a 4th that makes every item unique."),
    TableSpec("user_scid", "tokens", _s(
        ("user_id", pa.int64(), False), ("codes", pa.list_(pa.int32()), False), ("scid", pa.string(), False),
        ("tokenizer_version", pa.string(), False),
    ), keys=("user_id",), description="User SCID (own token namespace; users may share one)."),
    TableSpec("sft_examples", "train", _s(
        ("example_id", pa.string(), False), ("task", pa.string(), False), ("template", pa.int64(), False),
        ("user_id", pa.int64(), False), ("prompt", pa.string(), False), ("response", pa.string(), False),
        ("target_item", pa.int64(), True), ("item_ids", pa.list_(pa.int64()), False), ("split", pa.string(), False),
    ), keys=("example_id",), description="Multi-task instructions (SEQ, C1-C3, B1, B2) with the user's SCID in every "
                                         "prompt; item_ids lists every item a row mentions, so leakage is checkable."),
    TableSpec("preference_pairs", "train", _s(
        ("pair_id", pa.string(), False), ("stage", pa.string(), False), ("user_id", pa.int64(), False),
        ("prompt", pa.string(), False), ("chosen_item", pa.int64(), False), ("chosen", pa.string(), False),
        ("rejected_items", pa.list_(pa.int64()), False), ("rejected", pa.list_(pa.string()), False),
        ("rejected_sources", pa.list_(pa.string()), False), ("model_version", pa.string(), False),
    ), keys=("pair_id",), description="One chosen vs N rejected item SCIDs per prompt, by DPO stage "
                                      "(sp_easy/medium/hard, rf_easy/hard); rejected_sources says where each came from."),
    TableSpec("recommendations", "serve", _s(
        ("run_date", pa.date32(), False), ("user_id", pa.int64(), False), ("rank", pa.int32(), False),
        ("item_id", pa.int64(), False), ("scid", pa.string(), False), ("score", pa.float64(), False),
        ("model_version", pa.string(), False),
    ), keys=("run_date", "user_id", "rank"), partition_by=("run_date",),
        description="Nightly top-K items per user, one partition per run date (readers see a whole night or none)."),
    TableSpec("eval_metrics", "serve", _s(
        ("run_id", pa.string(), False), ("model", pa.string(), False), ("dataset", pa.string(), False),
        ("split", pa.string(), False), ("metric", pa.string(), False), ("k", pa.int32(), True),
        ("value", pa.float64(), False),
    ), keys=("run_id", "model", "split", "metric", "k"),
        description="Offline metrics per evaluation run and model: recall/ndcg@K, invalid and duplicate rates, coverage."),
    TableSpec("models", "ops", _s(
        ("name", pa.string(), False), ("version", pa.string(), False), ("kind", pa.string(), False),
        ("path", pa.string(), False), ("run_id", pa.string(), False), ("created_at", TS, False),
        ("metrics", pa.string(), True), ("config_hash", pa.string(), False),
    ), keys=("name", "version"), description="Registered model artifacts (path, metrics, the run that made them)."),
    TableSpec("runs", "ops", _s(
        ("run_id", pa.string(), False), ("job", pa.string(), False), ("status", pa.string(), False),
        ("config_hash", pa.string(), False), ("code_version", pa.string(), False),
        ("started_at", TS, False), ("ended_at", TS, True), ("duration_s", pa.float64(), True),
        ("inputs", pa.string(), True), ("outputs", pa.string(), True), ("row_counts", pa.string(), True),
        ("message", pa.string(), True), ("config", pa.string(), True),
    ), keys=("run_id",), description="One record per job run: versions in and out, counts, status."),
]

CATALOG: dict[str, TableSpec] = {s.name: s for s in _SPECS}


class UnknownTableError(KeyError):
    pass


def spec(name: str) -> TableSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownTableError(f"unknown table '{name}'; known tables: {', '.join(sorted(CATALOG))}") from None


def table_uri(lake_root: str, name: str) -> str:
    """Location of a table: <root>/<layer>/<name> (root may be a local dir or an object-store URI)."""
    s = spec(name)
    return f"{lake_root.rstrip('/')}/{s.layer}/{s.name}"
