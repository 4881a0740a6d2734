"""Trie-constrained beam search, its HF `generate` reference, and continuation scoring."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from batch_infer.beam import TokenTrie, generate_reference, sequence_logprobs, trie_beam_search
from training.backbone import pad_batch

torch.set_num_threads(1)

VOCAB, PAD = 64, 0
LEVEL_OFFSETS = np.array([10, 20, 30, 40])  # level j's token ids start here (like <a_*>, <b_*>, ...)


def fake_items(n: int, seed: int) -> np.ndarray:
    """[n, 4] token ids of distinct items with 4-level codes (shared prefixes, as SCIDs have)."""
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, 3, (4 * n, 4)), axis=0)
    return codes[rng.permutation(len(codes))[:n]] + LEVEL_OFFSETS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True, pad_token_id=PAD)
    net = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the init's near-uniform next-token distributions
        net.lm_head.weight.mul_(8)
    return net


@pytest.fixture(scope="module")
def items():
    return fake_items(30, seed=1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(1, 9, size=rng.integers(2, 9)).tolist() for _ in range(7)]


def exhaustive(model, prompt, items) -> np.ndarray:
    """Summed log-prob of every item after one unpadded prompt, each scored as one full sequence."""
    seqs = torch.as_tensor([prompt + row.tolist() for row in items])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seqs).logits.float(), dim=-1)
    steps = torch.arange(len(prompt) - 1, seqs.shape[1] - 1)
    return logp[:, steps].gather(-1, seqs[:, steps + 1, None]).squeeze(-1).sum(-1).numpy()


def test_token_trie_lookups(items):
    trie = TokenTrie(np.concatenate([items, items[:2]]))  # repeated rows map to their first row
    assert len(trie) == len(items)
    assert trie.allowed([]) == sorted(set(items[:, 0].tolist()))
    assert trie.allowed(items[0, :2].tolist()) == sorted({r[2] for r in items.tolist() if r[:2] == items[0, :2].tolist()})
    assert all(trie.item_of(row.tolist()) == i for i, row in enumerate(items))
    assert trie.item_of(items[0, :3].tolist()) == -1 and trie.allowed([99]) == [] and trie.allowed(items[0]) == []


def test_beam_covering_all_items_equals_exhaustive_scoring(model, items, prompts):
    trie = TokenTrie(items)
    result = trie_beam_search(model, prompts, trie, beam=40, top_k=len(items), pad_id=PAD, batch_size=4)
    assert result.dropped == 0
    for prompt, got, scores in zip(prompts, result.items, result.scores):
        expected = exhaustive(model, prompt, items)
        order = np.argsort(-expected, kind="stable")
        assert got == order.tolist()
        np.testing.assert_allclose(scores, expected[order], atol=1e-4)


def test_results_are_distinct_trie_paths_sorted(model, items, prompts):
    trie = TokenTrie(items)
    result = trie_beam_search(model, prompts, trie, beam=6, top_k=5, pad_id=PAD)
    for got, scores in zip(result.items, result.scores):
        assert len(got) == 5 and len(set(got)) == 5
        assert all(trie.item_of(items[i].tolist()) == i for i in got)
        assert scores == sorted(scores, reverse=True)


def test_batched_search_agrees_with_hf_generate(model, prompts):
    big = fake_items(60, seed=3)
    trie = TokenTrie(big)
    ours = trie_beam_search(model, prompts, trie, beam=20, top_k=20, pad_id=PAD, batch_size=64)
    ref = generate_reference(model, prompts, trie, beam=20, top_k=20, pad_id=PAD, batch_size=4)
    assert ours.items == ref.items and all(len(row) == 20 for row in ours.items)
    np.testing.assert_allclose(np.array(ours.scores), np.array(ref.scores), atol=1e-4)


def test_fewer_reachable_items_than_beam(model, items, prompts):
    trie = TokenTrie(items[:5])
    result = trie_beam_search(model, prompts[:2], trie, beam=20, top_k=10, pad_id=PAD)
    assert [sorted(r) for r in result.items] == [list(range(5))] * 2 and result.dropped == 0
    ref = generate_reference(model, prompts[:2], trie, beam=20, top_k=10, pad_id=PAD)
    assert ref.items == result.items
    with pytest.raises(ValueError, match="top_k"):
        trie_beam_search(model, prompts, trie, beam=4, top_k=5, pad_id=PAD)


def test_dead_prefix_is_dropped_and_counted_never_decoded(model, items, prompts):
    trie = TokenTrie(items)
    dead = trie.node_of(items[0, :2].tolist())
    trie.num_children[dead] = 0  # a corrupt node: the prefix exists but leads nowhere
    under_dead = {i for i, row in enumerate(items) if row[:2].tolist() == items[0, :2].tolist()}
    result = trie_beam_search(model, prompts, trie, beam=40, top_k=len(items), pad_id=PAD)
    assert result.dropped == len(prompts)  # every prompt's beam over that prefix, once
    for got in result.items:
        assert len(got) == len(items) - len(under_dead) and not set(got) & under_dead


def test_sequence_logprobs_equals_separate_scoring_with_gradients(model, items, prompts):
    ids, mask = pad_batch(prompts[:3], PAD)
    continuations = torch.as_tensor(np.stack([items[:5], items[5:10], items[10:15]]))
    model.zero_grad()
    scores = sequence_logprobs(model, ids, mask, continuations)
    assert scores.shape == (3, 5) and scores.requires_grad
    for b, prompt in enumerate(prompts[:3]):
        expected = exhaustive(model, prompt, continuations[b].numpy())
        np.testing.assert_allclose(scores[b].detach().numpy(), expected, atol=1e-4)
    scores.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    one = sequence_logprobs(model, ids, mask, continuations[:, :, :1])
    torch.testing.assert_close(one, torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                                                            ).logits[:, -1], -1).gather(1, continuations[:, :, 0]))
    model.zero_grad()


def test_sequence_logprobs_under_gradient_checkpointing(model, items, prompts):
    ids, mask = pad_batch(prompts[:2], PAD)
    continuations = torch.as_tensor(np.stack([items[:4], items[4:8]]))
    with torch.no_grad():
        cached = sequence_logprobs(model, ids, mask, continuations)
    model.gradient_checkpointing_enable()
    model.train()
    try:
        full = sequence_logprobs(model, ids, mask, continuations)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(full.detach(), cached, atol=1e-4, rtol=0)
