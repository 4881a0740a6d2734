"""The backbone LLM: build (local Qwen2 or any Hugging Face causal LM), add SCID tokens, LoRA, save and load.

Also the token-level encoding shared by SFT, DPO and inference, so all three see exactly the same
sequences: `prompt tokens + <|answer|>` then the response tokens and the end-of-sequence token.
Prompts are cut from the left (oldest history first); the answer marker and the response are kept.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from a3gr.config import BackboneConfig
from a3gr.scid import token as scid_token

ANSWER_TOKEN = "<|answer|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, ANSWER_TOKEN]
IGNORE_INDEX = -100  # label value the causal-LM loss skips
_SCID_TOKEN = re.compile(r"<(u_)?[a-h]_\d+>")
_BRACKETED = re.compile(r"<[^<>\s]+>")  # candidates for added tokens, looked up in a set (fast on long texts)


def train_local_tokenizer(texts: Iterable[str], vocab_size: int,
                          added_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (round-trips any NFC-normalised text), plus never-split added tokens.

    The special tokens (pad, eos, answer marker) get ids 0..2; `added_tokens` (the SCID tokens)
    come after the BPE vocabulary. Their occurrences in `texts` are left out of training, so no
    merges are wasted on them. Deterministic for the same texts.
    """
    # The same pipeline as transformers' Qwen2Tokenizer, which AutoTokenizer (and so vLLM) rebuilds from
    # vocab + merges for any qwen2 directory: the saved local model then tokenizes identically on reload.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    added = set(added_tokens)

    def without_added(text: str) -> str:
        return _BRACKETED.sub(lambda m: " " if m.group(0) in added else m.group(0), str(text))

    tok.train_from_iterator((without_added(t) for t in texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    # unk is named only so that Qwen2Tokenizer does not add its default `<|endoftext|>` on reload;
    # byte-level BPE never produces it.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def build_backbone(bcfg: BackboneConfig, scid_tokens: Sequence[str], corpus: Iterable[str] | None,
                   seed: int) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """(model, tokenizer): the local Qwen2 (empty model_dir) or a loaded HF / GGUF model, with SCID tokens.

    A LoRA-wrapped (PEFT) model is returned when `bcfg.lora.enabled`.
    """
    torch.manual_seed(seed)
    if not bcfg.model_dir:
        if corpus is None:
            raise ValueError("build_backbone: the local backbone (empty model_dir) needs a corpus to train "
                             "its tokenizer on")
        tokenizer = train_local_tokenizer(corpus, bcfg.vocab_size, list(scid_tokens))
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=bcfg.hidden_size, num_hidden_layers=bcfg.num_layers,
            num_attention_heads=bcfg.num_heads, num_key_value_heads=bcfg.num_kv_heads,
            intermediate_size=bcfg.intermediate_size,
            # room for responses beyond the prompt limit; vLLM refuses sequences past this length
            max_position_embeddings=2 * bcfg.max_seq_len,
            tie_word_embeddings=True, use_sliding_window=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    else:
        model, tokenizer = _load_pretrained(bcfg.model_dir, bcfg.trust_remote_code)
    add_model_tokens(model, tokenizer, scid_tokens)
    if bcfg.lora.enabled:
        model = wrap_lora(model, tokenizer, bcfg)
    return model, tokenizer


def _load_pretrained(model_dir: str, trust_remote_code: bool):
    """A Hugging Face causal-LM directory or a .gguf file, from local files only."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"train.backbone.model_dir {model_dir!r} does not exist")
    kwargs: dict = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if path.suffix == ".gguf":
        from transformers.utils import is_gguf_available

        if not is_gguf_available():
            raise ImportError(f"train.backbone.model_dir {model_dir!r} is a GGUF file, which needs the `gguf` "
                              "package: pip install 'align3gr[smollm]'")
        kwargs["gguf_file"] = path.name
        path = path.parent
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model, tokenizer


def add_model_tokens(model, tokenizer, scid_tokens: Sequence[str]) -> list[int]:
    """Add the missing SCID and special tokens, resize the embeddings, set pad/eos; returns the new ids.

    A pretrained tokenizer keeps its own eos and pad tokens when it has them. New embedding rows
    start at the mean of the old ones (transformers' mean resizing), so they do not dominate logits.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(scid_tokens) if t not in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    special = {"extra_special_tokens": [ANSWER_TOKEN]} if ANSWER_TOKEN not in vocab else {}
    if tokenizer.eos_token is None:
        special["eos_token"] = EOS_TOKEN
    if tokenizer.pad_token is None:
        special["pad_token"] = PAD_TOKEN
    if special:
        tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    new_ids = list(range(len(vocab), len(tokenizer)))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for conf in (model.config, model.generation_config):
        if conf is not None:
            conf.pad_token_id = tokenizer.pad_token_id
            conf.eos_token_id = tokenizer.eos_token_id
    return new_ids


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the SCID tokens and the answer marker: the rows LoRA training also updates."""
    vocab = tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if t == ANSWER_TOKEN or _SCID_TOKEN.fullmatch(t))


def wrap_lora(model, tokenizer, bcfg: BackboneConfig):
    """PEFT LoRA on `target_modules`; with `train_new_tokens` the SCID token rows train too (PEFT trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    lcfg = bcfg.lora
    token_indices = None
    if lcfg.train_new_tokens:
        ids = added_token_ids(tokenizer)
        if model.config.get_text_config().tie_word_embeddings:
            token_indices = ids  # the tied lm_head follows the embedding adapter
        else:
            names = {m: n for n, m in model.named_modules()}
            token_indices = {names[model.get_input_embeddings()].split(".")[-1]: ids,
                             names[model.get_output_embeddings()].split(".")[-1]: ids}
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                        target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM",
                        trainable_token_indices=token_indices)
    return get_peft_model(model, config)


def save_backbone(model, tokenizer, directory: str | Path, merge_lora: bool = True) -> Path:
    """A plain Hugging Face directory (config, safetensors, tokenizer) that transformers and vLLM load.

    A LoRA model is merged into a copy (the live adapters keep training); with `merge_lora=False`
    only the adapters are saved (PEFT format).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def load_backbone(directory: str | Path, bcfg: BackboneConfig | None = None):
    """(model, tokenizer) from `save_backbone`'s directory; re-wrapped in LoRA when `bcfg.lora.enabled`."""
    trust = bool(bcfg and bcfg.trust_remote_code)
    kwargs = {"trust_remote_code": trust, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True, **kwargs)
    if bcfg is not None and bcfg.lora.enabled:
        model = wrap_lora(model, tokenizer, bcfg)
    return model, tokenizer


def answer_id(tokenizer) -> int:
    ids = tokenizer.convert_tokens_to_ids([ANSWER_TOKEN])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise KeyError(f"tokenizer has no {ANSWER_TOKEN} token; build it with build_backbone")
    return int(ids[0])


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str, max_len: int) -> list[int]:
    """Prompt tokens + answer marker, at most `max_len` tokens: the prompt is cut from the left."""
    if max_len < 1:
        raise ValueError(f"encode_prompt: max_len must be >= 1, got {max_len}")
    ids = _text_ids(tokenizer, prompt)
    keep = max_len - 1
    return (ids[max(0, len(ids) - keep):] if keep else []) + [answer_id(tokenizer)]


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + marker + response + eos; labels are IGNORE_INDEX on the prompt part.

    The response is never cut: the prompt gives way (down to the marker alone), so an example is
    longer than `max_len` only when its response alone is.
    """
    return encode_examples(tokenizer, [prompt], [response], max_len)[0]


def encode_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                    max_len: int) -> list[tuple[list[int], list[int]]]:
    """encode_example over many rows, tokenizing in batches (the fast tokenizer runs them in parallel)."""
    def batched(texts: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []

    out = []
    marker, eos = answer_id(tokenizer), tokenizer.eos_token_id
    for prompt_ids, response_ids in zip(batched(prompts), batched(responses)):
        response_ids = list(response_ids) + [eos]
        keep = max(max_len - len(response_ids), 1) - 1
        prompt_part = (list(prompt_ids[max(0, len(prompt_ids) - keep):]) if keep else []) + [marker]
        out.append((prompt_part + response_ids, [IGNORE_INDEX] * len(prompt_part) + response_ids))
    return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] LongTensor, attention_mask [B, T]) of ragged sequences, padded on the left by default."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not len(seq):
            continue
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def item_token_matrix(tokenizer, codes: np.ndarray) -> np.ndarray:
    """[n, levels] item codes -> [n, levels] token ids of their SCID tokens; raises on a token not in the vocabulary."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"item_token_matrix: codes must be [n, levels], got shape {codes.shape}")
    vocab = tokenizer.get_vocab()
    out = np.empty_like(codes)
    for level in range(codes.shape[1]):
        values, inverse = np.unique(codes[:, level], return_inverse=True)
        ids = []
        for code in values:
            name = scid_token(level, int(code), "item")
            if name not in vocab:
                raise KeyError(f"item_token_matrix: SCID token {name} (level {level}, code {code}) is not in the "
                               "tokenizer; was the backbone built with this catalogue's SCID vocabulary?")
            ids.append(vocab[name])
        out[:, level] = np.asarray(ids, dtype=np.int64)[inverse.ravel()]
    return out
