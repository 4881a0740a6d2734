"""Ranking metrics of the paper: Recall@K and NDCG@K with one held-out item per user (leave-one-out)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rank_of_target(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> np.ndarray:
    """1-based rank of each user's target in their ranked list, 0 when absent."""
    ranks = np.zeros(len(targets), dtype=np.int64)
    for row, (items, target) in enumerate(zip(ranked, targets)):
        hits = np.flatnonzero(np.asarray(items) == target)
        if len(hits):
            ranks[row] = hits[0] + 1
    return ranks


def recall_ndcg(ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int] = (5, 10)) -> dict:
    """{'recall@K': ..., 'ndcg@K': ...}: with one relevant item, recall is the hit rate and
    NDCG is 1/log2(rank+1) when the target is within the top K."""
    ranks = rank_of_target(ranked, targets)
    out = {}
    for k in ks:
        hit = (ranks > 0) & (ranks <= k)
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        gains = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(ranks) else 0.0
    return out
