"""The SCID codec: format/parse round trip, strict validation, uniqueness level, trie."""
import numpy as np
import pytest

from a3gr.scid import (ScidError, ScidTrie, add_uniqueness_level, collision_rate, format_scid, is_valid_scid,
                       parse_scid, vocabulary)


def test_format_parse_round_trip_and_namespaces():
    assert format_scid([12, 200, 7, 0]) == "<a_12><b_200><c_7><d_0>"
    assert format_scid([1, 2, 3], kind="user") == "<u_a_1><u_b_2><u_c_3>"
    assert parse_scid("<a_12><b_200><c_7><d_0>") == [12, 200, 7, 0]
    assert parse_scid("<u_a_1><u_b_2><u_c_3>", kind="user") == [1, 2, 3]


@pytest.mark.parametrize("text, kind", [
    ("<a_1><c_2>", "item"),            # level skipped
    ("<u_a_1><u_b_2>", "item"),        # user tokens where an item SCID is expected
    ("<a_1><b_2>", "user"),            # item tokens where a user SCID is expected
    ("x<a_1>", "item"), ("<a_1> ", "item"), ("", "item"), ("<a_-1>", "item"),
])
def test_malformed_scids_are_rejected(text, kind):
    with pytest.raises(ScidError):
        parse_scid(text, kind)
    assert not is_valid_scid(text, kind)


def test_level_count_is_checked():
    assert is_valid_scid("<a_1><b_2><c_3><d_0>", levels=4)
    assert not is_valid_scid("<a_1><b_2><c_3>", levels=4)


def test_uniqueness_level_makes_every_row_distinct_deterministically():
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3], [0, 0, 1]])
    order = np.array([30, 10, 5, 20, 7])
    out = add_uniqueness_level(codes, order)
    assert collision_rate(codes) == pytest.approx(3 / 5)
    assert collision_rate(out) == 0.0
    # Within the [1,2,3] group ranks follow `order`: ids 10, 20, 30 -> 0, 1, 2.
    assert out[:, 3].tolist() == [2, 0, 0, 1, 0]
    assert np.array_equal(add_uniqueness_level(codes[::-1], order[::-1]), out[::-1])


def test_trie_allows_only_real_prefixes():
    trie = ScidTrie([[1, 2, 3, 0], [1, 2, 4, 0], [5, 0, 0, 0]])
    assert trie.allowed([]) == [1, 5]
    assert trie.allowed([1, 2]) == [3, 4]
    assert trie.allowed([1, 9]) == []
    assert [1, 2, 4, 0] in trie and [1, 2, 4] not in trie and len(trie) == 3


def test_vocabulary_sizes():
    vocab = vocabulary([4, 4, 4, 2])
    assert len(vocab) == 14 and vocab[0] == "<a_0>" and vocab[-1] == "<d_1>"
    assert set(vocabulary([2], "user")) == {"<u_a_0>", "<u_a_1>"}
