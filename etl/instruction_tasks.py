"""The multi-task instruction table `sft_examples` from the silver and token tables (pure transform).

Spark gathers each user's train and valid interactions (oldest first) with their item SCIDs and
titles; a pure Python function (`user_examples`) writes that user's examples with the templates
of `a3gr.prompts`. Test interactions never enter, and every split='train' example is built from
the train split only; the one split='valid' example per user (SEQ, template 0, as at inference)
predicts the valid item. `item_ids` lists every item an example mentions, so the expectation
suite can check both rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from a3gr.config import InstructionConfig
from a3gr.prompts import TASK_FAMILIES, clip_text, render, stable_hash, template_count, template_for
from a3gr.spark import conform, spark_schema
from etl.transforms import STOPWORDS, TRAIN, VALID

INTENT_KEYWORDS = 8  # title words in a c2 intention query (after the item's category)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_COLUMNS = [f.name for f in spark_schema("sft_examples")]


@dataclass(frozen=True)
class Event:
    """One train or valid interaction of a user, with what prompts say about its item."""

    position: int
    item_id: int
    split: str
    scid: str
    title: str | None
    category: str | None


def enabled_tasks(families: Sequence[str]) -> list[str]:
    unknown = sorted(set(families) - set(TASK_FAMILIES))
    if unknown:
        raise ValueError(f"train.instructions.tasks: unknown task families {unknown}; "
                         f"known: {', '.join(TASK_FAMILIES)}")
    return [task for family in TASK_FAMILIES if family in families for task in TASK_FAMILIES[family]]


def intent_query(title: str | None, category: str | None, max_chars: int) -> str:
    """A short search intention for an item: its category, then the key words of its title."""
    words = [w for w in _WORD.findall((title or "").lower()) if w not in STOPWORDS and len(w) > 1]
    keywords = " ".join(list(dict.fromkeys(words))[:INTENT_KEYWORDS])
    category = clip_text(category, max_chars).lower()
    return clip_text(f"{category}: {keywords}" if category and keywords else category or keywords, max_chars)


def _dedupe(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))


def user_examples(user_id: int, user_scid: str, events: Sequence[Event], profile_text: str | None,
                  profile_items: Sequence[int], icfg: InstructionConfig, max_history: int, seed: int) -> list[dict]:
    """All instruction rows of one user (dicts in the `sft_examples` schema).

    `events` are the user's train and valid interactions; anything else is ignored. `profile_items`
    are the items the profile text was built from (they count as mentioned by b1/b2 rows).
    """
    tasks = enabled_tasks(icfg.tasks)
    train = sorted((e for e in events if e.split == TRAIN), key=lambda e: e.position)
    valid = sorted((e for e in events if e.split == VALID), key=lambda e: e.position)
    profile = clip_text(profile_text, icfg.max_profile_chars)
    profile_ids = _dedupe(profile_items)
    rows: list[dict] = []

    def add(task: str, key: object, fields: dict, response: str, target: int | None, item_ids: Sequence[int],
            split: str = TRAIN) -> None:
        example_id = f"{task}:{user_id}:{key}"
        template = 0 if split == VALID else template_for(example_id, min(icfg.templates, template_count(task)), seed)
        rows.append({"example_id": example_id, "task": task, "template": template, "user_id": int(user_id),
                     "prompt": render(task, template, user=user_scid, **fields), "response": response,
                     "target_item": target, "item_ids": _dedupe(item_ids), "split": split})

    def history(end: int, length: int) -> list[Event]:
        return train[max(0, end - length):end]

    def recent_targets(limit: int) -> range:
        first = 1 if limit <= 0 else max(1, len(train) - limit)
        return range(first, len(train))

    def picked(task: str, limit: int) -> list[Event]:
        """Up to `limit` train items in a seeded order (different per task), so c2/c3 spread over items."""
        return sorted(train, key=lambda e: stable_hash(f"{task}:{user_id}:{e.item_id}", seed))[:max(limit, 0)]

    if "seq" in tasks:
        for i in recent_targets(icfg.max_seq_per_user):
            hist, target = history(i, max_history), train[i]
            add("seq", target.position, {"history": [e.scid for e in hist]}, target.scid, target.item_id,
                [e.item_id for e in hist] + [target.item_id])
    if "c1_asym" in tasks and icfg.max_per_user > 0:
        for i in recent_targets(icfg.max_per_user):
            hist, target = history(i, min(icfg.c1_max_titles, max_history)), train[i]
            titles = [clip_text(e.title, icfg.max_title_chars) for e in hist]
            add("c1_asym", target.position, {"titles": titles}, target.scid, target.item_id,
                [e.item_id for e in hist] + [target.item_id])
    if "c2_intent" in tasks:
        for target in picked("c2_intent", icfg.max_per_user):
            query = intent_query(target.title, target.category, icfg.max_title_chars)
            if query:
                add("c2_intent", target.position, {"query": query}, target.scid, target.item_id, [target.item_id])
    for task in ("c3_title_to_scid", "c3_scid_to_title"):
        if task in tasks:
            for item in picked(task, icfg.max_per_user):
                title = clip_text(item.title, icfg.max_title_chars)
                if not title:
                    continue
                if task == "c3_title_to_scid":
                    add(task, item.item_id, {"title": title}, item.scid, item.item_id, [item.item_id])
                else:
                    add(task, item.item_id, {"item": item.scid}, title, item.item_id, [item.item_id])
    if profile and train:
        hist = history(len(train), max_history)
        if "b1_preference" in tasks:
            add("b1_preference", "profile", {"history": [e.scid for e in hist]}, profile, None,
                [e.item_id for e in hist] + profile_ids)
        if "b2_profile_to_user" in tasks:
            add("b2_profile_to_user", "profile", {"profile": profile}, user_scid, None, profile_ids)
        if "b2_user_to_profile" in tasks:
            add("b2_user_to_profile", "profile", {}, profile, None, profile_ids)
    if valid:
        hist, target = history(len(train), max_history), valid[-1]
        add("seq", target.position, {"history": [e.scid for e in hist]}, target.scid, target.item_id,
            [e.item_id for e in hist] + [target.item_id], split=VALID)
    return rows


def _examples_of_users(batches: Iterator[pd.DataFrame], icfg: InstructionConfig, max_history: int,
                       seed: int) -> Iterator[pd.DataFrame]:
    for batch in batches:
        rows: list[dict] = []
        for user in batch.itertuples(index=False):
            events = [Event(int(p), int(i), s, scid, t, c) for p, i, s, scid, t, c in zip(
                user.positions, user.item_ids, user.splits, user.scids, user.titles, user.categories)]
            profile_items = [] if user.profile_items is None else list(user.profile_items)
            rows += user_examples(user.user_id, user.user_scid, events, user.profile_text, profile_items,
                                  icfg, max_history, seed)
        frame = pd.DataFrame(rows, columns=_COLUMNS)
        frame["target_item"] = frame["target_item"].astype("Int64")
        yield frame


def build_sft_examples(interactions: DataFrame, items: DataFrame, users: DataFrame, item_scid: DataFrame,
                       user_scid: DataFrame, icfg: InstructionConfig, max_history: int, seed: int) -> DataFrame:
    """The `sft_examples` table: every enabled task's train rows plus one valid SEQ row per user.

    Users without a user SCID and interactions with items without an item SCID are left out (a
    prompt cannot name them). Same inputs and seed give the same rows.
    """
    enabled_tasks(icfg.tasks)  # fail on the driver, naming the bad family
    known = conform(interactions, "interactions").filter(F.col("split").isin(TRAIN, VALID))
    categories = F.col("categories")
    item_info = (conform(items, "items")
                 .select("item_id", F.coalesce("title", "text").alias("title"),
                         F.when(F.size(categories) > 0, F.element_at(categories, -1)).alias("category"))
                 .join(conform(item_scid, "item_scid").select("item_id", F.col("scid").alias("item_scid")), "item_id"))
    events = F.sort_array(F.collect_list(F.struct("position", "item_id", "split", "item_scid", "title", "category")))
    per_user = (known.join(item_info, "item_id").groupBy("user_id").agg(events.alias("events"))
                .join(conform(user_scid, "user_scid").select("user_id", F.col("scid").alias("user_scid")), "user_id")
                .join(conform(users, "users").select("user_id", "profile_text", "profile_items"), "user_id", "left"))
    fields = {"positions": "position", "item_ids": "item_id", "splits": "split", "scids": "item_scid",
              "titles": "title", "categories": "category"}
    per_user = per_user.select("user_id", "user_scid", "profile_text", "profile_items",
                               *[F.col(f"events.{f}").alias(a) for a, f in fields.items()])
    examples = per_user.mapInPandas(partial(_examples_of_users, icfg=icfg, max_history=max_history, seed=seed),
                                    schema=spark_schema("sft_examples"))
    return conform(examples, "sft_examples")
