"""Preference rows for SP-DPO and RF-DPO on a hand-built catalogue where every bucket is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from a3gr.catalog import CATALOG
from a3gr.scid import format_scid
from training.preference_pairs import (
    RELATIONS,
    SP_STAGES,
    build_real_feedback_pairs,
    build_self_play_pairs,
    prefix_relation,
    shared_prefix_length,
)

N = 3


def catalogue() -> pd.DataFrame:
    """36 items (a, b, c, d) with a, b in 1..3, c in 1..2, d in 0..1; item_id = 100 + row.

    Item 100 = (1,1,1,0): hard = {101, 102, 103}, medium = 104..111, easy = 112..135.
    Item 120 = (2,3,1,0): hard = {121, 122, 123}, medium = 112..119, easy = the 24 items with a != 2.
    """
    codes = [(a, b, c, d) for a in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2) for d in (0, 1)]
    frame = pd.DataFrame({"item_id": np.arange(100, 100 + len(codes), dtype=np.int64),
                          "codes": [list(c) for c in codes], "scid": [format_scid(c) for c in codes],
                          "tokenizer_version": "t"})
    return frame.sample(frac=1.0, random_state=0)  # row order must not matter


CODES = {int(i): np.asarray(c) for i, c in zip(catalogue()["item_id"], catalogue()["codes"])}


def prompts(*rows: tuple[int, int, int]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [u for u, _, _ in rows], "position": [p for _, p, _ in rows],
                         "prompt": [f"history of user {u} up to {p}" for u, p, _ in rows],
                         "chosen_item": [i for _, _, i in rows]}).astype({"user_id": "int64", "position": "int64"})


def generated(rows: dict[tuple[int, int], list[int]]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [u for u, _ in rows], "position": [p for _, p in rows],
                         "generated_items": list(rows.values())})


SP_PROMPTS = prompts((0, 3, 100), (1, 5, 120))
# User 0's generations: the chosen item, an unknown item (999), a duplicate and an excluded item (104).
SP_GENERATED = generated({(0, 3): [100, 130, 105, 999, 130, 101, 112, 104, 113, 114, 115]})
SP_EXCLUDE = pd.DataFrame({"user_id": [0], "item_id": [104]})


def self_play(n: int = N, seed: int = 7, exclude=SP_EXCLUDE):
    return build_self_play_pairs(SP_PROMPTS, SP_GENERATED, catalogue(), n, seed, "sft-v1", exclude=exclude)


def check_rows(frame: pd.DataFrame, n: int) -> None:
    """Every row: n distinct rejected items, never the chosen one, SCIDs and sources aligned."""
    assert list(frame.columns) == CATALOG["preference_pairs"].schema.names
    assert frame["pair_id"].is_unique
    pa.Table.from_pandas(frame, schema=CATALOG["preference_pairs"].schema, preserve_index=False)  # dtypes fit
    assert frame["user_id"].dtype == "int64" and frame["chosen_item"].dtype == "int64"
    scid_of = dict(zip(catalogue()["item_id"], catalogue()["scid"]))
    for row in frame.itertuples():
        assert len(row.rejected_items) == len(set(row.rejected_items)) == len(row.rejected) == n
        assert len(row.rejected_sources) == n
        assert row.chosen_item not in row.rejected_items and row.chosen not in row.rejected
        assert row.chosen == scid_of[row.chosen_item]
        assert row.rejected == [scid_of[i] for i in row.rejected_items]


def test_prefix_relation_for_one_pair_and_vectorised():
    assert prefix_relation([1, 1, 1, 0], [2, 1, 1, 0]) == "easy"
    assert prefix_relation([1, 1, 1, 0], [1, 2, 1, 0]) == "medium"
    assert prefix_relation([1, 1, 1, 0], [1, 1, 2, 0]) == "hard"
    assert prefix_relation([1, 1, 1, 0], [1, 1, 1, 5]) == "hard"  # same RQ-VAE codes, another item
    others = np.array([[2, 1, 1, 0], [1, 2, 2, 0], [1, 1, 3, 1]])
    assert prefix_relation(np.array([1, 1, 1, 0]), others).tolist() == ["easy", "medium", "hard"]
    assert shared_prefix_length(np.array([1, 1, 1, 0]), others).tolist() == [0, 1, 2]


def test_self_play_rows_keep_each_stage_prefix_rule():
    frame, stats = self_play()
    check_rows(frame, N)
    assert frame["stage"].tolist() == ["sp_easy", "sp_easy", "sp_medium", "sp_medium", "sp_hard", "sp_hard"]
    assert frame["model_version"].eq("sft-v1").all()
    rejected = np.stack([np.stack([CODES[i] for i in items]) for items in frame["rejected_items"]])  # [rows, N, 4]
    chosen = np.stack([CODES[i] for i in frame["chosen_item"]])[:, None, :]
    relation = np.minimum(shared_prefix_length(chosen, rejected), 2)
    expected = frame["stage"].map(lambda s: RELATIONS.index(SP_STAGES[s])).to_numpy()[:, None]
    assert (relation == expected).all()
    assert stats == {"sp_easy": {"rows": 2, "dropped": 0, "generated": 3, "prefix_fill": 3},
                     "sp_medium": {"rows": 2, "dropped": 0, "generated": 1, "prefix_fill": 5},
                     "sp_hard": {"rows": 2, "dropped": 0, "generated": 1, "prefix_fill": 5}}


def test_generated_items_come_first_in_rank_order_then_prefix_fill():
    frame, _ = self_play()
    rows = frame.set_index("pair_id")
    # The chosen item, the unknown item, the duplicate and the excluded item 104 are skipped.
    assert rows.at["sp_easy:0:3", "rejected_items"] == [130, 112, 113]
    assert rows.at["sp_easy:0:3", "rejected_sources"] == ["generated"] * 3
    medium = rows.at["sp_medium:0:3", "rejected_items"]
    assert medium[0] == 105 and 104 not in medium
    assert rows.at["sp_medium:0:3", "rejected_sources"] == ["generated", "prefix_fill", "prefix_fill"]
    assert rows.at["sp_hard:0:3", "rejected_items"][0] == 101
    assert set(rows.at["sp_hard:0:3", "rejected_items"]) == {101, 102, 103}
    # User 1 generated nothing: every rejected item is a fill.
    assert all(s == ["prefix_fill"] * N for s in rows.loc[rows["user_id"] == 1, "rejected_sources"])


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_fills():
    first, _ = self_play(seed=7)
    pd.testing.assert_frame_equal(first, self_play(seed=7)[0])
    other, _ = self_play(seed=8)
    assert first["rejected_items"].tolist() != other["rejected_items"].tolist()
    assert first.loc[0, "rejected_items"] == other.loc[0, "rejected_items"]  # all generated: no randomness
    # A row does not depend on which other prompts are present.
    alone, _ = build_self_play_pairs(SP_PROMPTS.iloc[1:], SP_GENERATED, catalogue(), N, 7, "sft-v1")
    pd.testing.assert_frame_equal(alone.reset_index(drop=True),
                                  first[first["user_id"] == 1].reset_index(drop=True))


def test_rows_the_catalogue_cannot_fill_are_dropped_and_counted():
    frame, stats = self_play(n=4)  # each chosen item has only 3 hard neighbours
    check_rows(frame, 4)
    assert set(frame["stage"]) == {"sp_easy", "sp_medium"}
    assert stats["sp_hard"] == {"rows": 0, "dropped": 2, "generated": 0, "prefix_fill": 0}
    assert stats["sp_medium"]["dropped"] == 0
    _, stats = self_play(n=8, exclude=None)  # user 0 has 8 medium items; excluding 104 leaves 7
    assert stats["sp_medium"]["dropped"] == 0
    _, stats = self_play(n=8)
    assert stats["sp_medium"] == {"rows": 1, "dropped": 1, "generated": 0, "prefix_fill": 8}


def test_unknown_chosen_item_is_named():
    with pytest.raises(ValueError, match="no SCID for the chosen item of prompt \\(user 0, position 1\\).* 999"):
        build_self_play_pairs(prompts((0, 1, 999)), SP_GENERATED, catalogue(), N, 7, "v")


# --- RF-DPO ------------------------------------------------------------------------------------

def feedback() -> pd.DataFrame:
    rows = [(0, 100, "liked", "train"), (0, 101, "liked", "train"), (0, 130, "disliked", "train"),
            (0, 131, "disliked", "train"), (0, 132, "disliked", "train"), (0, 133, "disliked", "train"),
            (0, 110, "neutral", "train"), (0, 111, None, "train"), (0, 134, "disliked", "valid"),
            (0, 135, "neutral", "test"),
            (1, 120, "liked", "train"), (1, 121, "neutral", "train"), (1, 122, "neutral", "train"),
            (1, 124, "disliked", "valid")]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "split"])


RF_PROMPTS = prompts((0, 1, 100), (0, 2, 101), (1, 0, 120))
RF_GENERATED = generated({(0, 1): [100, 110, 125, 126, 101, 127], (0, 2): [], (1, 0): [121, 112, 113]})


def real_feedback(seed: int = 7, items: pd.DataFrame | None = None):
    return build_real_feedback_pairs(RF_PROMPTS, feedback(), RF_GENERATED, catalogue() if items is None else items,
                                     N, seed, "sp-v1")


def test_real_feedback_rows_use_train_feedback_first_then_model_then_random():
    frame, stats = real_feedback()
    check_rows(frame, N)
    rows = frame.set_index("pair_id")
    for pid in ("rf_easy:0:1", "rf_easy:0:2"):  # 4 disliked train items: a sample of 3, no fill
        assert set(rows.at[pid, "rejected_items"]) < {130, 131, 132, 133}
        assert rows.at[pid, "rejected_sources"] == ["disliked"] * 3
    assert rows.at["rf_hard:0:1", "rejected_items"] == [110, 125, 126]  # 110 interacted, 101 liked: not unchosen
    assert rows.at["rf_hard:0:1", "rejected_sources"] == ["neutral", "model_unchosen", "model_unchosen"]
    assert rows.at["rf_hard:0:2", "rejected_sources"] == ["neutral", "random_fill", "random_fill"]
    assert rows.at["rf_easy:1:0", "rejected_items"][:2] == [112, 113]  # user 1 has no disliked train item
    assert rows.at["rf_easy:1:0", "rejected_sources"] == ["model_unchosen", "model_unchosen", "random_fill"]
    assert rows.at["rf_hard:1:0", "rejected_items"] == [121, 122, 112]
    assert stats["rf_easy"] == {"rows": 3, "dropped": 0, "with_feedback": 2, "disliked": 6, "model_unchosen": 2,
                                "random_fill": 1}
    assert stats["rf_hard"] == {"rows": 3, "dropped": 0, "with_feedback": 3, "neutral": 4, "model_unchosen": 3,
                                "random_fill": 2}


def test_real_feedback_never_rejects_liked_or_train_items_as_fill_and_ignores_held_out_labels():
    frame, _ = real_feedback()
    train = feedback()[feedback()["split"] == "train"]
    for row in frame.itertuples():
        mine = train[train["user_id"] == row.user_id]
        liked = set(mine.loc[mine["label"] == "liked", "item_id"])
        assert not liked & set(row.rejected_items)
        for item, source in zip(row.rejected_items, row.rejected_sources):
            if source in ("disliked", "neutral"):  # 134 (disliked) and 135 (neutral) are held-out labels
                assert mine.loc[mine["item_id"] == item, "label"].tolist() == [source]
            else:
                assert item not in set(mine["item_id"])  # fills are items the user never interacted with


def test_real_feedback_is_deterministic_and_drops_rows_it_cannot_fill():
    pd.testing.assert_frame_equal(real_feedback(seed=3)[0], real_feedback(seed=3)[0])
    # Here 130-133 have no SCID and user 0 never interacted with only 120 and 121: rf_easy needs 3 fills.
    small = catalogue()[catalogue()["item_id"].isin([100, 101, 110, 111, 120, 121])]
    frame, stats = real_feedback(items=small)
    check_rows(frame, N)
    assert stats["rf_easy"]["dropped"] == 2 and stats["rf_easy"]["rows"] == 1
    assert frame["pair_id"].tolist() == ["rf_easy:1:0", "rf_hard:0:1", "rf_hard:0:2", "rf_hard:1:0"]


def test_chosen_item_that_is_not_liked_in_train_is_an_error():
    with pytest.raises(ValueError, match="not a liked train item.*\\(0, 4, 130\\)"):
        build_real_feedback_pairs(prompts((0, 4, 130)), feedback(), RF_GENERATED, catalogue(), N, 7, "v")


def test_built_rows_pass_the_preference_pairs_expectation_suite():
    from expectations import require_valid

    frame = pd.concat([self_play()[0], real_feedback()[0]], ignore_index=True)
    as_read = pa.Table.from_pandas(frame, schema=CATALOG["preference_pairs"].schema, preserve_index=False).to_pandas()
    require_valid("preference_pairs", as_read, {"n_rejected": N, "expected_row_count": 12})


def test_sequence_neighbors_pairs_items_within_the_window_both_ways():
    from training.preference_pairs import sequence_neighbors

    near = sequence_neighbors([[1, 2, 3, 4], [5, 5, 6]], window=1)
    assert set(map(tuple, near.to_numpy())) == {(1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3), (5, 6), (6, 5)}
    wider = set(map(tuple, sequence_neighbors([[1, 2, 3, 4]], window=2).to_numpy()))
    assert {(1, 3), (3, 1), (2, 4), (4, 2)} <= wider and (1, 4) not in wider
    assert sequence_neighbors([[7], []], window=3).empty


def test_neighbours_of_the_chosen_item_are_never_rejected():
    from training.preference_pairs import sequence_neighbors

    # 130 and 112 are user 0's first two easy generations; 105 the first medium one.
    near = sequence_neighbors([[130, 100, 105], [112, 100]], window=1)
    frame, _ = build_self_play_pairs(SP_PROMPTS, SP_GENERATED, catalogue(), N, 7, "sft-v1", exclude=SP_EXCLUDE,
                                     neighbors=near)
    check_rows(frame, N)
    rows = frame.set_index("pair_id")
    assert rows.at["sp_easy:0:3", "rejected_items"] == [113, 114, 115]
    assert 105 not in rows.at["sp_medium:0:3", "rejected_items"]
    blocked = {130, 105, 112}
    assert not any(blocked & set(items) for items in frame.loc[frame["chosen_item"] == 100, "rejected_items"])
    # real feedback: a neighbour is never a model or random fill, but the user's own dislikes stay
    rf_near = sequence_neighbors([[110, 100, 125]], window=1)
    rf, _ = build_real_feedback_pairs(RF_PROMPTS, feedback(), RF_GENERATED, catalogue(), N, 7, "v",
                                      neighbors=rf_near)
    check_rows(rf, N)
    chosen_100 = rf[rf["chosen_item"] == 100]
    for items, sources in zip(chosen_100["rejected_items"], chosen_100["rejected_sources"]):
        assert all(i not in (110, 125) or s in ("disliked", "neutral") for i, s in zip(items, sources))
    hard = rf.set_index("pair_id").at["rf_hard:0:1", "rejected_items"]
    assert 110 in hard and 125 not in hard  # 110 is the user's own neutral item; 125 was a model fill
