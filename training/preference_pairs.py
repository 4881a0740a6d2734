"""Preference rows for progressive Softmax-DPO: one chosen item vs N rejected items per prompt.

Self-play (SP-DPO) rejects the model's own generated items, bucketed by how much SCID prefix they
share with the chosen item (easy: none of the 3 RQ-VAE codes, medium: the first, hard: at least the
first two). Real feedback (RF-DPO) rejects the user's disliked (easy) or neutral (hard) items.
Short rows are topped up with seeded random items that keep the stage's rule; every rejected item
records its source. Items next to the chosen one in some user's training sequence (`sequence_neighbors`)
can be kept out of the model-made and random negatives: they are likely positives. Pure pandas / numpy:
the job shell reads and writes the tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from a3gr.catalog import spec

SP_STAGES = {"sp_easy": "easy", "sp_medium": "medium", "sp_hard": "hard"}
RF_STAGES = {"rf_easy": "disliked", "rf_hard": "neutral"}
STAGES = tuple(SP_STAGES) + tuple(RF_STAGES)
RELATIONS = ("easy", "medium", "hard")
PREFIX_LEVELS = 3  # the RQ-VAE levels; the 4th (uniqueness) code carries no semantics
SOURCES = ("generated", "prefix_fill", "disliked", "neutral", "model_unchosen", "random_fill")


def shared_prefix_length(chosen_codes, other_codes, levels: int = PREFIX_LEVELS) -> np.ndarray:
    """How many leading codes, among the first ``levels``, ``other_codes`` shares with ``chosen_codes``.

    Both are array-likes [..., >= levels] and broadcast against each other (one chosen vs many others).
    """
    a = np.asarray(chosen_codes)[..., :levels]
    b = np.asarray(other_codes)[..., :levels]
    return np.cumprod(a == b, axis=-1).sum(axis=-1)


def prefix_relation(chosen_codes, other_codes):
    """'easy' (no shared leading code), 'medium' (one) or 'hard' (two or more) per row; a str for one pair."""
    shared = shared_prefix_length(chosen_codes, other_codes)
    labels = np.asarray(RELATIONS, dtype=object)[np.minimum(shared, len(RELATIONS) - 1)]
    return labels if np.ndim(labels) else str(labels)


@dataclass(frozen=True)
class _Catalogue:
    """item_scid in item_id order, with id -> row lookups."""

    item_ids: np.ndarray
    codes: np.ndarray
    scids: np.ndarray

    @classmethod
    def of(cls, item_scid: pd.DataFrame) -> _Catalogue:
        frame = item_scid.sort_values("item_id")
        item_ids = frame["item_id"].to_numpy(np.int64)
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("item_scid: item_id is not unique")
        codes = np.stack([np.asarray(c, dtype=np.int64) for c in frame["codes"]]) if len(frame) else \
            np.empty((0, PREFIX_LEVELS + 1), np.int64)
        return cls(item_ids, codes, frame["scid"].to_numpy(object))

    def rows(self, items) -> np.ndarray:
        """Catalogue rows of ``items`` in their order; items without an SCID are left out."""
        items = np.asarray(items, dtype=np.int64).ravel()
        pos = np.searchsorted(self.item_ids, items).clip(max=max(len(self.item_ids) - 1, 0))
        known = (self.item_ids[pos] == items) if len(self.item_ids) else np.zeros(len(items), bool)
        return pos[known]

    def row(self, item: int, what: str) -> int:
        found = self.rows([item])
        if not len(found):
            raise ValueError(f"item_scid: no SCID for {what} item {item}")
        return int(found[0])


def sequence_neighbors(sequences, window: int) -> pd.DataFrame:
    """(item_id, neighbor_id): items at most ``window`` positions apart in some sequence, both directions.

    On Instruments, 27 % of the model's own top candidates for a training prompt were direct neighbours
    of its chosen item (window 1), and they covered 41 % of the rows whose rejected items held the user's
    held-out next item: such items are likely positives, so a negative should not be one.
    """
    pairs = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for gap in range(1, min(window, len(seq) - 1) + 1):
            pairs.append(np.stack([seq[:-gap], seq[gap:]], axis=1))
    if not pairs:
        return pd.DataFrame({"item_id": pd.Series([], dtype="int64"), "neighbor_id": pd.Series([], dtype="int64")})
    both = np.concatenate(pairs)
    both = np.concatenate([both, both[:, ::-1]])
    both = both[both[:, 0] != both[:, 1]]
    return pd.DataFrame(np.unique(both, axis=0), columns=["item_id", "neighbor_id"])


def _per_item(neighbors: pd.DataFrame | None) -> dict[int, np.ndarray]:
    if neighbors is None or neighbors.empty:
        return {}
    return {int(i): g.to_numpy(np.int64) for i, g in neighbors.groupby("item_id", sort=False)["neighbor_id"]}


def _per_user(frame: pd.DataFrame | None, column: str = "item_id") -> dict[int, np.ndarray]:
    if frame is None or frame.empty:
        return {}
    return {int(u): g.to_numpy(np.int64) for u, g in frame.groupby("user_id", sort=False)[column]}


def _generated_lists(prompts: pd.DataFrame, generated: pd.DataFrame) -> list[np.ndarray]:
    """generated_items of each prompt row, matched on (user_id, position); empty where none was generated."""
    keys = ["user_id", "position"]
    if generated.duplicated(keys).any():
        raise ValueError("generated: (user_id, position) is not unique")
    merged = prompts[keys].merge(generated[keys + ["generated_items"]], on=keys, how="left")
    return [np.asarray(v if isinstance(v, (list, tuple, np.ndarray)) else [], dtype=np.int64)
            for v in merged["generated_items"]]


def _first_unique(rows: np.ndarray) -> np.ndarray:
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)]


def _sample(rng: np.random.Generator, allowed: np.ndarray, taken: np.ndarray, need: int) -> np.ndarray | None:
    """``need`` distinct random rows where ``allowed`` holds, none of them ``taken``; None if too few."""
    if need <= 0:
        return np.empty(0, np.int64)
    pool = allowed.copy()
    pool[taken] = False
    pool = np.flatnonzero(pool)
    return rng.choice(pool, need, replace=False) if len(pool) >= need else None


def _row_rng(seed: int, stage: str, user_id: int, position: int) -> np.random.Generator:
    # One generator per (stage, prompt): a row's fill does not depend on which other prompts are present.
    return np.random.default_rng([seed, STAGES.index(stage), user_id, position])


def _record(stage: str, prompt, cat: _Catalogue, chosen_row: int, parts: list[tuple[np.ndarray, str]],
            model_version: str) -> dict:
    rows = np.concatenate([r for r, _ in parts])
    return {
        "pair_id": f"{stage}:{prompt.user_id}:{prompt.position}", "stage": stage, "user_id": int(prompt.user_id),
        "prompt": prompt.prompt, "chosen_item": int(prompt.chosen_item), "chosen": cat.scids[chosen_row],
        "rejected_items": cat.item_ids[rows].tolist(), "rejected": cat.scids[rows].tolist(),
        "rejected_sources": [source for r, source in parts for _ in range(len(r))],
        "model_version": model_version,
    }


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=spec("preference_pairs").schema.names)
    return frame.astype({"user_id": "int64", "chosen_item": "int64"})


def build_self_play_pairs(prompts: pd.DataFrame, generated: pd.DataFrame, item_scid: pd.DataFrame, n_rejected: int,
                          seed: int, model_version: str,
                          exclude: pd.DataFrame | None = None,
                          neighbors: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """SP-DPO rows: per prompt and stage sp_easy / sp_medium / sp_hard, N rejected items of the stage's prefix bucket.

    Args:
        prompts: user_id, position, prompt, chosen_item (the true next item).
        generated: user_id, position, generated_items (item ids in model rank order, e.g. constrained beam search).
        item_scid: item_id, codes, scid.
        exclude: optional user_id, item_id: items never rejected for that user (e.g. their other known items).
        neighbors: optional item_id, neighbor_id: items never rejected where item_id is the chosen one.

    Rejected items are the generated ones of the bucket in rank order (source 'generated'), topped up with
    seeded random catalogue items of the bucket ('prefix_fill'). A row whose bucket the catalogue cannot
    fill is dropped. Stats per stage: rows, dropped, and the count of rejected items per source.
    """
    cat = _Catalogue.of(item_scid)
    excluded, near = _per_user(exclude), _per_item(neighbors)
    stats = {stage: {"rows": 0, "dropped": 0, "generated": 0, "prefix_fill": 0} for stage in SP_STAGES}
    records: dict[str, list[dict]] = {stage: [] for stage in SP_STAGES}
    for prompt, generated_items in zip(prompts.itertuples(index=False), _generated_lists(prompts, generated)):
        chosen_row = cat.row(prompt.chosen_item, f"the chosen item of prompt (user {prompt.user_id}, "
                                                 f"position {prompt.position}): chosen")
        blocked = np.concatenate([cat.rows(excluded.get(int(prompt.user_id), [])),
                                  cat.rows(near.get(int(prompt.chosen_item), [])), [chosen_row]])
        relation = np.minimum(shared_prefix_length(cat.codes[chosen_row], cat.codes), len(RELATIONS) - 1)
        candidates = _first_unique(cat.rows(generated_items))
        for stage, bucket in SP_STAGES.items():
            allowed = relation == RELATIONS.index(bucket)
            allowed[blocked] = False
            picked = candidates[allowed[candidates]][:n_rejected]
            rng = _row_rng(seed, stage, prompt.user_id, prompt.position)
            fill = _sample(rng, allowed, picked, n_rejected - len(picked))
            if fill is None:
                stats[stage]["dropped"] += 1
                continue
            stats[stage]["rows"] += 1
            stats[stage]["generated"] += len(picked)
            stats[stage]["prefix_fill"] += len(fill)
            records[stage].append(_record(stage, prompt, cat, chosen_row, [(picked, "generated"),
                                                                           (fill, "prefix_fill")], model_version))
    return _frame([r for stage in SP_STAGES for r in records[stage]]), stats


def build_real_feedback_pairs(prompts: pd.DataFrame, feedback: pd.DataFrame, generated: pd.DataFrame,
                              item_scid: pd.DataFrame, n_rejected: int, seed: int,
                              model_version: str, neighbors: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """RF-DPO rows: per prompt, rf_easy rejects the user's disliked items and rf_hard their neutral items.

    Args:
        prompts: user_id, position, prompt, chosen_item, where chosen_item is one of the user's liked train items.
        feedback: user_id, item_id, label (disliked / neutral / liked), split; only split == 'train' is used.
        generated: user_id, position, generated_items (model rank order) for the same prompts.
        item_scid: item_id, codes, scid.
        neighbors: optional item_id, neighbor_id: never used as a model or random fill where item_id is chosen
            (the user's own disliked / neutral items are always kept).

    Real feedback comes first (a seeded sample of N where the user has more); short rows are filled with
    generated items the user never interacted with ('model_unchosen', rank order), then random catalogue
    items the user never interacted with ('random_fill'). A row the catalogue cannot fill is dropped.
    Stats per stage: rows, dropped, with_feedback (rows with at least one real-feedback rejection) and the
    count of rejected items per source.
    """
    cat = _Catalogue.of(item_scid)
    train = feedback[feedback["split"] == "train"]
    interacted = _per_user(train)
    by_label = {label: _per_user(train[train["label"] == label]) for label in ("disliked", "neutral", "liked")}
    _check_chosen_liked(prompts, by_label["liked"])
    stats = {stage: {"rows": 0, "dropped": 0, "with_feedback": 0, label: 0, "model_unchosen": 0, "random_fill": 0}
             for stage, label in RF_STAGES.items()}
    records: dict[str, list[dict]] = {stage: [] for stage in RF_STAGES}
    near = _per_item(neighbors)
    for prompt, generated_items in zip(prompts.itertuples(index=False), _generated_lists(prompts, generated)):
        user = int(prompt.user_id)
        chosen_row = cat.row(prompt.chosen_item, f"the chosen item of prompt (user {user}, "
                                                 f"position {prompt.position}): chosen")
        allowed = np.ones(len(cat.item_ids), bool)
        allowed[cat.rows(interacted.get(user, []))] = False
        allowed[chosen_row] = False
        allowed[cat.rows(near.get(int(prompt.chosen_item), []))] = False
        candidates = _first_unique(cat.rows(generated_items))
        unchosen = candidates[allowed[candidates]]
        for stage, label in RF_STAGES.items():
            rng = _row_rng(seed, stage, user, prompt.position)
            real = _first_unique(cat.rows(by_label[label].get(user, [])))
            real = real[real != chosen_row]
            if len(real) > n_rejected:
                real = real[np.sort(rng.choice(len(real), n_rejected, replace=False))]
            model = unchosen[:n_rejected - len(real)]
            fill = _sample(rng, allowed, np.concatenate([real, model]), n_rejected - len(real) - len(model))
            if fill is None:
                stats[stage]["dropped"] += 1
                continue
            counts = stats[stage]
            counts["rows"] += 1
            counts["with_feedback"] += int(len(real) > 0)
            counts[label] += len(real)
            counts["model_unchosen"] += len(model)
            counts["random_fill"] += len(fill)
            records[stage].append(_record(stage, prompt, cat, chosen_row, [
                (real, label), (model, "model_unchosen"), (fill, "random_fill")], model_version))
    return _frame([r for stage in RF_STAGES for r in records[stage]]), stats


def _check_chosen_liked(prompts: pd.DataFrame, liked: dict[int, np.ndarray]) -> None:
    bad = [(int(u), int(p), int(i)) for u, p, i in zip(prompts["user_id"], prompts["position"], prompts["chosen_item"])
           if i not in liked.get(int(u), ())]
    if bad:
        raise ValueError(f"prompts: {len(bad)} rows whose chosen_item is not a liked train item of the user; "
                         f"first (user_id, position, chosen_item): {bad[:5]}")
