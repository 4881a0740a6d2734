"""Pure Spark transforms from the bronze tables to the silver and gold tables (no I/O).

Every public builder returns a DataFrame conformed to its catalog schema. Inputs follow the
catalog schemas too (`raw_interactions`, `raw_items`, `id_map`, and the outputs of earlier
builders). Only VADER runs in Python (an iterator pandas UDF, one analyzer per partition);
everything else stays in the JVM. Leave-one-out leakage is avoided by construction: item
review fallbacks, user profiles and all statistics read the `train` split only.
"""
from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from a3gr.config import ETLConfig
from a3gr.spark import conform, spark_schema

USER, ITEM = "user", "item"  # id_map kinds
TRAIN, VALID, TEST = "train", "valid", "test"
MIN_SPLITTABLE = 3  # leave-one-out needs a train, a valid and a test interaction

ITEM_TEXT_MAX_WORDS = 256  # all-MiniLM-L6-v2 reads 256 word pieces; more is wasted
ITEM_FALLBACK_REVIEWS = 10  # train reviews concatenated for an item without metadata
PROFILE_TOP_CATEGORIES = 3
PROFILE_TOP_BRANDS = 3
PROFILE_RECENT_TITLES = 3
PROFILE_KEYWORDS = 5
KEYWORD_MIN_CHARS = 3

# Common English function words plus review boilerplate that says nothing about taste.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren as at be because been before being
below between both but by can cannot could couldn did didn do does doesn doing don down during each
few for from further get got had hadn has hasn have haven having he her here hers herself him himself
his how however i if in into is isn it its itself just let like ll me might more most much must
mustn my myself no nor not now of off on once one only or other ought our ours ourselves out over own
really same she should shouldn so some still such than that the their theirs them themselves then there
these they this those through to too under until up upon us use used using ve very was wasn way we well
were weren what when where which while who whom why will with won would wouldn you your yours yourself
yourselves gets getting go going make made thing things even though since yet ever every
product item bought buy buying purchase purchased amazon star stars review
""".split())


# --- schema -----------------------------------------------------------------------------

# --- small column helpers -----------------------------------------------------------------

def _clean(col: Column) -> Column:
    """Strip HTML tags, collapse whitespace, trim; empty -> null."""
    no_tags = F.regexp_replace(col, r"</?[A-Za-z][^<>]*>", " ")
    text = F.trim(F.regexp_replace(no_tags, r"\s+", " "))
    return F.when(text != "", text)


def _sentence(label: str | None, col: Column) -> Column:
    """'Label: value.' (no double full stop); null when the value is null."""
    ended = F.when(col.rlike(r"[.!?]$"), col).otherwise(F.concat(col, F.lit(".")))
    return ended if label is None else F.concat(F.lit(f"{label}: "), ended)


def _truncate_words(col: Column, n: int) -> Column:
    """First n space-separated words of an already whitespace-normalised text."""
    return F.array_join(F.slice(F.split(col, " "), 1, n), " ")


def _review_text(summary: Column, review_text: Column) -> Column:
    """Summary and review body as one cleaned text; null when both are missing."""
    return F.concat_ws(" ", _sentence(None, _clean(summary)), _clean(review_text))


def _id_lookup(id_map: DataFrame, kind: str, key_col: str, id_col: str) -> DataFrame:
    return id_map.filter(F.col("kind") == kind).select(F.col("key").alias(key_col), F.col("id").alias(id_col))


def _with_reviews(pairs: DataFrame, raw: DataFrame, id_map: DataFrame, how: str) -> DataFrame:
    """`pairs` (user_id, item_id, ...) plus `review`: the text of the deduplicated raw row, or null.

    The join comes before the text cleaning so only the interactions asked for pay for it.
    """
    kept = (dedupe_interactions(raw).select("user_key", "item_key", "summary", "review_text")
            .join(_id_lookup(id_map, USER, "user_key", "user_id"), "user_key")
            .join(_id_lookup(id_map, ITEM, "item_key", "item_id"), "item_key")
            .drop("user_key", "item_key"))
    review = _review_text(F.col("summary"), F.col("review_text"))
    return (pairs.join(kept, ["user_id", "item_id"], how)
            .withColumn("review", F.when(review != "", review)).drop("summary", "review_text"))


def _top_terms(df: DataFrame, group_col: str, term_col: str, n: int, out_col: str) -> DataFrame:
    """(group_col, out_col): the n most frequent terms per group, ties broken by term."""
    counts = df.filter(F.col(term_col).isNotNull()).groupBy(group_col, term_col).agg(F.count("*").alias("_n"))
    ranked = F.sort_array(F.collect_list(F.struct((-F.col("_n")).alias("_neg_n"), F.col(term_col).alias("_t"))))
    return counts.groupBy(group_col).agg(F.transform(F.slice(ranked, 1, n), lambda s: s["_t"]).alias(out_col))


# --- interactions -------------------------------------------------------------------------

def dedupe_interactions(raw: DataFrame) -> DataFrame:
    """One row per (user_key, item_key): the earliest by position, then ts, then a stable tiebreak."""
    raw = conform(raw, "raw_interactions")
    order = [F.col(c).asc_nulls_last() for c in
             ("position", "ts", "source", "ingest_run_id", "rating", "summary", "review_text")]
    w = Window.partitionBy("user_key", "item_key").orderBy(*order)
    return raw.withColumn("_rn", F.row_number().over(w)).filter(F.col("_rn") == 1).drop("_rn")


def k_core_filter(df: DataFrame, k: int, user_col: str = "user_key", item_col: str = "item_key") -> DataFrame:
    """Drop users and items with fewer than k rows, repeated until nothing changes (the k-core).

    Each round is materialised with localCheckpoint, so the plan stays one round deep however
    many rounds the fixed point takes. Pass only the columns you need: every round stores them.
    """
    if k <= 1:
        return df
    current = df.localCheckpoint()
    n = current.count()
    while True:
        users = current.groupBy(user_col).count().filter(F.col("count") >= k).select(user_col)
        items = current.groupBy(item_col).count().filter(F.col("count") >= k).select(item_col)
        kept = (current.join(users, user_col, "left_semi").join(items, item_col, "left_semi")
                .select(df.columns).localCheckpoint())
        kept_n = kept.count()
        if kept_n == n:
            return kept
        current, n = kept, kept_n


def assign_ids(keys: DataFrame, existing: DataFrame | None) -> DataFrame:
    """The full id_map: existing (kind, key) keep their ids; new keys follow the kind's max id in key order."""
    keys = keys.select(F.col("kind").cast("string"), F.col("key").cast("string")).distinct()
    if existing is None:
        existing = keys.sparkSession.createDataFrame([], spark_schema("id_map"))
    existing = conform(existing, "id_map")
    next_id = existing.groupBy("kind").agg((F.max("id") + 1).alias("_next"))
    new = keys.join(existing.select("kind", "key"), ["kind", "key"], "left_anti").join(next_id, "kind", "left")
    rank = F.row_number().over(Window.partitionBy("kind").orderBy("key")) - 1
    new = new.withColumn("id", F.coalesce(F.col("_next"), F.lit(0)) + rank)
    return conform(existing.unionByName(new.select("kind", "key", "id")), "id_map")


def build_interactions(raw: DataFrame, id_map_existing: DataFrame | None, k: int) -> tuple[DataFrame, DataFrame]:
    """raw_interactions -> (interactions, id_map): dedupe, k-core, ids, per-user order, leave-one-out split."""
    kept = (dedupe_interactions(raw)
            .select("user_key", "item_key", "ts", "position", "rating").localCheckpoint())
    pairs = k_core_filter(kept.select("user_key", "item_key"), k)
    splittable = (pairs.groupBy("user_key").count()
                  .filter(F.col("count") >= MIN_SPLITTABLE).select("user_key"))
    pairs = pairs.join(splittable, "user_key", "left_semi")
    keys = (pairs.select(F.lit(USER).alias("kind"), F.col("user_key").alias("key"))
            .unionByName(pairs.select(F.lit(ITEM).alias("kind"), F.col("item_key").alias("key"))))
    id_map = assign_ids(keys, id_map_existing).localCheckpoint()

    rows = (kept.join(pairs, ["user_key", "item_key"], "left_semi")
            .join(_id_lookup(id_map, USER, "user_key", "user_id"), "user_key")
            .join(_id_lookup(id_map, ITEM, "item_key", "item_id"), "item_key"))
    # position when the source has one, else time; the item key makes ties deterministic
    order = Window.partitionBy("user_id").orderBy(
        F.col("position").asc_nulls_last(), F.col("ts").asc_nulls_last(), F.col("item_key"))
    pos = F.row_number().over(order) - 1
    n = F.count("*").over(Window.partitionBy("user_id"))
    interactions = (rows.withColumn("position", pos).withColumn("_n", n)
                    .withColumn("split", F.when(F.col("position") == F.col("_n") - 1, TEST)
                                .when(F.col("position") == F.col("_n") - 2, VALID)
                                .otherwise(TRAIN)))
    return conform(interactions, "interactions"), id_map


# --- feedback -----------------------------------------------------------------------------

@F.pandas_udf(T.DoubleType())
def vader_compound(texts: Iterator[pd.Series]) -> Iterator[pd.Series]:
    """VADER compound score in [-1, 1] per text (null text -> null)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()  # one per partition: it loads the lexicon
    for batch in texts:
        yield pd.Series([analyzer.polarity_scores(t)["compound"] if isinstance(t, str) else None for t in batch],
                        dtype="float64")


def build_feedback(interactions: DataFrame, raw: DataFrame, id_map: DataFrame, etl: ETLConfig) -> DataFrame:
    """Feedback level per interaction: from the rating when there is one, else from VADER on the review."""
    rows = _with_reviews(conform(interactions, "interactions").select("user_id", "item_id", "split", "rating"),
                         raw, id_map, "left")
    # Spread the Python work over every core (adaptive execution would merge small partitions).
    parallelism = max(2, rows.sparkSession.sparkContext.defaultParallelism)
    rows = rows.repartition(parallelism, "user_id")
    rating, sentiment = F.col("rating"), F.col("sentiment")
    rows = rows.withColumn("sentiment", F.when(F.col("review").isNotNull(), vader_compound("review")))
    by_rating = (F.when(rating <= etl.disliked_max_rating, "disliked")
                 .when(rating <= etl.neutral_max_rating, "neutral").otherwise("liked"))
    by_sentiment = (F.when(sentiment < etl.sentiment_disliked_below, "disliked")
                    .when(sentiment > etl.sentiment_liked_above, "liked").otherwise("neutral"))
    feedback = (rows
                .withColumn("label", F.when(rating.isNotNull(), by_rating).when(sentiment.isNotNull(), by_sentiment))
                .withColumn("labeler", F.when(rating.isNotNull(), "rating").when(sentiment.isNotNull(), "vader")))
    return conform(feedback, "feedback")


# --- items --------------------------------------------------------------------------------

def _item_metadata(raw_items: DataFrame, max_chars: int) -> DataFrame:
    """One cleaned metadata row per item_key; each field from the first source that has it."""
    cats = F.filter(F.transform(F.col("categories"), _clean), lambda c: c.isNotNull())
    cleaned = conform(raw_items, "raw_items").select(
        "item_key", "source", "ingest_run_id",
        _clean(F.col("title")).alias("title"), _clean(F.col("brand")).alias("brand"),
        F.when(F.size(cats) > 0, F.array_distinct(cats)).alias("categories"),
        F.substring(_clean(F.col("description")), 1, max_chars).alias("description"))
    fields = ("title", "brand", "categories", "description")
    # min_by skips null orderings, so a null field never wins; the value itself breaks exact ties.
    return cleaned.groupBy("item_key").agg(*(
        F.min_by(c, F.when(F.col(c).isNotNull(), F.struct("source", "ingest_run_id", c))).alias(c) for c in fields))


def build_items(interactions: DataFrame, raw_items: DataFrame, raw: DataFrame, id_map: DataFrame,
                etl: ETLConfig) -> DataFrame:
    """Item text for the semantic encoder: metadata, else train-split reviews, else 'Item <key>'."""
    item_ids = conform(interactions, "interactions").select("item_id").distinct()
    items = (item_ids.join(_id_lookup(id_map, ITEM, "item_key", "item_id"), "item_id")
             .join(_item_metadata(raw_items, etl.max_text_chars), "item_key", "left"))
    meta_text = F.concat_ws(" ", _sentence("Title", F.col("title")), _sentence("Brand", F.col("brand")),
                            _sentence("Categories", F.array_join("categories", " > ")),
                            _sentence("Description", F.col("description")))
    items = items.withColumn("_meta_text", F.when(meta_text != "", meta_text))

    # Only train reviews: valid/test reviews describe the held-out targets.
    no_meta = items.filter(F.col("_meta_text").isNull()).select("item_id")
    train = (interactions.filter(F.col("split") == TRAIN).select("user_id", "item_id", "ts")
             .join(no_meta, "item_id", "left_semi"))
    train = _with_reviews(train, raw, id_map, "inner").filter(F.col("review").isNotNull())
    ordered = F.sort_array(F.collect_list(F.struct("ts", "user_id", "review")))
    reviews = train.groupBy("item_id").agg(
        F.concat(F.lit("Reviews: "), F.array_join(F.transform(F.slice(ordered, 1, ITEM_FALLBACK_REVIEWS),
                                                              lambda s: s["review"]), " ")).alias("_review_text"))

    items = items.join(reviews, "item_id", "left")
    text = F.coalesce("_meta_text", "_review_text", F.concat(F.lit("Item "), F.col("item_key")))
    source = (F.when(F.col("_meta_text").isNotNull(), "metadata")
              .when(F.col("_review_text").isNotNull(), "reviews").otherwise("none"))
    items = items.withColumn("text", _truncate_words(text, ITEM_TEXT_MAX_WORDS)).withColumn("text_source", source)
    return conform(items, "items")


# --- users --------------------------------------------------------------------------------

def _train_history(interactions: DataFrame, max_history: int) -> DataFrame:
    """The last max_history train interactions of each user (user_id, item_id, position, rating)."""
    train = conform(interactions, "interactions").filter(F.col("split") == TRAIN)
    newest_first = Window.partitionBy("user_id").orderBy(F.col("position").desc())
    return (train.withColumn("_rn", F.row_number().over(newest_first)).filter(F.col("_rn") <= max_history)
            .select("user_id", "item_id", "position", "rating"))


def build_users(interactions: DataFrame, items: DataFrame, feedback: DataFrame, raw: DataFrame,
                id_map: DataFrame, etl: ETLConfig) -> DataFrame:
    """User profile text from the last etl.max_history train interactions only (never valid/test)."""
    hist = (_train_history(interactions, etl.max_history)
            .join(conform(items, "items").select("item_id", "title", "brand", "categories"), "item_id", "left")
            .join(conform(feedback, "feedback").select("user_id", "item_id", "label"), ["user_id", "item_id"], "left"))

    ordered = F.sort_array(F.collect_list(F.struct("position", "item_id", "title")))
    stats = hist.groupBy("user_id").agg(
        F.transform(ordered, lambda s: s["item_id"]).alias("profile_items"),
        F.reverse(F.filter(F.transform(ordered, lambda s: F.regexp_replace(s["title"], r"[\s.;,]+$", "")),
                           lambda t: t != "")).alias("_titles"),
        F.count("*").alias("_n"), F.avg("rating").alias("_avg_rating"), F.count("rating").alias("_n_rated"),
        F.avg((F.col("label") == "liked").cast("double")).alias("_liked"), F.count("label").alias("_n_labelled"))

    # The root category ("Musical Instruments") is shared by the whole catalogue: skip it.
    cats = F.col("categories")
    categories = hist.select("user_id", F.explode(F.when(F.size(cats) > 1, F.slice(cats, 2, F.size(cats)))
                                                  .otherwise(cats)).alias("category"))
    top_categories = _top_terms(categories, "user_id", "category", PROFILE_TOP_CATEGORIES, "_categories")
    top_brands = _top_terms(hist, "user_id", "brand", PROFILE_TOP_BRANDS, "_brands")
    words = (_with_reviews(hist.select("user_id", "item_id"), raw, id_map, "inner")
             .select("user_id", F.explode(F.split(F.lower("review"), "[^a-z]+")).alias("word"))
             .filter((F.length("word") >= KEYWORD_MIN_CHARS) & ~F.col("word").isin(*sorted(STOPWORDS))))
    keywords = _top_terms(words, "user_id", "word", PROFILE_KEYWORDS, "_keywords")

    def listed(label: str, arr: Column, sep: str = ", ") -> Column:
        return F.when(F.size(arr) > 0, F.concat(F.lit(f"{label}: "), F.array_join(arr, sep), F.lit(".")))

    rating_part = F.when(F.col("_n_rated") > 0, F.concat(
        F.lit("Average rating "), F.format_number("_avg_rating", 1), F.lit(" over "), F.col("_n_rated"),
        F.lit(" rated items.")))
    liked_part = F.when(F.col("_n_labelled") > 0, F.concat(
        F.lit("Liked "), F.round(F.col("_liked") * 100).cast("long"), F.lit("% of "), F.col("_n_labelled"),
        F.lit(" items with feedback.")))
    profile = F.concat_ws(
        " ", F.concat(F.lit("Recent history of "), F.col("_n"), F.lit(" items.")),
        listed("Recent items", F.slice("_titles", 1, PROFILE_RECENT_TITLES), "; "),
        listed("Top categories", F.coalesce("_categories", F.array())),
        listed("Top brands", F.coalesce("_brands", F.array())),
        rating_part, liked_part,
        listed("Review keywords", F.coalesce("_keywords", F.array())))
    users = (stats.join(top_categories, "user_id", "left").join(top_brands, "user_id", "left")
             .join(keywords, "user_id", "left")
             .join(_id_lookup(id_map, USER, "user_key", "user_id"), "user_id")
             .withColumn("profile_text", profile))
    return conform(users, "users")


# --- features -----------------------------------------------------------------------------

def build_item_features(items: DataFrame, interactions: DataFrame, feedback: DataFrame) -> DataFrame:
    """Item text plus train-split statistics: n_train, n_users, popularity (n_train / max), avg_rating."""
    counts = (conform(interactions, "interactions").filter(F.col("split") == TRAIN).groupBy("item_id")
              .agg(F.count("*").alias("n_train"), F.countDistinct("user_id").alias("n_users")))
    ratings = (conform(feedback, "feedback").filter(F.col("split") == TRAIN).groupBy("item_id")
               .agg(F.avg("rating").alias("avg_rating")))
    max_n = counts.agg(F.max("n_train").alias("_max_n"))
    features = (conform(items, "items").select("item_id", "text")
                .join(counts, "item_id", "left").join(ratings, "item_id", "left").crossJoin(F.broadcast(max_n))
                .fillna(0, subset=["n_train", "n_users"])
                .withColumn("popularity", F.when(F.col("_max_n") > 0, F.col("n_train") / F.col("_max_n"))
                            .otherwise(F.lit(0.0))))
    return conform(features, "item_features")


def build_user_features(interactions: DataFrame, max_history: int) -> DataFrame:
    """Last max_history train item ids (oldest first), train stats, and the valid and test targets."""
    df = conform(interactions, "interactions")
    is_train = F.col("split") == TRAIN
    train_seq = F.sort_array(F.collect_list(F.when(is_train, F.struct("position", "item_id"))))
    features = df.groupBy("user_id").agg(
        train_seq.alias("_seq"),
        F.count(F.when(is_train, 1)).alias("n_train"),
        F.avg(F.when(is_train, F.col("rating"))).alias("avg_rating"),
        F.max(F.when(F.col("split") == VALID, F.col("item_id"))).alias("valid_item"),
        F.max(F.when(F.col("split") == TEST, F.col("item_id"))).alias("test_item"))
    start = F.greatest(F.size("_seq") - max_history + 1, F.lit(1))
    history = F.transform(F.slice("_seq", start, F.lit(max_history)), lambda s: s["item_id"])
    features = features.withColumn("history", history).withColumn("history_len", F.size("history"))
    return conform(features, "user_features")
