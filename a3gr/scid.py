"""The SCID codec: one place that formats, parses and validates SCIDs and builds the prefix trie.

Item SCID: `<a_12><b_200><c_7><d_0>` (RQ-VAE levels a, b, c plus a 4th level d that makes every
item unique). User SCID: `<u_a_1><u_b_2><u_c_3>`, its own token namespace, so user and item
tokens never mix in the LLM vocabulary.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

LEVEL_NAMES = "abcdefgh"
PREFIX = {"item": "", "user": "u_"}


class ScidError(ValueError):
    """A string that is not a well-formed SCID of the expected kind."""


def _check_kind(kind: str) -> str:
    if kind not in PREFIX:
        raise ScidError(f"unknown SCID kind {kind!r}; expected 'item' or 'user'")
    return PREFIX[kind]


def token(level: int, code: int, kind: str = "item") -> str:
    return f"<{_check_kind(kind)}{LEVEL_NAMES[level]}_{int(code)}>"


def format_scid(codes: Sequence[int], kind: str = "item") -> str:
    if not len(codes) or len(codes) > len(LEVEL_NAMES):
        raise ScidError(f"an SCID has 1 to {len(LEVEL_NAMES)} levels, got {len(codes)}")
    if any(int(c) < 0 for c in codes):
        raise ScidError(f"SCID codes must be >= 0, got {list(codes)}")
    return "".join(token(level, c, kind) for level, c in enumerate(codes))


_TOKEN = re.compile(r"<(u_)?([a-h])_(\d+)>")


def parse_scid(text: str, kind: str = "item", levels: int | None = None) -> list[int]:
    """Codes of an SCID string; raises ScidError naming what is wrong."""
    prefix = _check_kind(kind)
    codes, pos = [], 0
    for match in _TOKEN.finditer(text):
        if match.start() != pos:
            raise ScidError(f"{text!r}: unexpected text at position {pos}")
        if (match.group(1) or "") != prefix:
            raise ScidError(f"{text!r}: token {match.group(0)} is not a {kind} token")
        if match.group(2) != LEVEL_NAMES[len(codes)]:
            raise ScidError(f"{text!r}: level {len(codes) + 1} should be '{LEVEL_NAMES[len(codes)]}', "
                            f"got '{match.group(2)}'")
        codes.append(int(match.group(3)))
        pos = match.end()
    if pos != len(text) or not codes:
        raise ScidError(f"{text!r}: not a {kind} SCID")
    if levels is not None and len(codes) != levels:
        raise ScidError(f"{text!r}: expected {levels} levels, got {len(codes)}")
    return codes


def is_valid_scid(text: str, kind: str = "item", levels: int | None = None) -> bool:
    try:
        parse_scid(text, kind, levels)
        return True
    except ScidError:
        return False


def vocabulary(level_sizes: Sequence[int], kind: str = "item") -> list[str]:
    """Every token of the given level sizes, to add to an LLM vocabulary."""
    return [token(level, c, kind) for level, size in enumerate(level_sizes) for c in range(size)]


def add_uniqueness_level(codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[n, L] codes -> [n, L+1]: the last code ranks each row (by `order`) within its identical-prefix group.

    Deterministic: the same codes and order give the same SCIDs, so re-running assigns nothing new.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    extra = np.zeros(n, dtype=np.int64)
    if n:
        sort = np.lexsort([np.asarray(order)] + [codes[:, j] for j in reversed(range(codes.shape[1]))])
        sorted_codes = codes[sort]
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
        extra[sort] = np.arange(n) - group_start
    return np.concatenate([codes, extra[:, None]], axis=1)


def collision_rate(codes: np.ndarray) -> float:
    """Fraction of rows whose full code is shared with at least one other row."""
    codes = np.asarray(codes)
    if not len(codes):
        return 0.0
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean())


class ScidTrie:
    """Prefix trie over code sequences: which next codes keep a prefix on a real SCID."""

    def __init__(self, sequences: Iterable[Sequence[int]]):
        self.root: dict = {}
        self.size = 0
        for seq in sequences:
            node = self.root
            for code in seq:
                node = node.setdefault(int(code), {})
            if not node.get(None):
                node[None] = True  # end marker: a complete SCID
                self.size += 1

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Codes that may follow `prefix` (empty if the prefix leads to no SCID)."""
        node = self.root
        for code in prefix:
            node = node.get(int(code))
            if node is None:
                return []
        return sorted(k for k in node if k is not None)

    def __contains__(self, seq: Sequence[int]) -> bool:
        node = self.root
        for code in seq:
            node = node.get(int(code))
            if node is None:
                return False
        return bool(node.get(None))

    def __len__(self) -> int:
        return self.size
