"""Extract: raw Amazon and LC-Rec files -> bronze DataFrames (no lake I/O here).

Every raw record ends up in exactly one place: an accepted bronze row or a `quarantine` row
with a reason, so `<file>_read == <file>_accepted + <file>_quarantined` holds for each file
kind in `BronzeFrames.counts`. Review files are read by Spark (`text` for JSON lines, so the
raw line is kept for quarantine; `csv` with multi-line quoting), metadata lines are parsed by
one plain Python function inside a pandas UDF (HTML unescaping and the 2014 loose-JSON format
need Python), and the LC-Rec files, single JSON documents, are parsed on the driver.
"""
from __future__ import annotations

import ast
import gzip
import html
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import pandas as pd
from pyarrow import fs as pafs
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from a3gr.config import ETLConfig
from a3gr.spark import conform, spark_schema

LCREC_SOURCE = "lcrec"
RECORD_MAX_CHARS = 4096  # quarantine keeps this much of a raw record: enough to diagnose it

# Quarantine reasons. A record gets the first one that applies, in this order.
INVALID_UTF8 = "invalid_utf8"  # invalid UTF-8 bytes, or U+FFFD replacement characters, in the line
BAD_JSON = "bad_json"  # not parseable, or not a JSON object
BAD_CSV = "bad_csv"  # wrong number of fields or broken quoting
BAD_RECORD = "bad_record"  # parseable, but the wrong shape (LC-Rec entry, id map line)
MISSING_KEY = "missing_key"  # reviewerID / asin absent or null
EMPTY_KEY = "empty_key"  # reviewerID / asin blank
BAD_RATING = "bad_rating"  # not a finite number
RATING_OUT_OF_RANGE = "rating_out_of_range"  # outside 1..5 stars
MISSING_TIME = "missing_time"  # neither unixReviewTime nor reviewTime
BAD_TIME = "bad_time"  # unparseable, NaN or infinite
IMPLAUSIBLE_TIME = "implausible_time"  # before ETLConfig.min_valid_ts
FUTURE_TIME = "future_time"  # after the moment of extraction
DUPLICATE_KEY = "duplicate_key"  # another record with the same key was kept
UNMAPPED_USER = "unmapped_user"  # LC-Rec user id missing from {name}.user2id
UNMAPPED_ITEM = "unmapped_item"  # LC-Rec item id missing from {name}.item2id

# Amazon review fields (2014 and 2018 releases; the CSV form uses the same column names).
REVIEW_FIELDS = ("reviewerID", "asin", "reviewerName", "overall", "reviewText", "summary",
                 "unixReviewTime", "reviewTime")
REVIEW_TIME_FORMAT = "M d, yyyy"  # reviewTime, e.g. "02 28, 2014" or "3 5, 2013"
JSON_EXTENSIONS = (".json", ".jsonl", ".ndjson")
CSV_EXTENSIONS = (".csv",)
COMPRESSION_EXTENSIONS = (".gz", ".bz2")
# Category names may contain ", " themselves ("Bags, Cases & Covers"); the separator has no space.
CATEGORY_SEPARATOR = re.compile(r",(?! )")

_CORRUPT = "_corrupt_record"
_META_STRUCT = T.StructType([
    T.StructField("reason", T.StringType()), T.StructField("item_key", T.StringType()),
    T.StructField("title", T.StringType()), T.StructField("description", T.StringType()),
    T.StructField("brand", T.StringType()), T.StructField("categories", T.ArrayType(T.StringType())),
    T.StructField("n_truncated", T.LongType()),
])


# --- schema -------------------------------------------------------------------------------

# --- results ------------------------------------------------------------------------------

@dataclass
class BronzeFrames:
    """The four bronze tables of one extraction, and what happened to every raw record.

    The frames are lazy but read from persisted parsed records; call `unpersist()` once they
    are written.
    """
    interactions: DataFrame
    items: DataFrame
    users: DataFrame
    quarantine: DataFrame
    counts: dict[str, int]
    _persisted: list[DataFrame] = field(default_factory=list, repr=False)

    def unpersist(self) -> None:
        for df in self._persisted:
            df.unpersist()
        self._persisted.clear()


# --- small helpers ------------------------------------------------------------------------

def _strip_compression(path: str) -> str:
    lower = path.lower()
    for ext in COMPRESSION_EXTENSIONS:
        if lower.endswith(ext):
            return lower[: -len(ext)]
    return lower


def review_format(path: str) -> str:
    """'json' (JSON lines) or 'csv', from the file extension (compression suffixes allowed)."""
    base = _strip_compression(path)
    if base.endswith(JSON_EXTENSIONS):
        return "json"
    if base.endswith(CSV_EXTENSIONS):
        return "csv"
    raise ValueError(f"reviews file '{path}': unknown format; expected one of "
                     f"{', '.join(JSON_EXTENSIONS + CSV_EXTENSIONS)} (optionally {', '.join(COMPRESSION_EXTENSIONS)})")


def _open_text(path: str) -> TextIO:
    """A small driver-side text file (local path or object-store URI), decompressing .gz."""
    if "://" in path and not path.startswith("file://"):
        filesystem, inner = pafs.FileSystem.from_uri(path)
        raw = filesystem.open_input_stream(inner, compression="detect")
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    local = path.removeprefix("file://")
    if local.endswith(".gz"):
        return gzip.open(local, "rt", encoding="utf-8", errors="replace")
    return open(local, encoding="utf-8", errors="replace")


def _join_path(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _exists(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        filesystem, inner = pafs.FileSystem.from_uri(path)
        return filesystem.get_file_info(inner).type != pafs.FileType.NotFound
    return os.path.exists(path.removeprefix("file://"))


def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed != "", col)


def _truncate(col: Column, max_chars: int) -> tuple[Column, Column]:
    """(the text cut to max_chars, 1 when it was cut else 0)."""
    return F.substring(col, 1, max_chars), F.coalesce((F.length(col) > max_chars).cast("long"), F.lit(0))


def _finite(col: Column) -> Column:
    return ~F.isnan(col) & (F.abs(col) != float("inf"))


def _record_text(col: Column) -> Column:
    return F.substring(col, 1, RECORD_MAX_CHARS)


def _mark_duplicates(df: DataFrame, keys: list[str], order: list[Column]) -> DataFrame:
    """Set reason=duplicate_key on every valid row but the first per key (in `order`)."""
    w = Window.partitionBy(*keys).orderBy(F.col("reason").isNotNull(), *order)
    dup = F.col("reason").isNull() & (F.row_number().over(w) > 1)
    return df.withColumn("reason", F.when(dup, F.lit(DUPLICATE_KEY)).otherwise(F.col("reason")))


def _reason_counts(records: DataFrame) -> Counter:
    """{reason or None: records, '_truncated': fields cut} in one Spark job."""
    rows = records.groupBy("reason").agg(F.count(F.lit(1)).alias("n"), F.sum("n_truncated").alias("t")).collect()
    tally: Counter = Counter()
    for r in rows:
        tally[r["reason"]] += r["n"]
        tally["_truncated"] += r["t"] or 0
    return tally


def _file_counts(prefix: str, tally: Counter) -> dict[str, int]:
    """read / accepted / quarantined (+ per reason, + truncated fields) for one file kind."""
    reasons = {k: v for k, v in tally.items() if k not in (None, "_truncated")}
    out = {f"{prefix}_read": sum(reasons.values()) + tally[None], f"{prefix}_accepted": tally[None],
           f"{prefix}_quarantined": sum(reasons.values())}
    out.update({f"{prefix}_quarantined_{k}": v for k, v in sorted(reasons.items())})
    if tally["_truncated"]:
        out[f"{prefix}_truncated_fields"] = tally["_truncated"]
    return out


def _quarantine(records: DataFrame, source: str, run_id: str) -> DataFrame:
    return conform(records.filter(F.col("reason").isNotNull()).select(
        F.lit(source).alias("source"), _record_text(F.col("record")).alias("record"), "reason",
        F.lit(run_id).alias("ingest_run_id")), "quarantine")


def _local_quarantine(spark: SparkSession, rows: list[tuple[str, str]], source: str, run_id: str) -> DataFrame:
    """Quarantine rows found on the driver: [(record, reason)]."""
    data = [(source, record[:RECORD_MAX_CHARS], reason, run_id) for record, reason in rows]
    return spark.createDataFrame(data, spark_schema("quarantine"))


def _epoch_seconds(value: str) -> float:
    """An ISO date or datetime (UTC unless it says otherwise) as Unix seconds."""
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


# --- reviews ------------------------------------------------------------------------------

def _review_lines_json(spark: SparkSession, path: str) -> DataFrame:
    """JSON lines -> (record, malformed, REVIEW_FIELDS as raw strings); blank lines are not records.

    Spark's text reader keeps the file's bytes; invalid UTF-8 becomes U+FFFD in `record` so the
    check below sees it and the quarantined text is valid everywhere downstream.
    """
    lines = spark.read.text(path).filter(F.trim("value") != "")
    schema = T.StructType([T.StructField(n, T.StringType()) for n in REVIEW_FIELDS]
                          + [T.StructField(_CORRUPT, T.StringType())])
    parsed = F.from_json("record", schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT})
    return lines.select(F.make_valid_utf8("value").alias("record")).select("record", parsed.alias("j")).select(
        "record", (F.col("j").isNull() | F.col(f"j.{_CORRUPT}").isNotNull()).alias("malformed"),
        *(F.col(f"j.{n}").alias(n) for n in REVIEW_FIELDS))


def _review_lines_csv(spark: SparkSession, path: str) -> DataFrame:
    """Quoted CSV with a header (multi-line fields, "" escapes) -> the same shape as JSON lines.

    The record of a well-formed row is its JSON rendering; of a malformed one, its raw text.
    """
    options = {"header": "true", "multiLine": "true", "quote": '"', "escape": '"'}
    columns = spark.read.options(**options).csv(path).columns
    schema = T.StructType([T.StructField(c, T.StringType()) for c in columns]
                          + [T.StructField(_CORRUPT, T.StringType())])
    rows = (spark.read.schema(schema)
            .options(**options, mode="PERMISSIVE", columnNameOfCorruptRecord=_CORRUPT).csv(path))
    as_json = F.to_json(F.struct(*[F.col(f"`{c}`") for c in columns]))
    return rows.select(
        F.coalesce(F.col(_CORRUPT), as_json).alias("record"), F.col(_CORRUPT).isNotNull().alias("malformed"),
        *((F.col(f"`{n}`") if n in columns else F.lit(None).cast("string")).alias(n) for n in REVIEW_FIELDS))


def review_records(spark: SparkSession, path: str, etl: ETLConfig, now: datetime) -> DataFrame:
    """Every review record with its verdict.

    Columns: record, user_key, item_key, user_name, rating, review_text, summary, ts,
    n_truncated, reason (null = accepted). Duplicate (user, item) keep the earliest review.
    """
    fmt = review_format(path)
    raw = _review_lines_json(spark, path) if fmt == "json" else _review_lines_csv(spark, path)
    user_key, item_key = F.trim("reviewerID"), F.trim("asin")
    rating_raw = _blank_to_null(F.col("overall"))
    rating = F.trim(rating_raw).cast("double")
    unix_raw = _blank_to_null(F.col("unixReviewTime"))
    date_seconds = F.unix_timestamp(F.try_to_timestamp(F.trim("reviewTime"), F.lit(REVIEW_TIME_FORMAT)))
    seconds = F.when(unix_raw.isNotNull(), F.trim(unix_raw).cast("double")).otherwise(date_seconds.cast("double"))
    min_seconds, now_seconds = _epoch_seconds(etl.min_valid_ts), now.timestamp()
    reason = (
        F.when(F.col("record").contains("\ufffd"), F.lit(INVALID_UTF8))
        .when(F.col("malformed"), F.lit(BAD_JSON if fmt == "json" else BAD_CSV))
        .when(user_key.isNull() | item_key.isNull(), F.lit(MISSING_KEY))
        .when((user_key == "") | (item_key == ""), F.lit(EMPTY_KEY))
        .when(rating_raw.isNotNull() & (rating.isNull() | ~_finite(rating)), F.lit(BAD_RATING))
        .when(rating_raw.isNotNull() & ~rating.between(1.0, 5.0), F.lit(RATING_OUT_OF_RANGE))
        .when(unix_raw.isNull() & _blank_to_null(F.col("reviewTime")).isNull(), F.lit(MISSING_TIME))
        .when(seconds.isNull() | ~_finite(seconds), F.lit(BAD_TIME))
        .when(seconds < min_seconds, F.lit(IMPLAUSIBLE_TIME))
        .when(seconds > now_seconds, F.lit(FUTURE_TIME)))
    texts = {name: _truncate(_blank_to_null(F.col(src)), etl.max_text_chars)
             for name, src in (("user_name", "reviewerName"), ("review_text", "reviewText"), ("summary", "summary"))}
    records = raw.select(
        "record", user_key.alias("user_key"), item_key.alias("item_key"),
        *(texts[n][0].alias(n) for n in texts),
        rating.alias("rating"), F.timestamp_seconds(seconds).alias("ts"),
        sum((texts[n][1] for n in texts), F.lit(0)).alias("n_truncated"), reason.alias("reason"))
    return _mark_duplicates(records, ["user_key", "item_key"], [F.col("ts"), F.col("record")])


def _users_from_reviews(accepted: DataFrame) -> DataFrame:
    """(user_key, user_name): the name on the user's latest review that has one."""
    latest_named = F.when(F.col("user_name").isNotNull(), F.struct("ts", "item_key"))
    return accepted.groupBy("user_key").agg(F.max_by("user_name", latest_named).alias("user_name"))


# --- metadata -----------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    """A metadata text field: strings as they are, lists (2018 descriptions) joined; unescaped."""
    if value is None:
        return None
    if isinstance(value, list):
        parts = [_text(v) for v in value]
        value = " ".join(p for p in parts if p)
    text = html.unescape(str(value)).strip()
    return text or None


def split_categories(value: Any) -> list[str] | None:
    """Category names, unescaped and in first-seen order, from a comma-joined string (split on
    commas not followed by a space) or a list / list of lists of names (2014 metadata)."""
    if isinstance(value, str):
        names: list[Any] = CATEGORY_SEPARATOR.split(value)
    elif isinstance(value, list):
        names = []
        pending = list(value)
        while pending:
            v = pending.pop(0)
            if isinstance(v, list):
                pending[:0] = v
            else:
                names.append(v)
    else:
        names = [value]
    out: list[str] = []
    for name in names:
        text = _text(name)
        if text and text not in out:
            out.append(text)
    return out or None


def _load_object(line: str) -> Any:
    """JSON, or the 2014 metadata's Python-literal lines ({'asin': '...'}); None when neither."""
    try:
        return json.loads(line)
    except ValueError:
        pass
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def parse_meta_record(line: str, max_chars: int) -> dict[str, Any]:
    """One metadata line -> {reason, item_key, title, description, brand, categories, n_truncated}.

    reason is None for an accepted record. Text fields are HTML-unescaped, blank -> None, and
    cut to max_chars; `category` (2018 raw metadata) stands in for a missing `categories`.
    """
    out: dict[str, Any] = {"reason": None, "item_key": None, "title": None, "description": None,
                           "brand": None, "categories": None, "n_truncated": 0}
    if "\ufffd" in line:
        return {**out, "reason": INVALID_UTF8}
    obj = _load_object(line)
    if not isinstance(obj, dict):
        return {**out, "reason": BAD_JSON}
    key = obj.get("asin")
    if key is None:
        return {**out, "reason": MISSING_KEY}
    key = str(key).strip()
    if not key:
        return {**out, "reason": EMPTY_KEY}
    out["item_key"] = key
    for name in ("title", "description", "brand"):
        text = _text(obj.get(name))
        if text is not None and len(text) > max_chars:
            text = text[:max_chars]
            out["n_truncated"] += 1
        out[name] = text
    categories = obj.get("categories", obj.get("category"))
    out["categories"] = split_categories(categories)
    return out


def meta_records(lines: DataFrame, etl: ETLConfig) -> DataFrame:
    """Metadata lines (column `value`) -> record, item_key, title, description, brand, categories,
    n_truncated, reason. Duplicate asins keep the most complete record (then the smallest text)."""
    max_chars = etl.max_text_chars

    @F.pandas_udf(_META_STRUCT)
    def parse(values: pd.Series) -> pd.DataFrame:
        return pd.DataFrame([parse_meta_record(v, max_chars) for v in values], columns=_META_STRUCT.names)

    parsed = lines.select(F.col("value").alias("record"), parse("value").alias("m")).select("record", "m.*")
    filled = sum((F.col(c).isNotNull().cast("int") for c in ("title", "description", "brand", "categories")),
                 F.lit(0))
    return _mark_duplicates(parsed, ["item_key"], [filled.desc(), F.col("record")])


def _meta_lines(spark: SparkSession, path: str) -> DataFrame:
    return spark.read.text(path).filter(F.trim("value") != "").select(F.make_valid_utf8("value").alias("value"))


# --- assembling the bronze frames ---------------------------------------------------------

def _items_with_metadata(item_keys: DataFrame, meta: DataFrame | None, how: str) -> DataFrame:
    """item_key + metadata columns (null where none) + _has_meta, joining accepted metadata `how`."""
    if meta is None:
        return item_keys.select("item_key", *(F.lit(None).cast(t).alias(c) for c, t in (
            ("title", "string"), ("description", "string"), ("brand", "string"),
            ("categories", "array<string>"), ("_has_meta", "boolean"))))
    described = meta.filter(F.col("reason").isNull()).select(
        "item_key", "title", "description", "brand", "categories", F.lit(True).alias("_has_meta"))
    return item_keys.join(described, "item_key", how)


def _item_counts(items: DataFrame) -> dict[str, int]:
    row = items.agg(F.count(F.lit(1)).alias("n"), F.count(F.when(F.col("_has_meta"), 1)).alias("m")).first()
    return {"items": row["n"], "items_with_metadata": row["m"]}


def _tagged(df: DataFrame, table: str, source: str, run_id: str) -> DataFrame:
    return conform(df.withColumns({"source": F.lit(source), "ingest_run_id": F.lit(run_id)}), table)


# --- Amazon -------------------------------------------------------------------------------

def read_amazon(spark: SparkSession, reviews_path: str, meta_path: str | None, run_id: str, etl: ETLConfig,
                source: str = "amazon") -> BronzeFrames:
    """Amazon reviews (JSON lines 2014/2018 or CSV, optionally .gz) and metadata JSON lines -> bronze.

    raw_items holds every item seen in either file (metadata null where the item has none);
    raw_users one row per reviewer; position is null (the order is the review time).
    """
    now = datetime.now(timezone.utc)
    reviews = review_records(spark, reviews_path, etl, now).persist()
    persisted = [reviews]
    counts = _file_counts("reviews", _reason_counts(reviews))
    accepted = reviews.filter(F.col("reason").isNull())
    interactions = accepted.withColumn("position", F.lit(None).cast("long"))
    users = _users_from_reviews(accepted)
    quarantine = _quarantine(reviews, source, run_id)

    meta = None
    if meta_path:
        meta = meta_records(_meta_lines(spark, meta_path), etl).persist()
        persisted.append(meta)
        counts.update(_file_counts("meta", _reason_counts(meta)))
        quarantine = quarantine.unionByName(_quarantine(meta, source, run_id))
    items = _items_with_metadata(accepted.select("item_key").distinct(), meta, "full")
    counts.update(interactions=counts["reviews_accepted"], users=users.count(), **_item_counts(items))
    return BronzeFrames(_tagged(interactions, "raw_interactions", source, run_id),
                        _tagged(items, "raw_items", source, run_id), _tagged(users, "raw_users", source, run_id),
                        quarantine, counts, persisted)


# --- LC-Rec -------------------------------------------------------------------------------

def _read_id_map(path: str) -> tuple[dict[str, str], list[tuple[str, str]], int]:
    """'<original key>\\t<id>' lines -> ({id: key}, quarantined [(line, reason)], lines read)."""
    mapping: dict[str, str] = {}
    rejected: list[tuple[str, str]] = []
    read = 0
    with _open_text(path) as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            read += 1
            parts = [p.strip() for p in line.split("\t")]
            if "\ufffd" in line:
                rejected.append((line, INVALID_UTF8))
            elif len(parts) != 2 or not all(parts):
                rejected.append((line, BAD_RECORD))
            elif parts[1] in mapping:
                rejected.append((line, DUPLICATE_KEY))
            else:
                mapping[parts[1]] = parts[0]
    return mapping, rejected, read


def _map_counts(prefix: str, read: int, rejected: list[tuple[str, str]]) -> dict[str, int]:
    tally: Counter = Counter(reason for _, reason in rejected)
    tally[None] = read - len(rejected)
    return _file_counts(prefix, tally)


def _lcrec_interactions(inter: Any, users: dict[str, str], items: dict[str, str]
                        ) -> tuple[pd.DataFrame, list[tuple[str, str]], int]:
    """{user id: [item ids]} -> (user_key, item_key, position) rows, quarantined entries, entries read.

    One entry is one (user, item, position); a user whose value is not a list counts as one entry.
    """
    if not isinstance(inter, dict):
        raise ValueError(f"LC-Rec inter.json: expected an object {{user id: [item ids]}}, got {type(inter).__name__}")
    rows: list[tuple[str, str, int]] = []
    rejected: list[tuple[str, str]] = []
    for uid, seq in inter.items():
        if not isinstance(seq, list):
            rejected.append((json.dumps({uid: seq}), BAD_RECORD))
            continue
        user_key = users.get(str(uid))
        for pos, iid in enumerate(seq):
            entry = {"user": uid, "item": iid, "position": pos}
            if isinstance(iid, bool) or not isinstance(iid, (int, str)):
                rejected.append((json.dumps(entry), BAD_RECORD))
            elif user_key is None:
                rejected.append((json.dumps(entry), UNMAPPED_USER))
            elif str(iid) not in items:
                rejected.append((json.dumps(entry), UNMAPPED_ITEM))
            else:
                rows.append((user_key, items[str(iid)], pos))
    frame = pd.DataFrame(rows, columns=["user_key", "item_key", "position"])
    dup = frame.duplicated(["user_key", "item_key"], keep="first")
    for r in frame[dup].itertuples(index=False):
        rejected.append((json.dumps({"user_key": r.user_key, "item_key": r.item_key, "position": int(r.position)}),
                         DUPLICATE_KEY))
    read = sum(len(s) if isinstance(s, list) else 1 for s in inter.values())
    return frame[~dup].reset_index(drop=True), rejected, read


def _lcrec_item_lines(item_json: Any, items: dict[str, str]) -> tuple[list[str], list[tuple[str, str]], int]:
    """{item id: {title, ...}} -> metadata lines keyed by the original asin, quarantined entries, entries read."""
    if not isinstance(item_json, dict):
        raise ValueError(f"LC-Rec item.json: expected an object {{item id: {{...}}}}, got {type(item_json).__name__}")
    lines: list[str] = []
    rejected: list[tuple[str, str]] = []
    for iid, fields in item_json.items():
        entry = json.dumps({iid: fields}, ensure_ascii=False)
        if not isinstance(fields, dict):
            rejected.append((entry, BAD_RECORD))
        elif str(iid) not in items:
            rejected.append((entry, UNMAPPED_ITEM))
        else:
            lines.append(json.dumps({**fields, "asin": items[str(iid)]}, ensure_ascii=False))
    return lines, rejected, len(item_json)


def read_lcrec(spark: SparkSession, lcrec_dir: str, name: str, run_id: str, etl: ETLConfig,
               reviews_path: str | None = None, meta_path: str | None = None) -> BronzeFrames:
    """LC-Rec files (`{name}.inter.json`, `.user2id`, `.item2id`, optional `.item.json`) -> bronze.

    Keys are the original Amazon keys from the id maps; position is the index in the user's
    list; raw_users and raw_items hold every key of the maps. Reviews, if given, attach rating,
    text and time by (reviewerID, asin); reviews that match no interaction are counted
    (reviews_unmatched), not ingested. Item metadata comes from item.json when present, else
    from meta_path (JSON lines joined by asin; asins outside the map count as meta_unmatched).
    """
    source, prefix = LCREC_SOURCE, _join_path(lcrec_dir, name)
    counts: dict[str, int] = {}
    rejected: list[tuple[str, str]] = []  # found on the driver: (record, reason)

    def tally(kind: str, read: int, found: list[tuple[str, str]]) -> None:
        counts.update(_map_counts(kind, read, found))
        rejected.extend(found)

    user_map, found, read = _read_id_map(f"{prefix}.user2id")
    tally("lcrec_user2id", read, found)
    item_map, found, read = _read_id_map(f"{prefix}.item2id")
    tally("lcrec_item2id", read, found)
    with _open_text(f"{prefix}.inter.json") as f:
        pairs, found, read = _lcrec_interactions(json.load(f), user_map, item_map)
    tally("lcrec_inter", read, found)

    interactions = spark.createDataFrame(pairs, "user_key string, item_key string, position long")
    users = spark.createDataFrame(pd.DataFrame({"user_key": sorted(set(user_map.values()))}), "user_key string")
    item_keys = spark.createDataFrame(pd.DataFrame({"item_key": sorted(set(item_map.values()))}), "item_key string")
    persisted: list[DataFrame] = []
    quarantines: list[DataFrame] = []

    review_cols = {"ts": "timestamp", "rating": "double", "review_text": "string", "summary": "string"}
    if reviews_path:
        reviews = review_records(spark, reviews_path, etl, datetime.now(timezone.utc)).persist()
        persisted.append(reviews)
        quarantines.append(_quarantine(reviews, source, run_id))
        counts.update(_file_counts("reviews", _reason_counts(reviews)))
        accepted = reviews.filter(F.col("reason").isNull())
        keys = ["user_key", "item_key"]
        matched = accepted.join(interactions.select(*keys), keys, "left_semi").count()
        counts.update(reviews_matched=matched, reviews_unmatched=counts["reviews_accepted"] - matched)
        interactions = interactions.join(accepted.select(*keys, *review_cols), keys, "left")
        users = users.join(_users_from_reviews(accepted), "user_key", "left")
    else:
        interactions = interactions.withColumns({c: F.lit(None).cast(t) for c, t in review_cols.items()})
        users = users.withColumn("user_name", F.lit(None).cast("string"))

    item_json_path = f"{prefix}.item.json"
    meta = None
    if _exists(item_json_path):
        with _open_text(item_json_path) as f:
            lines, found, read = _lcrec_item_lines(json.load(f), item_map)
        meta = meta_records(spark.createDataFrame([(v,) for v in lines], "value string"), etl).persist()
        counts.update(_file_counts("lcrec_item", _reason_counts(meta) + Counter(r for _, r in found)))
        rejected.extend(found)
    elif meta_path:
        meta = meta_records(_meta_lines(spark, meta_path), etl).persist()
        counts.update(_file_counts("meta", _reason_counts(meta)))
        described = meta.filter(F.col("reason").isNull()).select("item_key")
        counts["meta_unmatched"] = described.join(item_keys, "item_key", "left_anti").count()
    if meta is not None:
        persisted.append(meta)
        quarantines.append(_quarantine(meta, source, run_id))
    items = _items_with_metadata(item_keys, meta, "left")

    quarantine = _local_quarantine(spark, rejected, source, run_id)
    for q in quarantines:
        quarantine = quarantine.unionByName(q)
    counts.update(interactions=len(pairs), users=len(set(user_map.values())), **_item_counts(items))
    return BronzeFrames(_tagged(interactions, "raw_interactions", source, run_id),
                        _tagged(items, "raw_items", source, run_id), _tagged(users, "raw_users", source, run_id),
                        quarantine, counts, persisted)
