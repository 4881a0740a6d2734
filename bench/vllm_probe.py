"""Users/s of the vLLM trie engine against the PyTorch trie beam search on a ~4M-parameter Qwen2.

Run with a Python that has vLLM (e.g. /work/vllm-venv/bin/python bench/vllm_probe.py); on CPU set
VLLM_CPU_OMP_THREADS_BIND (e.g. 0-1). Prints one line per (engine, beam, top-k) and the agreement of
the two engines' top-k lists.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from batch_infer.beam import TokenTrie, trie_beam_search
from batch_infer.vllm_engine import VllmTrieEngine

TEXT_VOCAB, CODEBOOK, LEVELS = 4000, 256, 4


def build_model(directory: Path, seed: int):
    """A random Qwen2 (hidden 128, 4 layers, 4 heads) over 4,000 text tokens + 4 x 256 SCID tokens + the marker."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=TEXT_VOCAB + LEVELS * CODEBOOK + 1, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=512, max_position_embeddings=512, tie_word_embeddings=True,
        use_sliding_window=False, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model.save_pretrained(str(directory))
    return model.eval()


def build_items(n_items: int, rng) -> np.ndarray:
    """[n, 4] SCID token ids with clustered upper levels (a, b shared by many items), unique rows."""
    a = rng.zipf(1.3, n_items) % CODEBOOK
    b = rng.integers(0, 40, n_items)
    c = rng.integers(0, CODEBOOK, n_items)
    codes = np.stack([a, b, c, np.zeros(n_items, dtype=np.int64)], axis=1)
    order = np.lexsort(codes[:, :3].T[::-1])
    ranked = codes[order]
    new_group = np.ones(n_items, dtype=bool)
    new_group[1:] = (ranked[1:, :3] != ranked[:-1, :3]).any(axis=1)
    start = np.maximum.accumulate(np.where(new_group, np.arange(n_items), 0))
    ranked[:, 3] = np.arange(n_items) - start  # the 4th level numbers the items sharing a, b, c
    keep = ranked[:, 3] < CODEBOOK
    return TEXT_VOCAB + np.arange(LEVELS) * CODEBOOK + ranked[keep]


def agreement(a, b) -> float:
    return float(np.mean([x == y for x, y in zip(a.items, b.items)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--settings", default="20:10,100:100", help="beam:top_k pairs")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    rng = np.random.default_rng(args.seed)
    marker = TEXT_VOCAB + LEVELS * CODEBOOK
    prompts = [rng.integers(2, TEXT_VOCAB, args.prompt_len - 1).tolist() + [marker] for _ in range(args.users)]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.seed).to(args.device)
        items = build_items(args.items, rng)
        trie = TokenTrie(items)
        params = sum(p.numel() for p in model.parameters())
        print(f"model {params / 1e6:.1f}M params, {len(items)} items, {args.users} users x {args.prompt_len} tokens, "
              f"device {args.device}, torch threads {torch.get_num_threads()}")
        reference = {}
        for beam, top_k in settings:
            trie_beam_search(model, prompts[:8], trie, beam, top_k, pad_id=0)  # warm-up
            start = time.perf_counter()
            reference[beam, top_k] = trie_beam_search(model, prompts, trie, beam, top_k, pad_id=0)
            took = time.perf_counter() - start
            print(f"torch trie_beam_search beam {beam:>3} top {top_k:>3}: {args.users / took:8.1f} users/s ({took:.1f} s)")
        del model
        start = time.perf_counter()
        engine = VllmTrieEngine(tmp, items, beam=max(b for b, _ in settings), top_k=1,
                                max_model_len=args.prompt_len + LEVELS + 28, max_num_seqs=args.max_num_seqs)
        print(f"vLLM engine start: {time.perf_counter() - start:.1f} s")
        for beam, top_k in settings:
            engine.search(prompts[:8], beam=beam, top_k=top_k)  # warm-up
            start = time.perf_counter()
            result = engine.search(prompts, beam=beam, top_k=top_k)
            took = time.perf_counter() - start
            print(f"vLLM VllmTrieEngine  beam {beam:>3} top {top_k:>3}: {args.users / took:8.1f} users/s ({took:.1f} s); "
                  f"same top-k as torch for {agreement(result, reference[beam, top_k]):.0%} of users, "
                  f"dropped {result.dropped}")


if __name__ == "__main__":
    main()
