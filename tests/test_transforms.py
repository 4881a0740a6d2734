"""Unit tests for the pure ETL transforms on tiny hand-built DataFrames."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from a3gr.config import ETLConfig
from a3gr.spark import conform, spark_schema
from etl.transforms import (
    assign_ids, build_feedback, build_interactions, build_item_features, build_items, build_user_features,
    build_users, dedupe_interactions, k_core_filter,
)

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def raw_interactions(spark, rows: list[dict]):
    """raw_interactions from dicts; omitted optional fields are null."""
    defaults = {"source": "test", "ts": None, "position": None, "rating": None, "review_text": None,
                "summary": None, "ingest_run_id": "run-1"}
    schema = spark_schema("raw_interactions")
    return spark.createDataFrame([tuple({**defaults, **r}[f.name] for f in schema) for r in rows], schema)


def raw_items(spark, rows: list[dict]):
    defaults = {"source": "test", "title": None, "description": None, "brand": None, "categories": None,
                "ingest_run_id": "run-1"}
    schema = spark_schema("raw_items")
    return spark.createDataFrame([tuple({**defaults, **r}[f.name] for f in schema) for r in rows], schema)


def sequence(user: str, items: list[str], **fields) -> list[dict]:
    """One user's interactions in order (position 0..n-1); per-item extras via fields[item]."""
    return [{"user_key": user, "item_key": it, "position": p, **fields.get(it, {})} for p, it in enumerate(items)]


def ids(id_map, kind: str) -> dict[str, int]:
    return {r.key: r.id for r in id_map.filter(id_map.kind == kind).collect()}


def assert_catalog_schema(df, table: str):
    got = [(f.name, f.dataType) for f in df.schema]
    want = [(f.name, f.dataType) for f in spark_schema(table)]
    assert got == want, f"{table}: {got} != {want}"


# --- dedupe, k-core, ids --------------------------------------------------------------------

def test_dedupe_keeps_earliest_and_is_deterministic(spark):
    rows = [
        {"user_key": "u1", "item_key": "i1", "position": 5, "ts": day(1), "review_text": "late position"},
        {"user_key": "u1", "item_key": "i1", "position": 2, "ts": day(9), "review_text": "early position, late ts"},
        {"user_key": "u1", "item_key": "i1", "position": 2, "ts": day(3), "review_text": "kept"},
        {"user_key": "u2", "item_key": "i1", "ts": day(4), "review_text": "later"},
        {"user_key": "u2", "item_key": "i1", "ts": day(2), "review_text": "kept"},
        {"user_key": "u3", "item_key": "i1", "ts": day(2), "source": "b", "review_text": "source b"},
        {"user_key": "u3", "item_key": "i1", "ts": day(2), "source": "a", "review_text": "kept"},
        {"user_key": "u3", "item_key": "i2", "review_text": "kept"},
    ]
    forward = dedupe_interactions(raw_interactions(spark, rows))
    backward = dedupe_interactions(raw_interactions(spark, rows[::-1]).repartition(3))
    got = sorted(forward.collect(), key=lambda r: (r.user_key, r.item_key))
    assert got == sorted(backward.collect(), key=lambda r: (r.user_key, r.item_key))
    assert [(r.user_key, r.item_key, r.review_text) for r in got] == [
        ("u1", "i1", "kept"), ("u2", "i1", "kept"), ("u3", "i1", "kept"), ("u3", "i2", "kept")]
    assert_catalog_schema(forward, "raw_interactions")


def test_k_core_iterates_to_fixed_point(spark):
    # Round 1 drops i3 (1 user); only then u3 falls to 1 item and must go in round 2.
    pairs = [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2"), ("u3", "i1"), ("u3", "i3")]
    df = spark.createDataFrame(pairs, "user_key string, item_key string")
    got = sorted(tuple(r) for r in k_core_filter(df, 2).collect())
    assert got == [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2")]


def test_k_core_chain_needs_several_rounds(spark):
    # A path u0-i0-u1-i1-... where every round peels the two ends; k=2 removes all of it,
    # while the 2x2 block survives.
    path = [(f"u{n}", f"i{n}") for n in range(4)] + [(f"u{n + 1}", f"i{n}") for n in range(3)]
    block = [("ua", "ia"), ("ua", "ib"), ("ub", "ia"), ("ub", "ib")]
    df = spark.createDataFrame(path + block, "user_key string, item_key string")
    assert sorted(tuple(r) for r in k_core_filter(df, 2).collect()) == sorted(block)


def test_assign_ids_keeps_existing_and_appends_after_max(spark):
    existing = spark.createDataFrame([("user", "a", 0), ("user", "c", 5), ("item", "x", 0)], spark_schema("id_map"))
    keys = spark.createDataFrame([("user", k) for k in "dbac"] + [("item", "y"), ("item", "x"), ("item", "y")],
                                 "kind string, key string")
    id_map = assign_ids(keys, existing)
    assert_catalog_schema(id_map, "id_map")
    assert ids(id_map, "user") == {"a": 0, "c": 5, "b": 6, "d": 7}
    assert ids(id_map, "item") == {"x": 0, "y": 1}
    again = assign_ids(keys, id_map)
    assert sorted(again.collect()) == sorted(id_map.collect())


def test_assign_ids_from_scratch_is_sorted_and_bijective(spark):
    keys = spark.createDataFrame([("user", k) for k in ["zed", "amy", "bob"]] + [("item", "q"), ("item", "p")],
                                 "kind string, key string")
    first = assign_ids(keys, None)
    assert ids(first, "user") == {"amy": 0, "bob": 1, "zed": 2}
    assert ids(first, "item") == {"p": 0, "q": 1}
    assert sorted(assign_ids(keys, None).collect()) == sorted(first.collect())


def test_conform_names_missing_column(spark):
    df = spark.createDataFrame([("user", "a")], "kind string, key string")
    with pytest.raises(ValueError, match=r"id_map.*missing column\(s\) id"):
        conform(df, "id_map")


# --- interactions ---------------------------------------------------------------------------

def test_leave_one_out_by_position(spark):
    # ts runs backwards: the position must win.
    rows = [{"user_key": "u1", "item_key": it, "position": p, "ts": day(10 - p)}
            for p, it in enumerate(["a", "b", "c", "d"])]
    rows += [{"user_key": "u2", "item_key": "a", "position": 0}, {"user_key": "u2", "item_key": "b", "position": 1}]
    inter, id_map = build_interactions(raw_interactions(spark, rows), None, k=1)
    assert_catalog_schema(inter, "interactions")
    assert_catalog_schema(id_map, "id_map")
    items = {v: k for k, v in ids(id_map, "item").items()}
    got = [(items[r.item_id], r.position, r.split) for r in inter.orderBy("position").collect()]
    assert got == [("a", 0, "train"), ("b", 1, "train"), ("c", 2, "valid"), ("d", 3, "test")]
    assert set(ids(id_map, "user")) == {"u1"}, "a user with 2 interactions cannot be split"


def test_leave_one_out_by_ts_with_item_key_tiebreak(spark):
    rows = [{"user_key": "u1", "item_key": "late", "ts": day(9)},
            {"user_key": "u1", "item_key": "first", "ts": day(1)},
            {"user_key": "u1", "item_key": "tie-b", "ts": day(5)},
            {"user_key": "u1", "item_key": "tie-a", "ts": day(5)}]
    inter, id_map = build_interactions(raw_interactions(spark, rows), None, k=1)
    items = {v: k for k, v in ids(id_map, "item").items()}
    got = [(items[r.item_id], r.split) for r in inter.orderBy("position").collect()]
    assert got == [("first", "train"), ("tie-a", "train"), ("tie-b", "valid"), ("late", "test")]


def test_build_interactions_keeps_existing_ids(spark):
    rows = sequence("u1", ["a", "b", "c"]) + sequence("u2", ["c", "b", "a"])
    existing = spark.createDataFrame([("item", "c", 7), ("user", "u2", 3)], spark_schema("id_map"))
    _, id_map = build_interactions(raw_interactions(spark, rows), existing, k=1)
    assert ids(id_map, "item") == {"c": 7, "a": 8, "b": 9}
    assert ids(id_map, "user") == {"u2": 3, "u1": 4}


# --- feedback -------------------------------------------------------------------------------

def test_feedback_labels_from_rating_and_vader(spark):
    ratings = {it: {"rating": float(r)} for it, r in zip("abcde", [1, 2, 3, 4, 5])}
    rows = sequence("u1", list("abcde"), **ratings)
    rows += sequence("u2", ["love", "hate", "none", "mixed"], **{
        "love": {"review_text": "I love it, great"},
        "hate": {"summary": "terrible, broke, awful"},
        "mixed": {"rating": 5.0, "review_text": "terrible, broke, awful"}})
    raw = raw_interactions(spark, rows)
    inter, id_map = build_interactions(raw, None, k=1)
    fb = build_feedback(inter, raw, id_map, ETLConfig())
    assert_catalog_schema(fb, "feedback")
    items = {v: k for k, v in ids(id_map, "item").items()}
    got = {items[r.item_id]: r for r in fb.collect()}
    assert len(got) == 9
    assert [got[i].label for i in "abcde"] == ["disliked", "neutral", "neutral", "liked", "liked"]
    assert {got[i].labeler for i in "abcde"} == {"rating"}
    assert all(got[i].sentiment is None for i in "abcde")
    assert (got["love"].label, got["love"].labeler) == ("liked", "vader") and got["love"].sentiment > 0.5
    assert (got["hate"].label, got["hate"].labeler) == ("disliked", "vader") and got["hate"].sentiment < -0.3
    assert (got["none"].label, got["none"].labeler, got["none"].sentiment) == (None, None, None)
    assert (got["mixed"].label, got["mixed"].labeler) == ("liked", "rating") and got["mixed"].sentiment < 0


def test_feedback_reads_the_kept_duplicate(spark):
    rows = sequence("u1", ["a", "b", "c"]) + [
        {"user_key": "u1", "item_key": "a", "position": 9, "review_text": "terrible, broke, awful"}]
    rows[0]["review_text"] = "I love it, great"
    raw = raw_interactions(spark, rows)
    inter, id_map = build_interactions(raw, None, k=1)
    fb = build_feedback(inter, raw, id_map, ETLConfig())
    item_a = ids(id_map, "item")["a"]
    assert [r.label for r in fb.filter(fb.item_id == item_a).collect()] == ["liked"]


# --- items, users and features on one planted data set -------------------------------------

STRINGS = ["Musical Instruments", "Strings"]


@pytest.fixture(scope="module")
def shop(spark):
    """u1 trains on meta/rev/t1..t3, validates on leak_v and tests on leak_t; u2 holds out `rev`."""
    etl = ETLConfig(max_history=3)
    rows = sequence("u1", ["rev", "meta", "t1", "t2", "t3", "leak_v", "leak_t"], **{
        "rev": {"summary": "Warm", "review_text": "trainword tone", "rating": 4.0},
        "meta": {"review_text": "great zither keys", "rating": 5.0},
        "t1": {"review_text": "the zither", "rating": 2.0},
        "t3": {"review_text": "ZITHER!", "rating": 4.0},
        "leak_t": {"review_text": "leakword everywhere leakword", "rating": 1.0}})
    rows += sequence("u2", ["meta", "leak_v", "rev"], rev={"review_text": "heldoutword sound"})
    rows += sequence("u3", ["t1", "t2", "leak_t", "meta"])
    items_rows = [
        {"item_key": "meta", "source": "a", "brand": "  Fender ", "categories": STRINGS},
        {"item_key": "meta", "source": "b", "title": "Guitar <b>Strings</b>\n  set", "brand": "Other",
         "description": "Bright <br/> and   long lasting"},
        *({"item_key": k, "title": f"Title {k}", "brand": "Acme", "categories": STRINGS + ["Nylon"]}
          for k in ("t1", "t2", "t3")),
        {"item_key": "leak_v", "brand": "LeakBrandV", "categories": ["Musical Instruments", "LeakCatV"]},
        {"item_key": "leak_t", "title": "Leak title", "brand": "LeakBrandT",
         "categories": ["Musical Instruments", "LeakCatT"]},
        {"item_key": "unused", "title": "Not interacted"},
    ]
    raw = raw_interactions(spark, rows)
    inter, id_map = build_interactions(raw, None, k=1)
    inter, id_map = inter.cache(), id_map.cache()
    feedback = build_feedback(inter, raw, id_map, etl).cache()
    items = build_items(inter, raw_items(spark, items_rows), raw, id_map, etl).cache()
    users = build_users(inter, items, feedback, raw, id_map, etl).cache()
    out = {"etl": etl, "interactions": inter, "id_map": id_map, "feedback": feedback, "items": items,
           "users": users, "item_features": build_item_features(items, inter, feedback),
           "user_features": build_user_features(inter, etl.max_history),
           "item_ids": ids(id_map, "item"), "user_ids": ids(id_map, "user")}
    yield out
    for name in ("interactions", "id_map", "feedback", "items", "users"):
        out[name].unpersist()


def test_every_output_matches_its_catalog_schema(shop):
    for table in ("interactions", "id_map", "feedback", "items", "users", "item_features", "user_features"):
        assert_catalog_schema(shop[table], table)


def test_items_text_from_metadata_reviews_or_key(shop):
    got = {r.item_key: r for r in shop["items"].collect()}
    assert set(got) == set(shop["item_ids"]), "one row per interacted item, none for 'unused'"
    meta = got["meta"]
    assert (meta.title, meta.brand, meta.categories) == ("Guitar Strings set", "Fender", STRINGS)
    assert meta.text == ("Title: Guitar Strings set. Brand: Fender. Categories: Musical Instruments > Strings. "
                         "Description: Bright and long lasting.")
    assert meta.text_source == "metadata"
    rev = got["rev"]
    assert rev.text_source == "reviews" and "trainword" in rev.text and rev.title is None
    assert "heldoutword" not in rev.text, "a test-split review leaked into the item text"
    assert (got["t2"].text_source, got["leak_v"].text_source) == ("metadata", "metadata")


def test_items_without_text_get_a_minimal_one_and_long_text_is_truncated(spark):
    raw = raw_interactions(spark, sequence("u1", ["x", "y", "z"]))
    inter, id_map = build_interactions(raw, None, k=1)
    meta = [{"item_key": "z", "title": "Zed"},
            {"item_key": "y", "title": "Long", "description": " ".join(f"w{n}" for n in range(5000))}]
    got = {r.item_key: r for r in build_items(inter, raw_items(spark, meta), raw, id_map, ETLConfig()).collect()}
    assert (got["x"].text, got["x"].text_source) == ("Item x", "none")
    assert (got["z"].text, got["z"].text_source) == ("Title: Zed.", "metadata")
    long = got["y"].text
    assert long.startswith("Title: Long. Description: w0 w1") and 100 <= len(long.split()) <= 300


def test_user_profile_uses_recent_train_items_only(shop):
    item_ids, user_ids = shop["item_ids"], shop["user_ids"]
    u1 = shop["users"].filter(shop["users"].user_id == user_ids["u1"]).first()
    # max_history=3: the last three train items of u1, oldest first.
    assert u1.profile_items == [item_ids[k] for k in ("t1", "t2", "t3")]
    text = u1.profile_text
    for leaked in ("leak", "LeakBrand", "LeakCat", "Leak title"):
        assert leaked.lower() not in text.lower(), f"held-out {leaked!r} in profile: {text}"
    assert "Top brands: Acme." in text and "Top categories: Nylon, Strings." in text, text
    assert "Recent items: Title t3; Title t2; Title t1." in text, text
    assert "Average rating 3.0 over 2 rated items." in text, text
    assert "Review keywords: zither." in text, text
    assert "Fender" not in text and "trainword" not in text, "items older than max_history were used"


def test_user_profile_excludes_held_out_for_every_user(shop):
    inter = shop["interactions"]
    held_out = {(r.user_id, r.item_id) for r in inter.filter(inter.split != "train").collect()}
    users = shop["users"].collect()
    assert len(users) == 3
    for u in users:
        assert u.profile_items, u
        assert not {(u.user_id, i) for i in u.profile_items} & held_out


def test_user_features_history_capped_oldest_first(shop):
    item_ids, user_ids = shop["item_ids"], shop["user_ids"]
    got = {r.user_id: r for r in shop["user_features"].collect()}
    u1 = got[user_ids["u1"]]
    assert u1.history == [item_ids[k] for k in ("t1", "t2", "t3")]
    assert (u1.history_len, u1.n_train) == (3, 5)
    assert (u1.valid_item, u1.test_item) == (item_ids["leak_v"], item_ids["leak_t"])
    assert u1.avg_rating == pytest.approx((4 + 5 + 2 + 4) / 4)
    u2 = got[user_ids["u2"]]
    assert (u2.history, u2.n_train, u2.avg_rating) == ([item_ids["meta"]], 1, None)


def test_item_features_train_statistics(shop):
    item_ids = shop["item_ids"]
    got = {r.item_id: r for r in shop["item_features"].collect()}
    meta, rev, leak_t = got[item_ids["meta"]], got[item_ids["rev"]], got[item_ids["leak_t"]]
    # train interactions: meta (u1, u2), rev (u1), t1 (u1, u3), t2 (u1, u3), t3 (u1); leak_t none
    assert (meta.n_train, meta.n_users, meta.popularity) == (2, 2, 1.0)
    assert (rev.n_train, rev.popularity, rev.avg_rating) == (1, 0.5, 4.0)
    assert (leak_t.n_train, leak_t.n_users, leak_t.popularity, leak_t.avg_rating) == (0, 0, 0.0, None)
    assert meta.avg_rating == 5.0, "u2's unrated train interaction must not count; held-out ratings neither"
    assert got[item_ids["t1"]].text == "Title: Title t1. Brand: Acme. Categories: Musical Instruments > Strings > Nylon."
