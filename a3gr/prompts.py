"""Instruction templates of every SFT task and the functions that render them (pure Python).

One table of templates per task (LC-Rec style, several wordings each); an example's wording is
chosen by a seeded stable hash of its id. SEQ template 0 is also the prompt of batch inference,
so `seq_prompt(user, history)` is the stable public entry point for it.

Every prompt names the user by SCID, except `b2_profile_to_user`, whose answer is that SCID, and
the TIGER-style baseline's item-only SEQ prompt (`item_seq_prompt`), whose model has no user tokens.
Raw text (titles, queries, profiles) goes through `sanitize_text`: its `<` and `>` become `‹` `›`,
so text such as "<a_1><b_2>" in a title can never reach the LLM as SCID tokens.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

# Task families of `train.instructions.tasks` -> the task names in the `sft_examples.task` column.
TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "seq": ("seq",),
    "c1": ("c1_asym",),
    "c2": ("c2_intent",),
    "c3": ("c3_title_to_scid", "c3_scid_to_title"),
    "b1": ("b1_preference",),
    "b2": ("b2_profile_to_user", "b2_user_to_profile"),
}
TASKS: tuple[str, ...] = tuple(t for family in TASK_FAMILIES.values() for t in family)
# Tasks whose response is exactly one item SCID.
ITEM_TASKS: tuple[str, ...] = ("seq", "c1_asym", "c2_intent", "c3_title_to_scid")
# Tasks whose prompt must not name the user: the user SCID is the answer.
USER_ANSWER_TASKS: tuple[str, ...] = ("b2_profile_to_user",)

# Fields: user (user SCID), history (item SCIDs), titles, query, title, item (item SCID), profile.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "seq": (
        "User {user} has interacted with the following items in chronological order: {history}. "
        "Predict the next item this user will interact with.",
        "Here is the interaction history of user {user}, oldest first: {history}. "
        "Which item is the user most likely to interact with next?",
        "Based on the items {history} that user {user} interacted with recently, recommend the next item "
        "for this user.",
        "User {user} purchased {history}, in that order. What will the user purchase next?",
    ),
    "c1_asym": (
        "User {user} has interacted with the items titled {titles}, in chronological order. "
        "Predict the next item this user will interact with.",
        "These are the titles of the items user {user} bought recently, oldest first: {titles}. "
        "Which item should be recommended next?",
        "Given that user {user} has engaged with {titles}, recommend the item the user is most likely "
        "to want next.",
    ),
    "c2_intent": (
        "User {user} is looking for: {query}. Which item best fits this need?",
        "As a shopping assistant for user {user}, find the item that matches this request: {query}.",
        "User {user} says: \"I want something like this: {query}.\" Recommend a suitable item.",
    ),
    "c3_title_to_scid": (
        "User {user} asks: which item has the title \"{title}\"?",
        "For user {user}, give the identifier of the item titled \"{title}\".",
        "User {user} is viewing an item titled \"{title}\". What is this item's identifier?",
    ),
    "c3_scid_to_title": (
        "User {user} asks: what is the title of item {item}?",
        "For user {user}, name item {item} by its title.",
        "User {user} is viewing item {item}. What is the title of this item?",
    ),
    "b1_preference": (
        "User {user} has interacted with the following items in chronological order: {history}. "
        "Summarize this user's preferences.",
        "Based on the interaction history {history} of user {user}, describe what this user likes.",
        "What can you infer about the tastes of user {user}, who interacted with {history}?",
    ),
    "b2_profile_to_user": (
        "Which user matches the following profile? {profile}",
        "Here is the description of a user: {profile} Give this user's identifier.",
        "Identify the user described as follows: {profile}",
    ),
    "b2_user_to_profile": (
        "Describe the profile of user {user}.",
        "What do we know about user {user}? Give a short profile.",
        "Write a profile of user {user} based on the user's behaviour.",
    ),
}

# The TIGER-style baseline's SEQ prompt (training and evaluation): the history's item SCIDs only.
ITEM_SEQ_TEMPLATE = ("The user has interacted with the following items in chronological order: {history}. "
                     "Predict the next item the user will interact with.")

NO_HISTORY = "no items yet"
_SCID_FIELDS = ("user", "item")
_FIELD = re.compile(r"{(\w+)}")
_SPACE = re.compile(r"\s+")


def sanitize_text(text: str | None) -> str:
    """Raw text made safe for a prompt: `<` `>` become `‹` `›` (no SCID token can form), whitespace collapsed."""
    if text is None:
        return ""
    return _SPACE.sub(" ", str(text).replace("<", "‹").replace(">", "›")).strip()


def clip_text(text: str | None, max_chars: int) -> str:
    """`sanitize_text`, then cut to at most `max_chars` characters (at a word boundary when one is near)."""
    clean = sanitize_text(text)
    if len(clean) <= max_chars:
        return clean
    cut = clean[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space >= max_chars // 2 else cut).rstrip(" ,;:-")


def stable_hash(key: str, seed: int) -> int:
    """A 64-bit hash of `key` and `seed` that is the same in every process (unlike Python's hash())."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def template_count(task: str) -> int:
    if task not in TEMPLATES:
        raise ValueError(f"unknown SFT task {task!r}; known tasks: {', '.join(TASKS)}")
    return len(TEMPLATES[task])


def template_for(example_key: str, n_templates: int, seed: int) -> int:
    """The template index (0..n_templates-1) of an example, from a seeded stable hash of its key."""
    if n_templates < 1:
        raise ValueError(f"n_templates must be >= 1, got {n_templates}")
    return stable_hash(example_key, seed) % n_templates


def format_history(item_scids: Sequence[str]) -> str:
    return ", ".join(item_scids) if len(item_scids) else NO_HISTORY


def format_titles(titles: Sequence[str]) -> str:
    return ", ".join(f"\"{sanitize_text(t)}\"" for t in titles) if len(titles) else NO_HISTORY


def render(task: str, template: int, **fields) -> str:
    """The prompt of `task` in wording `template`; text fields are sanitized, SCID fields used as given.

    `history` is a sequence of item SCIDs and `titles` a sequence of raw titles.
    """
    n = template_count(task)
    if not 0 <= template < n:
        raise ValueError(f"task {task!r} has templates 0..{n - 1}, got {template}")
    text = TEMPLATES[task][template]
    needed = set(_FIELD.findall(text))
    missing = needed - set(fields)
    if missing:
        raise ValueError(f"task {task!r} template {template} needs field(s) {sorted(missing)}")
    values = {}
    for name in needed:
        value = fields[name]
        if name == "history":
            values[name] = format_history(value)
        elif name == "titles":
            values[name] = format_titles(value)
        else:
            values[name] = value if name in _SCID_FIELDS else sanitize_text(value)
    return text.format(**values)


def seq_prompt(user_scid: str, history_scids: Sequence[str], template: int = 0) -> str:
    """The SEQ prompt: the user's SCID and item-SCID history (oldest first) -> next item. Template 0 serves inference."""
    return render("seq", template, user=user_scid, history=history_scids)


def item_seq_prompt(history_scids: Sequence[str]) -> str:
    """The item-only SEQ prompt of the TIGER-style baseline: item-SCID history (oldest first) -> next item, no user."""
    return ITEM_SEQ_TEMPLATE.format(history=format_history(history_scids))
