"""Synthetic Amazon-format raw files with latent structure a recommender can learn.

Items belong to taste clusters; each cluster has its own categories, brands and vocabulary,
so item text carries the cluster. Users prefer one to three clusters. Sequences follow taste
with a sequential signal: the next item often stays in the last item's cluster and sometimes
is that item's fixed "companion"; popular items are picked more often. Ratings are high on
items of a preferred cluster and low elsewhere, and review words follow the rating, so a
sentiment model (VADER) agrees with the stars. Output is byte-identical for a given seed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from a3gr.config import SyntheticConfig

REVIEWS_FILE = "reviews.jsonl"
META_FILE = "meta.jsonl"
TRUTH_FILE = "truth.json"

ROOT_CATEGORY = "Musical Instruments"
# (cluster category, sub-categories, product nouns). Some names contain ", " on purpose, as
# real Amazon category names do; '&' is written as '&amp;' in metadata, as Amazon's is.
THEMES = [
    ("Guitars", ["Electric Guitars", "Acoustic Guitars"], ["guitar", "fretboard", "pickup"]),
    ("Drums & Percussion", ["Drum Sets", "Hand Percussion"], ["snare", "cymbal", "drumhead"]),
    ("Keyboards & MIDI", ["Digital Pianos", "MIDI Controllers"], ["keyboard", "synth", "controller"]),
    ("Microphones & Accessories", ["Condenser Microphones", "Pop Filters"], ["microphone", "capsule", "boom"]),
    ("Amplifiers & Effects", ["Guitar Amplifiers", "Effects Pedals"], ["amp", "pedal", "overdrive"]),
    ("Ukuleles, Mandolins & Banjos", ["Ukuleles", "Banjos"], ["ukulele", "banjo", "mandolin"]),
    ("Studio Recording Equipment", ["Audio Interfaces", "Studio Monitors"], ["interface", "monitor", "preamp"]),
    ("Bags, Cases & Covers", ["Gig Bags", "Hard Cases"], ["case", "bag", "cover"]),
    ("Band & Orchestra", ["Violins", "Trumpets"], ["violin", "trumpet", "bow"]),
    ("Live Sound & Stage", ["PA Speakers", "Stage Lighting"], ["speaker", "mixer", "light"]),
    ("DJ Equipment", ["DJ Controllers", "Turntables"], ["turntable", "deck", "crossfader"]),
    ("Bass Guitars", ["Electric Basses", "Bass Strings"], ["bass", "string", "tuner"]),
]
BRAND_SUFFIXES = ["Audio", "Sound", "Music", "Works", "Labs", "Instruments"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fe", "gu", "ha", "ji",
             "ko", "la", "mo", "nu", "pe", "qui", "ro", "si", "ta", "ul", "ve", "wa", "xo", "yu", "zo"]
WORDS_PER_CLUSTER = 10
BRANDS_PER_CLUSTER = 3

# Review wording per star rating (index 0 = 1 star); words from VADER's lexicon.
ADJECTIVES = [["terrible", "awful", "horrible", "useless"], ["mediocre", "meh", "lacking", "flimsy"],
              ["average", "plain", "unremarkable", "okay"], ["good", "nice", "solid", "pleasant"],
              ["excellent", "amazing", "perfect", "fantastic"]]
VERBS = [["hate", "regret buying"], ["am unsure about", "am unhappy with"], ["tolerate", "can live with"],
         ["like", "enjoy"], ["love", "adore"]]
CLOSINGS = [["Total waste of money.", "Avoid it."], ["Not quite there.", "Not worth the price."],
            ["It does the job.", "Nothing special."], ["Would buy again.", "Happy with it."],
            ["Highly recommended!", "Best purchase ever!"]]
# Star distributions (1..5) for items in and out of the user's taste.
RATING_P_MATCH = np.array([0.02, 0.03, 0.10, 0.30, 0.55])
RATING_P_MISMATCH = np.array([0.30, 0.30, 0.25, 0.10, 0.05])

P_COMPANION = 0.25  # next item is the last item's companion
P_STAY = 0.45  # else: next item from the last item's cluster
P_EXPLORE = 0.08  # else: a uniformly random cluster instead of the user's taste
POPULARITY_EXPONENT = 0.6  # Zipf exponent of item popularity within a cluster
START_TS = 1325376000  # 2012-01-01 UTC
START_SPREAD_S = 3 * 365 * 86400
GAP_S = (3600, 45 * 86400)  # time between a user's consecutive reviews
FIRST_NAMES = ["Alex", "Sam", "Jordan", "Taylor", "Chris", "Robin", "Jamie", "Morgan", "Casey", "Drew"]
LAST_NAMES = ["Smith", "Lee", "Garcia", "Brown", "Nguyen", "Miller", "Davis", "Khan", "Rossi", "Novak"]


@dataclass
class SyntheticWorld:
    """The latent structure behind the files: what a model should recover."""
    cluster_names: list[str]
    cluster_subcategories: list[list[str]]
    cluster_nouns: list[list[str]]
    cluster_words: list[list[str]]
    cluster_brands: list[list[str]]
    item_keys: list[str]
    item_cluster: np.ndarray  # item index -> cluster
    item_popularity: np.ndarray  # within-cluster sampling weight
    item_companion: np.ndarray  # item index -> its companion item (same cluster)
    user_keys: list[str]
    user_clusters: list[np.ndarray]  # preferred clusters per user
    user_taste: list[np.ndarray]  # weights over user_clusters


def _check(cfg: SyntheticConfig) -> None:
    problems = []
    if cfg.n_users < 1:
        problems.append(f"n_users={cfg.n_users} must be >= 1")
    if cfg.n_clusters < 1 or cfg.n_items < cfg.n_clusters * 2:
        problems.append(f"n_items={cfg.n_items} must be >= 2 * n_clusters={cfg.n_clusters} (>= 1)")
    if not 1 <= cfg.min_len <= cfg.max_len <= cfg.n_items:
        problems.append(f"need 1 <= min_len={cfg.min_len} <= max_len={cfg.max_len} <= n_items={cfg.n_items}")
    for name in ("rating_fraction", "review_fraction", "metadata_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            problems.append(f"{name}={getattr(cfg, name)} must be in [0, 1]")
    if problems:
        raise ValueError("synthetic config: " + "; ".join(problems))


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct made-up words of two or three syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = 2 + int(rng.random() < 0.5)
        word = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_world(cfg: SyntheticConfig, seed: int) -> SyntheticWorld:
    """Clusters, items and users with their latent tastes (no text, no files)."""
    _check(cfg)
    rng = np.random.default_rng([seed, 0])
    c = cfg.n_clusters
    names, subcats, nouns = [], [], []
    for k in range(c):
        name, subs, ns = THEMES[k % len(THEMES)]
        series = f" Series {k // len(THEMES) + 1}" if k >= len(THEMES) else ""
        names.append(name + series)
        subcats.append([s + series for s in subs])
        nouns.append(ns)
    vocab = _pseudo_words(rng, c * (WORDS_PER_CLUSTER + BRANDS_PER_CLUSTER))
    words = [vocab[k * WORDS_PER_CLUSTER:(k + 1) * WORDS_PER_CLUSTER] for k in range(c)]
    brand_roots = vocab[c * WORDS_PER_CLUSTER:]
    brands = [[f"{brand_roots[k * BRANDS_PER_CLUSTER + j].capitalize()} "
               f"{BRAND_SUFFIXES[(k + j) % len(BRAND_SUFFIXES)]}" for j in range(BRANDS_PER_CLUSTER)]
              for k in range(c)]

    item_cluster = rng.permutation(np.arange(cfg.n_items) % c)
    popularity = np.empty(cfg.n_items)
    companion = np.empty(cfg.n_items, dtype=np.int64)
    for k in range(c):
        members = np.flatnonzero(item_cluster == k)
        ranks = rng.permutation(len(members))
        popularity[members] = 1.0 / (ranks + 1.0) ** POPULARITY_EXPONENT
        # a random derangement-like cycle: every item's companion is another item of its cluster
        order = rng.permutation(members)
        companion[order] = np.roll(order, -1)

    n_pref = rng.choice([1, 2, 3], size=cfg.n_users, p=[0.35, 0.45, 0.2])
    user_clusters = [np.sort(rng.choice(c, size=min(int(m), c), replace=False)) for m in n_pref]
    user_taste = [rng.dirichlet(np.full(len(u), 2.0)) for u in user_clusters]
    return SyntheticWorld(
        cluster_names=names, cluster_subcategories=subcats, cluster_nouns=nouns, cluster_words=words,
        cluster_brands=brands, item_keys=[f"S{i:09d}" for i in range(cfg.n_items)], item_cluster=item_cluster,
        item_popularity=popularity, item_companion=companion,
        user_keys=[f"U{u:07d}" for u in range(cfg.n_users)], user_clusters=user_clusters, user_taste=user_taste)


def _sequence(world: SyntheticWorld, user: int, length: int, rng: np.random.Generator,
              members: list[np.ndarray]) -> list[int]:
    """One user's items in time order (no repeats)."""
    n_clusters = len(members)
    seen: set[int] = set()
    out: list[int] = []
    prefs, taste = world.user_clusters[user], world.user_taste[user]
    while len(out) < length:
        last = out[-1] if out else None
        if last is not None and rng.random() < P_COMPANION and int(world.item_companion[last]) not in seen:
            item = int(world.item_companion[last])
        else:
            if last is not None and rng.random() < P_STAY:
                cluster = int(world.item_cluster[last])
            elif rng.random() < P_EXPLORE:
                cluster = int(rng.integers(n_clusters))
            else:
                cluster = int(prefs[rng.choice(len(prefs), p=taste)])
            candidates = [i for i in members[cluster] if i not in seen]
            if not candidates:  # cluster exhausted: any unseen item
                candidates = [i for i in range(len(world.item_keys)) if i not in seen]
            weights = world.item_popularity[candidates]
            item = int(candidates[int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum()))])
        seen.add(item)
        out.append(item)
    return out


def _review_text(world: SyntheticWorld, item: int, stars: int, rng: np.random.Generator) -> tuple[str, str]:
    """(summary, review text) whose wording follows the star rating and the item's cluster."""
    k = int(world.item_cluster[item])
    s = stars - 1
    adj = ADJECTIVES[s][int(rng.integers(len(ADJECTIVES[s])))]
    adj2 = ADJECTIVES[s][int(rng.integers(len(ADJECTIVES[s])))]
    verb = VERBS[s][int(rng.integers(len(VERBS[s])))]
    closing = CLOSINGS[s][int(rng.integers(len(CLOSINGS[s])))]
    noun = world.cluster_nouns[k][int(rng.integers(len(world.cluster_nouns[k])))]
    w1, w2 = (world.cluster_words[k][int(i)] for i in rng.choice(len(world.cluster_words[k]), 2, replace=False))
    summary = f"{adj.capitalize()} {noun}" + ("!" if s in (0, 4) else "")
    text = (f"This {w1} {noun} is {adj}. I {verb} the {w2} finish and the sound is {adj2}. {closing}")
    return summary, text


def _item_meta(world: SyntheticWorld, item: int, rng: np.random.Generator) -> dict:
    k = int(world.item_cluster[item])
    brand = world.cluster_brands[k][int(rng.integers(BRANDS_PER_CLUSTER))]
    sub = world.cluster_subcategories[k][int(rng.integers(len(world.cluster_subcategories[k])))]
    w = [world.cluster_words[k][int(i)] for i in rng.choice(WORDS_PER_CLUSTER, 4, replace=False)]
    noun = world.cluster_nouns[k][int(rng.integers(len(world.cluster_nouns[k])))]
    esc = lambda s: s.replace("&", "&amp;")  # noqa: E731  (Amazon metadata is HTML-escaped)
    return {
        "asin": world.item_keys[item],
        "title": esc(f"{brand} {w[0].capitalize()} {w[1].capitalize()} {noun.capitalize()} - {sub}"),
        "description": esc(f"The {w[0]} {noun} from {brand} brings {w[2]} tone and {w[3]} comfort. "
                           f"Made for {world.cluster_names[k].lower()} players who want a {w[1]} feel."),
        "brand": esc(brand),
        "categories": ",".join(esc(c) for c in (ROOT_CATEGORY, world.cluster_names[k], sub)),
    }


def _write_lines(path: str, lines: list[str]) -> None:
    """Write atomically, so a reader never sees a half-written file and a rerun replaces it whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def generate_synthetic(out_dir: str, cfg: SyntheticConfig, seed: int) -> dict[str, str]:
    """Write reviews (2014-style JSON lines), item metadata (JSON lines) and the latent truth.

    Returns {"reviews_path", "meta_path", "truth_path"}. Same seed and config -> same bytes.
    """
    world = build_world(cfg, seed)
    rng = np.random.default_rng([seed, 1])
    members = [np.flatnonzero(world.item_cluster == k) for k in range(len(world.cluster_names))]
    mean_extra = max((cfg.max_len - cfg.min_len) / 3.0, 0.0)
    reviews: list[str] = []
    for u, user_key in enumerate(world.user_keys):
        extra = int(rng.geometric(1.0 / (mean_extra + 1.0))) - 1 if mean_extra > 0 else 0
        length = min(cfg.max_len, cfg.min_len + extra)
        items = _sequence(world, u, length, rng, members)
        name = f"{FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))]} {LAST_NAMES[int(rng.integers(len(LAST_NAMES)))]}"
        t = START_TS + int(rng.integers(START_SPREAD_S))
        prefs = set(world.user_clusters[u].tolist())
        for item in items:
            t += int(rng.integers(*GAP_S))
            p = RATING_P_MATCH if int(world.item_cluster[item]) in prefs else RATING_P_MISMATCH
            stars = int(rng.choice(5, p=p)) + 1
            record: dict = {"reviewerID": user_key, "asin": world.item_keys[item], "reviewerName": name}
            if rng.random() < cfg.rating_fraction:
                record["overall"] = float(stars)
            if rng.random() < cfg.review_fraction:
                record["summary"], record["reviewText"] = _review_text(world, item, stars, rng)
            record["unixReviewTime"] = t
            record["reviewTime"] = time.strftime("%m %d, %Y", time.gmtime(t))
            reviews.append(json.dumps(record, ensure_ascii=False))

    meta_rng = np.random.default_rng([seed, 2])
    described = meta_rng.random(cfg.n_items) < cfg.metadata_fraction
    meta = [json.dumps(_item_meta(world, i, meta_rng), ensure_ascii=False)
            for i in range(cfg.n_items) if described[i]]
    truth = {
        "clusters": world.cluster_names,
        "item_cluster": {k: int(c) for k, c in zip(world.item_keys, world.item_cluster)},
        "user_clusters": {k: [int(c) for c in cs] for k, cs in zip(world.user_keys, world.user_clusters)},
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {"reviews_path": os.path.join(out_dir, REVIEWS_FILE), "meta_path": os.path.join(out_dir, META_FILE),
             "truth_path": os.path.join(out_dir, TRUTH_FILE)}
    _write_lines(paths["reviews_path"], reviews)
    _write_lines(paths["meta_path"], meta)
    _write_lines(paths["truth_path"], [json.dumps(truth, sort_keys=True)])
    return paths
