"""Backbone: local tokenizer, local / HF-directory models with SCID tokens, LoRA, save/load, encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from a3gr.config import BackboneConfig
from a3gr.scid import format_scid, vocabulary
from training.backbone import (
    ANSWER_TOKEN,
    IGNORE_INDEX,
    add_model_tokens,
    added_token_ids,
    answer_id,
    build_backbone,
    encode_example,
    encode_prompt,
    item_token_matrix,
    load_backbone,
    pad_batch,
    save_backbone,
    train_local_tokenizer,
)

torch.set_num_threads(1)

SCID_TOKENS = vocabulary([4, 4, 4, 3]) + vocabulary([3, 3, 3], "user")
CORPUS = [f"User {format_scid([i % 3, 1, 2], 'user')} bought {format_scid([i % 4, (i // 4) % 4, 2, 0])} "
          f"then a guitar strap number {i}; café ü 日本 🙂" for i in range(120)]


def tiny_config(**lora) -> BackboneConfig:
    cfg = BackboneConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_seq_len=64)
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    return cfg


@pytest.fixture(scope="module")
def local():
    return build_backbone(tiny_config(), SCID_TOKENS, CORPUS, seed=0)


def test_local_tokenizer_round_trips_and_keeps_scid_tokens_whole():
    tok = train_local_tokenizer(CORPUS, 300, SCID_TOKENS)
    text = "Ünïcode 🙂 <a_1><b_2><c_3><d_0> and <u_a_1> x<a_3>y  two  spaces\n\ttab <|answer|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    for name in ["<a_1>", "<b_2>", "<c_3>", "<d_0>", "<u_a_1>", "<a_3>", ANSWER_TOKEN]:
        assert name in pieces
    vocab = tok.get_vocab()
    assert all(t in vocab for t in SCID_TOKENS)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    # no BPE merge learned from SCID text: the only pieces containing "<a_" are the added tokens
    assert not [t for t in vocab if "_" in t and t not in SCID_TOKENS and t != "_"]
    assert train_local_tokenizer(CORPUS, 300, SCID_TOKENS).get_vocab() == vocab


def test_build_local_backbone_has_scid_and_special_tokens(local):
    model, tok = local
    vocab = tok.get_vocab()
    assert all(t in vocab for t in SCID_TOKENS)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.tie_word_embeddings
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert answer_id(tok) == vocab[ANSWER_TOKEN]
    assert len(added_token_ids(tok)) == len(SCID_TOKENS) + 1
    again, _ = build_backbone(tiny_config(), SCID_TOKENS, CORPUS, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([ids])).logits


def test_save_load_round_trip_gives_identical_logits(local, tmp_path):
    model, tok = local
    ids = encode_prompt(tok, CORPUS[3], 40) + tok.convert_tokens_to_ids(["<a_1>", "<b_2>"])
    save_backbone(model, tok, tmp_path / "bb")
    assert (tmp_path / "bb" / "model.safetensors").exists()
    loaded, loaded_tok = load_backbone(tmp_path / "bb")
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok(CORPUS[3])["input_ids"] == tok(CORPUS[3])["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_lora_trains_adapters_and_new_tokens_only(tmp_path):
    model, tok = build_backbone(tiny_config(enabled=True, r=4, alpha=8, dropout=0.0), SCID_TOKENS, CORPUS, seed=0)
    new_ids = torch.as_tensor(added_token_ids(tok))
    old_ids = torch.as_tensor([i for i in range(20) if i not in set(new_ids.tolist())])
    embed = model.get_input_embeddings()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new_before, old_before = embed(new_ids).detach().clone(), embed(old_ids).detach().clone()
    ids, labels = encode_example(tok, CORPUS[0], format_scid([1, 2, 3, 0]), 64)
    batch = torch.as_tensor([ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        loss = model(input_ids=batch, labels=torch.as_tensor([labels])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    lora = [n for n, p in after.items() if p.requires_grad and "lora_" in n]
    assert lora and any(not torch.equal(after[n], before[n]) for n in lora)
    assert not torch.allclose(embed(new_ids), new_before)
    torch.testing.assert_close(embed(old_ids), old_before, rtol=0, atol=0)

    save_backbone(model, tok, tmp_path / "merged")
    merged, _ = load_backbone(tmp_path / "merged")
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), rtol=1e-4, atol=1e-5)
    rewrapped, _ = load_backbone(tmp_path / "merged", tiny_config(enabled=True, r=4, alpha=8))
    assert hasattr(rewrapped, "peft_config")
    torch.testing.assert_close(_logits(rewrapped, ids), _logits(merged, ids), rtol=0, atol=1e-6)


def test_encode_example_masks_prompt_and_keeps_response():
    tok = train_local_tokenizer(CORPUS, 300, SCID_TOKENS)
    response = format_scid([1, 2, 3, 0])
    ids, labels = encode_example(tok, "the user bought a guitar", response, 64)
    marker = ids.index(answer_id(tok))
    assert all(x == IGNORE_INDEX for x in labels[:marker + 1])
    assert labels[marker + 1:] == ids[marker + 1:]
    assert tok.convert_ids_to_tokens(ids[marker + 1:]) == ["<a_1>", "<b_2>", "<c_3>", "<d_0>", tok.eos_token]
    short_ids, short_labels = encode_example(tok, CORPUS[5], response, 8)
    assert len(short_ids) == 8 and short_ids[2] == answer_id(tok) and short_labels[3:] == ids[marker + 1:]
    tiny_ids, _ = encode_example(tok, CORPUS[5], response, 2)  # the response never gives way
    assert tiny_ids == [answer_id(tok)] + ids[marker + 1:]


def test_encode_prompt_cuts_from_the_left_and_keeps_marker():
    tok = train_local_tokenizer(CORPUS, 300, SCID_TOKENS)
    full = tok("oldest history then newest item", add_special_tokens=False)["input_ids"]
    cut = encode_prompt(tok, "oldest history then newest item", 4)
    assert len(cut) == 4 and cut[-1] == answer_id(tok) and cut[:-1] == full[-3:]
    assert encode_prompt(tok, "x", 100) == tok("x", add_special_tokens=False)["input_ids"] + [answer_id(tok)]


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=-100, left=False)
    assert ids.tolist() == [[1, 2, 3], [4, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_item_token_matrix(local):
    _, tok = local
    codes = np.array([[1, 2, 3, 0], [0, 0, 0, 2]])
    matrix = item_token_matrix(tok, codes)
    assert tok.convert_ids_to_tokens(matrix[0].tolist()) == ["<a_1>", "<b_2>", "<c_3>", "<d_0>"]
    assert tok.convert_ids_to_tokens(matrix[1].tolist()) == ["<a_0>", "<b_0>", "<c_0>", "<d_2>"]
    with pytest.raises(KeyError, match="<d_7>"):
        item_token_matrix(tok, np.array([[1, 2, 3, 7]]))


def test_model_dir_loads_any_hf_directory(tmp_path):
    """A plain HF directory without SCID tokens (as a pretrained model would be) gets them added."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_local_tokenizer(CORPUS, 300, [])
    torch.manual_seed(1)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    cfg = tiny_config()
    cfg.model_dir = str(tmp_path / "hf")
    model, loaded_tok = build_backbone(cfg, SCID_TOKENS, None, seed=0)
    assert all(t in loaded_tok.get_vocab() for t in SCID_TOKENS)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(loaded_tok) == len(tok) + len(SCID_TOKENS)
    torch.testing.assert_close(weight[:len(tok)], base.get_input_embeddings().weight)
    assert add_model_tokens(model, loaded_tok, SCID_TOKENS) == []  # idempotent
    ids = encode_prompt(loaded_tok, CORPUS[0], 32)
    assert torch.isfinite(_logits(model, ids)).all()


def test_gguf_without_gguf_package_says_what_to_install(tmp_path):
    from transformers.utils import is_gguf_available

    if is_gguf_available():
        pytest.skip("gguf is installed")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    cfg = tiny_config()
    cfg.model_dir = str(path)
    with pytest.raises(ImportError, match="smollm"):
        build_backbone(cfg, SCID_TOKENS, None, seed=0)


def test_batch_encoding_equals_row_encoding_and_keeps_prompts_that_fit():
    from training.backbone import encode_example, encode_examples

    tokenizer = train_local_tokenizer(["a b c d e f g h the quick brown fox"] * 20, 300, ["<a_1>", "<b_2>"])
    prompts = ["the quick brown fox " * n + "<a_1><b_2>" for n in (1, 10, 40)]
    responses = ["<a_1><b_2>", "fox", "a b"]
    for max_len in (8, 64, 151, 400):
        assert encode_examples(tokenizer, prompts, responses, max_len) == [
            encode_example(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    # a prompt shorter than the budget is kept whole (regression: a negative slice start cut it in half)
    ids, _ = encode_example(tokenizer, prompts[1], "fox", 151)
    full = tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    assert ids[:len(full)] == list(full)
