"""Building preference rows from the model's own candidates (plain PyTorch + pandas, no lake).

training/preferences.py is the job around it; training/preference_pairs.py buckets and fills rows.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from a3gr.config import PipelineConfig
from training.common import item_codes

log = logging.getLogger("a3gr.preferences")



def training_prompts(examples: pd.DataFrame) -> pd.DataFrame:
    """Training SEQ rows as (user_id, position, prompt, chosen_item); position orders a user's rows."""
    seq = examples[(examples["task"] == "seq") & (examples["split"] == "train")]
    # example ids of SEQ rows are "seq:<user_id>:<position>" (etl/instruction_tasks.py)
    seq = seq.assign(position=seq["example_id"].str.split(":").str[2].astype("int64"))
    return (seq.sort_values(["user_id", "position", "example_id"])
            .drop_duplicates(["user_id", "position"], keep="first")
            [["user_id", "position", "prompt", "target_item"]].rename(columns={"target_item": "chosen_item"})
            .reset_index(drop=True))


def sample_prompts(prompts: pd.DataFrame, max_prompts: int, seed: int, latest_only: bool = True) -> pd.DataFrame:
    """Each user's most recent prompt (closest to what inference sees), then a seeded sample."""
    if latest_only:
        prompts = prompts.sort_values(["user_id", "position"]).groupby("user_id", as_index=False).tail(1)
    if max_prompts and len(prompts) > max_prompts:
        prompts = prompts.sample(n=max_prompts, random_state=seed)
    return prompts.sort_values(["user_id", "position"]).reset_index(drop=True)


def liked_prompts(prompts: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """Training prompts whose next item the user liked (the chosen side of RF-DPO)."""
    liked = feedback[(feedback["split"] == "train") & (feedback["label"] == "liked")][["user_id", "item_id"]]
    return prompts.merge(liked.rename(columns={"item_id": "chosen_item"}), on=["user_id", "chosen_item"])


def generate_candidates(model, tokenizer, prompts: pd.DataFrame, item_ids: np.ndarray, item_matrix: np.ndarray,
                        beam: int, max_len: int, device, batch_size: int = 32) -> pd.DataFrame:
    """The model's own top-`beam` items for each prompt (constrained to real items), in rank order."""
    from batch_infer.beam import TokenTrie, trie_beam_search
    from training.backbone import encode_prompt

    if prompts.empty:
        return prompts.assign(generated_items=[])
    model.eval()
    encoded = [encode_prompt(tokenizer, p, max_len) for p in prompts["prompt"]]
    t0 = time.perf_counter()
    result = trie_beam_search(model, encoded, TokenTrie(item_matrix), beam=beam, top_k=beam,
                              pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device)
    log.info("preferences: generated %d candidates for %d prompts in %.1fs (%d beams dropped by the trie)",
             beam, len(prompts), time.perf_counter() - t0, result.dropped)
    return prompts.assign(generated_items=[list(item_ids[np.asarray(rows, dtype=np.int64)]) for rows in result.items])


def build_preference_pairs(examples: pd.DataFrame, item_scid: pd.DataFrame, feedback: pd.DataFrame, model,
                           tokenizer, cfg: PipelineConfig, model_version: str, device) -> tuple[pd.DataFrame, dict]:
    """Self-play and real-feedback preference rows for the configured stages."""
    from training.backbone import item_token_matrix
    from training.preference_pairs import (
        RF_STAGES,
        SP_STAGES,
        build_real_feedback_pairs,
        build_self_play_pairs,
        sequence_neighbors,
    )

    dpo, seed = cfg.train.dpo, cfg.seed
    item_ids, codes = item_codes(item_scid)
    item_matrix = item_token_matrix(tokenizer, codes)
    prompts = training_prompts(examples)
    # an item the user interacted with in training is never a self-play negative
    known = (examples.loc[examples["split"] == "train", ["user_id", "item_ids"]].explode("item_ids")
             .dropna().rename(columns={"item_ids": "item_id"}).astype("int64").drop_duplicates())
    # each training SEQ row ends with (earlier items..., target): its tail gives every near pair once
    train_seq = examples[(examples["task"] == "seq") & (examples["split"] == "train")]
    neighbors = sequence_neighbors((ids[-dpo.neighbor_window - 1:] for ids in train_seq["item_ids"]),
                                   dpo.neighbor_window) if dpo.neighbor_window > 0 else None
    frames, stats = [], {}
    if any(s in SP_STAGES for s in dpo.stages):
        sp = sample_prompts(prompts, dpo.max_prompts, seed, dpo.latest_prompts)
        sp = generate_candidates(model, tokenizer, sp, item_ids, item_matrix, dpo.candidates,
                                 cfg.train.backbone.max_seq_len, device)
        pairs, sp_stats = build_self_play_pairs(sp, sp, item_scid, dpo.n_rejected, seed, model_version,
                                                exclude=known, neighbors=neighbors)
        frames.append(pairs[pairs["stage"].isin(dpo.stages)])
        stats.update(sp_stats)
    if any(s in RF_STAGES for s in dpo.stages):
        rf = sample_prompts(liked_prompts(prompts, feedback), dpo.max_prompts, seed + 1, dpo.latest_prompts)
        rf = generate_candidates(model, tokenizer, rf, item_ids, item_matrix, dpo.candidates,
                                 cfg.train.backbone.max_seq_len, device)
        pairs, rf_stats = build_real_feedback_pairs(rf, feedback, rf, item_scid, dpo.n_rejected, seed,
                                                    model_version, neighbors=neighbors)
        frames.append(pairs[pairs["stage"].isin(dpo.stages)])
        stats.update(rf_stats)
    return pd.concat(frames, ignore_index=True), stats
