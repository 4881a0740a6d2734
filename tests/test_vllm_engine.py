"""VllmTrieEngine against an exhaustive full-vocabulary scoring of every item and against trie_beam_search.

With a beam as wide as the item set nothing is pruned, so the search must equal exhaustive scoring; with
beam 20 it prunes, and must equal the PyTorch trie beam search (same algorithm) item for item.

vLLM spawns its engine process, so the engine runs in a child process (this file run as a script)
and writes its results to JSON; the test builds the tiny model and compares in the pytest process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from batch_infer.beam import TokenTrie, trie_beam_search  # noqa: E402

BEAM, TOP_K, N_ITEMS, N_PROMPTS = 20, 20, 40, 8
FULL_BEAM = N_ITEMS  # no level of the trie has more nodes than items, so this beam is exhaustive
TIE = 1e-4  # items whose scores differ by less than this may come in either order


def build_fixture(root: Path):
    """A tiny random Qwen2 + tokenizer saved under root/model, 40 items (shared prefixes) and 8 prompts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.backbone import answer_id, save_backbone, train_local_tokenizer

    rng = np.random.default_rng(0)
    scid_tokens = [f"<{level}_{i}>" for level in "abcd" for i in range(6)]
    corpus = [" ".join(rng.choice(["red", "guitar", "string", "amp", "pedal", "bought", "liked"], 12))
              for _ in range(50)]
    tokenizer = train_local_tokenizer(corpus, vocab_size=280, added_tokens=scid_tokens)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True, use_sliding_window=False,
        initializer_range=0.3, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None))
    save_backbone(model, tokenizer, root / "model")
    # codes: 4 a-values x few b-values, so prefixes are shared; d makes every item unique
    codes = set()
    while len(codes) < N_ITEMS:
        codes.add((int(rng.integers(4)), int(rng.integers(3)), int(rng.integers(6)), int(rng.integers(6))))
    vocab = tokenizer.get_vocab()
    items = np.array([[vocab[f"<{lvl}_{c}>"] for lvl, c in zip("abcd", code)] for code in sorted(codes)])
    marker = answer_id(tokenizer)
    prompts = [rng.integers(3, 250, size=int(rng.integers(5, 40))).tolist() + [marker] for _ in range(N_PROMPTS)]
    return model.eval(), tokenizer, items, prompts


def exhaustive_top(model, items: np.ndarray, prompts, k: int):
    """Every item scored by summed full-vocabulary log-probs after each prompt, best k first."""
    tops = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt + row for row in items.tolist()])
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            steps = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            total = logp[:, steps].gather(-1, ids[:, steps + 1, None]).squeeze(-1).sum(-1).numpy()
            order = np.argsort(-total, kind="stable")[:k]
            tops.append((order.tolist(), total[order].tolist()))
    return tops


def assert_same_top(items, scores, ref_items, ref_scores, what: str):
    assert len(items) == len(ref_items), what
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3, err_msg=what)
    for rank, (item, ref) in enumerate(zip(items, ref_items)):
        if item != ref:  # allowed only inside a tie
            tied = [r for r, s in zip(ref_items, ref_scores) if abs(s - scores[rank]) < TIE]
            assert item in tied, f"{what}: rank {rank} item {item} != {ref} (scores {scores[rank]} vs {ref_scores[rank]})"


def run_engine(root: Path) -> list[dict]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((root / "vllm_result.json").read_text())


@pytest.mark.slow
def test_vllm_engine_matches_exhaustive_and_trie_beam_search(tmp_path):
    model, tokenizer, items, prompts = build_fixture(tmp_path)
    np.save(tmp_path / "items.npy", items)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    full, narrow = run_engine(tmp_path)
    assert full["dropped"] == narrow["dropped"] == 0
    assert all(len(row) == TOP_K for row in full["items"] + narrow["items"])
    for p, (ref_items, ref_scores) in enumerate(exhaustive_top(model, items, prompts, TOP_K)):
        assert_same_top(full["items"][p], full["scores"][p], ref_items, ref_scores, f"prompt {p} vs exhaustive")
    beam = trie_beam_search(model, prompts, TokenTrie(items), BEAM, TOP_K, pad_id=tokenizer.pad_token_id)
    for p in range(N_PROMPTS):
        assert_same_top(narrow["items"][p], narrow["scores"][p], beam.items[p], beam.scores[p],
                        f"prompt {p} vs trie_beam_search")


def test_processor_writes_full_vocab_logprobs_and_rejects_empty_allowed_sets():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from batch_infer.vllm_engine import ALLOWED_ARG, TrieLogProbsProcessor

    with pytest.raises(ValueError, match="non-empty"):
        TrieLogProbsProcessor.validate_params(SamplingParams(extra_args={ALLOWED_ARG: []}))
    proc = TrieLogProbsProcessor(None, torch.device("cpu"), False)
    constrained = SamplingParams(extra_args={ALLOWED_ARG: [2, 5]})
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(0, SamplingParams(), None, []), (1, constrained, None, [])]))
    logits = torch.randn(2, 8)
    expected = torch.log_softmax(logits[1], dim=-1)
    out = proc.apply(logits.clone())
    torch.testing.assert_close(out[0], logits[0])  # an unconstrained request is left alone
    torch.testing.assert_close(out[1, [2, 5]], expected[[2, 5]])  # full-vocabulary, not renormalised
    assert torch.isinf(out[1, [0, 1, 3, 4, 6, 7]]).all()


def _engine_main(root: Path) -> None:
    from batch_infer.vllm_engine import VllmTrieEngine

    engine = VllmTrieEngine(str(root / "model"), np.load(root / "items.npy"), beam=FULL_BEAM, top_k=TOP_K,
                            max_model_len=128)
    prompts = json.loads((root / "prompts.json").read_text())
    results = [engine.search(prompts), engine.search(prompts, beam=BEAM)]
    (root / "vllm_result.json").write_text(json.dumps(
        [{"items": r.items, "scores": r.scores, "dropped": r.dropped} for r in results]))


if __name__ == "__main__":
    _engine_main(Path(sys.argv[1]))
