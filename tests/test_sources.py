"""Extract functions: raw Amazon / LC-Rec files -> bronze frames, with quarantine accounting."""
from __future__ import annotations

import gzip
import json
import math

import pytest
from conftest import shared_data

from a3gr.config import ETLConfig
from a3gr.spark import spark_schema
from etl.sources import (BronzeFrames, parse_meta_record, read_amazon, read_lcrec, review_format,
                         split_categories)

RUN = "run-test"
TABLES = {"interactions": "raw_interactions", "items": "raw_items", "users": "raw_users",
          "quarantine": "quarantine"}


def assert_bronze(frames: BronzeFrames) -> None:
    """Exact catalog schemas, and read == accepted + quarantined for every file kind."""
    for attr, table in TABLES.items():
        got = [(f.name, f.dataType) for f in getattr(frames, attr).schema]
        assert got == [(f.name, f.dataType) for f in spark_schema(table)], f"{attr} does not match catalog '{table}'"
    kinds = {k[: -len("_read")] for k in frames.counts if k.endswith("_read")}
    assert kinds
    for kind in kinds:
        c = frames.counts
        assert c[f"{kind}_read"] == c[f"{kind}_accepted"] + c[f"{kind}_quarantined"], kind
        by_reason = sum(v for k, v in c.items() if k.startswith(f"{kind}_quarantined_"))
        assert by_reason == c[f"{kind}_quarantined"], kind
    assert frames.quarantine.count() == sum(v for k, v in frames.counts.items() if k.endswith("_quarantined"))


def quarantined(frames: BronzeFrames) -> list[tuple[str, str]]:
    return sorted((r["reason"], r["record"]) for r in frames.quarantine.collect())


# --- pure parsing (no Spark) --------------------------------------------------------------

def test_review_format_by_extension():
    assert review_format("a/reviews.json") == "json"
    assert review_format("a/Reviews.JSONL.gz") == "json"
    assert review_format("s3://b/r.csv.gz") == "csv"
    with pytest.raises(ValueError, match="unknown format"):
        review_format("reviews.parquet")


def test_split_categories_keeps_names_with_commas():
    joined = "Musical Instruments,Bags, Cases &amp; Covers,Drum Set Bags, Cases & Covers"
    assert split_categories(joined) == ["Musical Instruments", "Bags, Cases & Covers", "Drum Set Bags, Cases & Covers"]
    assert split_categories([["Musical Instruments", "Guitars"], ["Musical Instruments", "Amps &amp; Effects"]]) == [
        "Musical Instruments", "Guitars", "Amps & Effects"]
    assert split_categories("") is None and split_categories(None) is None


def test_parse_meta_record_formats_and_rejections():
    line = json.dumps({"asin": " B01 ", "title": "Fender&#174; Strings &amp; Picks",
                       "description": ["One.", "Two &lt;3"],
                       "brand": "", "categories": "Musical Instruments,Strings"})
    rec = parse_meta_record(line, max_chars=100)
    assert rec["reason"] is None and rec["item_key"] == "B01"
    assert rec["title"] == "Fender\u00ae Strings & Picks" and rec["description"] == "One. Two <3"
    assert rec["brand"] is None and rec["categories"] == ["Musical Instruments", "Strings"]
    # 2014 metadata lines are Python literals with a list of category paths
    old = "{'asin': 'B02', 'title': 'x' , 'categories': [['Musical Instruments', 'Drums &amp; Percussion']]}"
    assert parse_meta_record(old, 100)["categories"] == ["Musical Instruments", "Drums & Percussion"]
    assert parse_meta_record(json.dumps({"asin": "B03", "description": "d" * 30}), 10)["n_truncated"] == 1
    assert parse_meta_record('{"asin": "B04", "title": ', 100)["reason"] == "bad_json"
    assert parse_meta_record("[1, 2]", 100)["reason"] == "bad_json"
    assert parse_meta_record('{"title": "no key"}', 100)["reason"] == "missing_key"
    assert parse_meta_record('{"asin": "  "}', 100)["reason"] == "empty_key"
    assert parse_meta_record('{"asin": "B05", "title": "caf\ufffd"}', 100)["reason"] == "invalid_utf8"


# --- Amazon reviews -----------------------------------------------------------------------

def _good_reviews(n: int) -> list[dict]:
    """Valid reviews in 2014 and 2018 shapes, some without a rating, text or unix time."""
    out = []
    for i in range(n):
        r = {"reviewerID": f"A{i % 37:04d}", "asin": f"B{i:05d}", "reviewerName": f"name {i % 37}",
             "overall": float(1 + i % 5), "reviewText": f"Nice, \"solid\" caf\u00e9 \U0001F3B8 #{i}",
             "summary": f"s{i}", "unixReviewTime": 1300000000 + i * 86400}
        if i % 7 == 0:
            del r["overall"]  # no rating is allowed
        if i % 11 == 0:
            del r["reviewText"]
        if i % 13 == 0:  # 2014 date only
            del r["unixReviewTime"]
            r["reviewTime"] = f"{1 + i % 12} {1 + i % 28}, 2012"
        if i % 17 == 0:  # 2018 extras
            r.update(vote="3", verified=True, style={"Size:": " Large"})
        out.append(r)
    return out


def _corrupt_lines() -> list[tuple[bytes, str]]:
    def j(**kw) -> bytes:
        return json.dumps(kw).encode()

    base = {"reviewerID": "AX", "reviewText": "t", "unixReviewTime": 1400000000}
    return [
        (b'{"reviewerID": "AX", "asin": "BX1", "overall": 5.0', "bad_json"),
        (b"not json at all", "bad_json"),
        (b"[1, 2, 3]", "bad_json"),
        (j(**base, overall=4.0), "missing_key"),
        (j(**{**base, "reviewerID": None}, asin="BX2"), "missing_key"),
        (j(**{**base, "reviewerID": "  "}, asin="BX3"), "empty_key"),
        (j(**base, asin="BX4", overall=7.0), "rating_out_of_range"),
        (j(**base, asin="BX5", overall=0), "rating_out_of_range"),
        (b'{"reviewerID": "AX", "asin": "BX6", "overall": NaN, "unixReviewTime": 1400000000}', "bad_rating"),
        (j(**base, asin="BX7", overall="inf"), "bad_rating"),
        (j(**base, asin="BX8", overall="five"), "bad_rating"),
        (j(**{**base, "unixReviewTime": "yesterday"}, asin="BX9"), "bad_time"),
        (j(reviewerID="AX", asin="BX10", reviewTime="13 45, 2013"), "bad_time"),
        (j(reviewerID="AX", asin="BX11", overall=3.0), "missing_time"),
        (j(**{**base, "unixReviewTime": 4102444800}, asin="BX12"), "future_time"),
        (j(**{**base, "unixReviewTime": 631152000}, asin="BX13"), "implausible_time"),
        (b'{"reviewerID": "AX", "asin": "BX14", "reviewText": "bad \xff\xfe bytes", "unixReviewTime": 1400000000}',
         "invalid_utf8"),
    ]


def test_json_lines_quarantine_exactly_the_corrupted_lines(spark, tmp_path):
    good = _good_reviews(300)
    long_text = "x" * 500
    good[5]["reviewText"] = long_text  # over-long: truncated, not quarantined
    corrupt = _corrupt_lines()
    # a later duplicate of a good (user, item): the earlier review is kept
    dup = {**good[3], "unixReviewTime": good[3]["unixReviewTime"] + 10, "summary": "later"}
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    for k, (raw, _) in enumerate(corrupt):
        lines.insert(7 + 11 * k, raw)
    lines += [json.dumps(dup).encode(), b"", b"   "]  # blank lines are not records
    path = tmp_path / "reviews.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    frames = read_amazon(spark, str(path), None, RUN, ETLConfig(max_text_chars=200), source="amazon")
    try:
        assert_bronze(frames)
        expected = sorted([(reason, raw.decode("utf-8", errors="replace")) for raw, reason in corrupt]
                          + [("duplicate_key", json.dumps(dup))])
        assert quarantined(frames) == expected
        c = frames.counts
        assert (c["reviews_read"], c["reviews_accepted"], c["reviews_quarantined"]) == (318, 300, 18)
        assert c["reviews_quarantined_bad_json"] == 3 and c["reviews_truncated_fields"] == 1
        assert c["interactions"] == 300 and c["users"] == 37 and c["items"] == 300

        rows = {(r["user_key"], r["item_key"]): r for r in frames.interactions.collect()}
        assert set(rows) == {(r["reviewerID"], r["asin"]) for r in good}
        for r in good:
            got = rows[(r["reviewerID"], r["asin"])]
            assert got["rating"] == r.get("overall")
            assert got["source"] == "amazon" and got["ingest_run_id"] == RUN and got["position"] is None
            if "unixReviewTime" in r:
                assert got["ts"].timestamp() == r["unixReviewTime"]
            expected_text = r.get("reviewText")
            assert got["review_text"] == (expected_text[:200] if expected_text else None)
        assert rows[("A0003", "B00003")]["summary"] == "s3"  # not the later duplicate
        assert rows[("A0013", "B00013")]["ts"].strftime("%Y-%m-%d") == "2012-02-14"
        assert all(r["record"] is not None for r in frames.quarantine.collect())
        assert frames.items.filter("title is not null").count() == 0
    finally:
        frames.unpersist()


def test_csv_reviews_quoted_multiline(spark, tmp_path):
    header = "reviewerID,asin,reviewerName,helpful,reviewText,overall,summary,unixReviewTime,reviewTime\n"
    body = ('A1,0123456789,"Bob ""the builder""","[1, 2]","First line, with a comma\nsecond ""quoted"" line",'
            '5.0,great,1393545600,"02 28, 2014"\n'
            'A2,0123456789,,"[0, 0]",,2.0,meh,1363392000,"03 16, 2013"\n'
            'A3,B000000001,x,"[0, 0]","too few fields"\n'
            'A4,B000000002,Ann,"[0, 0]",fine,9.0,s,1363392000,"03 16, 2013"\n')
    path = tmp_path / "reviews.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(header + body)

    frames = read_amazon(spark, str(path), None, RUN, ETLConfig())
    try:
        assert_bronze(frames)
        rows = {r["user_key"]: r for r in frames.interactions.collect()}
        assert set(rows) == {"A1", "A2"}
        assert rows["A1"]["item_key"] == "0123456789"  # keys stay strings: leading zeros kept
        assert rows["A1"]["review_text"] == 'First line, with a comma\nsecond "quoted" line'
        assert rows["A1"]["rating"] == 5.0 and rows["A2"]["review_text"] is None
        names = {r["user_key"]: r["user_name"] for r in frames.users.collect()}
        assert names == {"A1": 'Bob "the builder"', "A2": None}
        reasons = [reason for reason, _ in quarantined(frames)]
        assert reasons == ["bad_csv", "rating_out_of_range"]
        assert frames.counts["reviews_read"] == 4
    finally:
        frames.unpersist()


def test_metadata_unescaped_split_and_deduplicated(spark, tmp_path):
    reviews = tmp_path / "reviews.json"
    reviews.write_text("\n".join(json.dumps(r) for r in [
        {"reviewerID": "U1", "asin": "I1", "overall": 5.0, "unixReviewTime": 1400000000},
        {"reviewerID": "U1", "asin": "I9", "overall": 3.0, "unixReviewTime": 1400000100},
    ]))
    meta_rows = [
        {"asin": "I1", "title": "Strings &amp; Things", "description": "Gibson&#39;s best &quot;strings&quot;",
         "brand": "Gibson", "categories": "Musical Instruments,Bags, Cases &amp; Covers,Gig Bags"},
        {"asin": "I1", "title": "Strings"},  # less complete duplicate: quarantined
        {"asin": "I2", "title": "Only in metadata", "categories": [["Musical Instruments", "Drums"]]},
    ]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in meta_rows) + '\n{"asin": "I3", "title": \n')

    frames = read_amazon(spark, str(reviews), str(meta), RUN, ETLConfig(), source="amazon")
    try:
        assert_bronze(frames)
        items = {r["item_key"]: r for r in frames.items.collect()}
        assert set(items) == {"I1", "I2", "I9"}  # I9 is reviewed but has no metadata
        assert items["I1"]["title"] == "Strings & Things"
        assert items["I1"]["description"] == 'Gibson\'s best "strings"'
        assert items["I1"]["categories"] == ["Musical Instruments", "Bags, Cases & Covers", "Gig Bags"]
        assert items["I2"]["categories"] == ["Musical Instruments", "Drums"]
        assert items["I9"]["title"] is None and items["I9"]["categories"] is None
        assert [reason for reason, _ in quarantined(frames)] == ["bad_json", "duplicate_key"]
        assert dict(meta_read=4, meta_accepted=2, meta_quarantined=2, items=3, items_with_metadata=2).items() \
            <= frames.counts.items()
    finally:
        frames.unpersist()


# --- LC-Rec -------------------------------------------------------------------------------

def _write_lcrec(d, with_item_json: bool) -> None:
    (d / "Toy.user2id").write_text("UA\t0\nUB\t1\nUC\t2\nbroken line\n")
    (d / "Toy.item2id").write_text("IA\t0\nIB\t1\nIC\t2\nID\t3\n")
    inter = {"0": [0, 1, 2], "1": [3, 0, 99], "2": [1], "7": [2]}  # item 99 and user 7 are unmapped
    (d / "Toy.inter.json").write_text(json.dumps(inter))
    if with_item_json:
        (d / "Toy.item.json").write_text(json.dumps({
            "0": {"title": "A &amp; B", "description": "", "brand": "X", "categories": "Musical Instruments,Amps"},
            "3": {"title": "D", "description": "d", "brand": "", "categories": ""},
            "42": {"title": "unmapped"}}))


def _toy_reviews(d) -> str:
    path = d / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"reviewerID": "UA", "asin": "IB", "reviewerName": "Ann", "overall": 4.0, "reviewText": "good",
         "summary": "ok", "unixReviewTime": 1400000000},
        {"reviewerID": "UB", "asin": "IA", "overall": 1.0, "unixReviewTime": 1400000500},
        {"reviewerID": "UZ", "asin": "IA", "overall": 2.0, "unixReviewTime": 1400000500},  # unmatched user
        {"reviewerID": "UC", "asin": "ID", "overall": 5.0, "unixReviewTime": 1400000900},  # pair not in inter
    ]))
    return str(path)


def test_lcrec_keys_positions_and_reviews(spark, tmp_path):
    _write_lcrec(tmp_path, with_item_json=True)
    frames = read_lcrec(spark, str(tmp_path), "Toy", RUN, ETLConfig(), reviews_path=_toy_reviews(tmp_path))
    try:
        assert_bronze(frames)
        rows = {(r["user_key"], r["item_key"]): r for r in frames.interactions.collect()}
        assert {k: r["position"] for k, r in rows.items()} == {
            ("UA", "IA"): 0, ("UA", "IB"): 1, ("UA", "IC"): 2, ("UB", "ID"): 0, ("UB", "IA"): 1, ("UC", "IB"): 0}
        assert all(r["source"] == "lcrec" for r in rows.values())
        assert rows[("UA", "IB")]["rating"] == 4.0 and rows[("UA", "IB")]["review_text"] == "good"
        assert rows[("UA", "IB")]["ts"].timestamp() == 1400000000
        assert rows[("UB", "IA")]["rating"] == 1.0 and rows[("UA", "IA")]["rating"] is None
        c = frames.counts
        assert (c["reviews_matched"], c["reviews_unmatched"]) == (2, 2)
        assert (c["lcrec_inter_read"], c["lcrec_inter_accepted"]) == (8, 6)
        assert c["lcrec_inter_quarantined_unmapped_item"] == 1 and c["lcrec_inter_quarantined_unmapped_user"] == 1
        assert c["lcrec_user2id_quarantined_bad_record"] == 1
        assert (c["lcrec_item_read"], c["lcrec_item_accepted"], c["lcrec_item_quarantined_unmapped_item"]) == (3, 2, 1)
        assert (c["users"], c["items"], c["items_with_metadata"]) == (3, 4, 2)

        items = {r["item_key"]: r for r in frames.items.collect()}
        assert items["IA"]["title"] == "A & B" and items["IA"]["categories"] == ["Musical Instruments", "Amps"]
        assert items["IA"]["description"] is None and items["ID"]["brand"] is None
        assert items["IB"]["title"] is None
        assert {r["user_key"]: r["user_name"] for r in frames.users.collect()} == {"UA": "Ann", "UB": None, "UC": None}
        reasons = sorted(reason for reason, _ in quarantined(frames))
        assert reasons == ["bad_record", "unmapped_item", "unmapped_item", "unmapped_user"]
    finally:
        frames.unpersist()


def test_lcrec_metadata_from_jsonl(spark, tmp_path):
    _write_lcrec(tmp_path, with_item_json=False)
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in [
        {"asin": "IC", "title": "C &amp; c", "categories": "Musical Instruments,Cables"},
        {"asin": "ZZ", "title": "not in the catalogue"}]))
    frames = read_lcrec(spark, str(tmp_path), "Toy", RUN, ETLConfig(), meta_path=str(meta))
    try:
        assert_bronze(frames)
        titles = {r["item_key"]: r["title"] for r in frames.items.collect()}
        assert titles == {"IA": None, "IB": None, "IC": "C & c", "ID": None}
        c = frames.counts
        assert (c["meta_read"], c["meta_accepted"], c["meta_unmatched"], c["items_with_metadata"]) == (2, 2, 1, 1)
        assert frames.interactions.filter("rating is not null or ts is not null").count() == 0
    finally:
        frames.unpersist()


# --- real data ----------------------------------------------------------------------------

REVIEWS_CSV = ("amazon14_musical_instruments", "reviews_Musical_Instruments_5.csv.gz")


@pytest.mark.realdata
def test_real_instruments(spark):
    d = shared_data("instruments")
    reviews = shared_data(*REVIEWS_CSV)
    frames = read_lcrec(spark, str(d), "Instruments", RUN, ETLConfig(), reviews_path=str(reviews),
                        meta_path=str(d / "meta_Musical_Instruments.jsonl"))
    try:
        assert_bronze(frames)
        c = frames.counts
        assert (c["users"], c["items"], c["interactions"], c["items_with_metadata"]) == (24772, 9922, 206153, 6250)
        assert (c["reviews_read"], c["reviews_quarantined"], c["meta_quarantined"]) == (10261, 0, 0)
        assert c["reviews_matched"] == 6174 and c["meta_unmatched"] == 0
        assert frames.interactions.count() == 206153
        with_rating = frames.interactions.filter("rating is not null and ts is not null").count()
        assert with_rating == 6174
        bags = frames.items.filter("array_contains(categories, 'Bags, Cases & Covers')").count()
        assert bags > 0 and frames.items.filter("title like '%&amp;%'").count() == 0
    finally:
        frames.unpersist()


@pytest.mark.realdata
def test_real_instruments_mql4grec(spark):
    d = shared_data("instruments_mql4grec")
    frames = read_lcrec(spark, str(d), "Instruments", RUN, ETLConfig())
    try:
        assert_bronze(frames)
        c = frames.counts
        assert (c["users"], c["items"], c["interactions"], c["items_with_metadata"]) == (17112, 6250, 136226, 6250)
        assert c["lcrec_item_read"] == c["lcrec_item_accepted"] == 6250
        assert frames.quarantine.count() == 0
    finally:
        frames.unpersist()


def test_no_nan_sneaks_into_ratings(spark, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"reviewerID": "A", "asin": "B", "overall": "NaN", "unixReviewTime": 1400000000}\n'
                    '{"reviewerID": "A", "asin": "C", "overall": " 4 ", "unixReviewTime": 1400000000}\n')
    frames = read_amazon(spark, str(path), None, RUN, ETLConfig())
    try:
        ratings = [r["rating"] for r in frames.interactions.collect()]
        assert ratings == [4.0] and not any(math.isnan(x) for x in ratings)
        assert [reason for reason, _ in quarantined(frames)] == ["bad_rating"]
    finally:
        frames.unpersist()
