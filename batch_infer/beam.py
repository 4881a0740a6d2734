"""Beam search constrained to the item-SCID trie, and the sequence scoring that DPO shares with it.

`trie_beam_search` runs each prompt batch through the model once and then one single-token step
per SCID level, reusing the KV cache expanded to batch x beam; every result is a real item.
`generate_reference` is the same search through Hugging Face `generate`, the portable reference.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

NEG_INF = float("-inf")
HF_DUMMY_BEAM = -1e8  # HF starts all but the first beam at -1e9; such beams are padding, not results


@dataclass
class BeamResult:
    """Per prompt: the top-k item row indices (into the trie's sequences) and their summed log-probs."""
    items: list[list[int]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    dropped: int = 0  # live beams whose prefix had no allowed continuation (fail closed: never decoded freely)


class TokenTrie:
    """Prefix trie over [n, L] token-id sequences as a flat node table, for batched lookups on any device.

    Nodes are numbered level by level (root = 0) with the children of a node contiguous and sorted by
    token, so a node's children are `first_child[v] .. first_child[v] + num_children[v] - 1`.
    A leaf maps to the row of its sequence (the first row, if rows repeat).
    """

    def __init__(self, sequences: np.ndarray):
        seqs = np.asarray(sequences, dtype=np.int64)
        if seqs.ndim != 2 or not seqs.shape[0] or not seqs.shape[1]:
            raise ValueError(f"TokenTrie needs a non-empty [n, L] array of token ids, got shape {seqs.shape}")
        if (seqs < 0).any():
            raise ValueError("TokenTrie: token ids must be >= 0")
        self.sequences = seqs
        n, self.depth = seqs.shape
        order = np.lexsort(seqs.T[::-1])  # stable: the first of equal rows keeps the smallest row index
        ordered = seqs[order]
        tokens, parents = [np.int64(-1)], [np.int64(-1)]
        parent_of_row = np.zeros(n, dtype=np.int64)
        next_id = 1
        for level in range(self.depth):
            new = np.ones(n, dtype=bool)
            new[1:] = (ordered[1:, :level + 1] != ordered[:-1, :level + 1]).any(axis=1)
            node_of_row = next_id + np.cumsum(new) - 1
            tokens.append(ordered[new, level])
            parents.append(parent_of_row[new])
            next_id += int(new.sum())
            parent_of_row = node_of_row
        self.token = np.concatenate([np.atleast_1d(t) for t in tokens])
        parent = np.concatenate([np.atleast_1d(p) for p in parents])
        num_nodes = len(self.token)
        self.num_children = np.bincount(parent[1:], minlength=num_nodes).astype(np.int64)
        # parents are non-decreasing in node order, so each node's children start where its id first appears
        self.first_child = (np.searchsorted(parent[1:], np.arange(num_nodes)) + 1).astype(np.int64)
        self.leaf_item = np.full(num_nodes, -1, dtype=np.int64)
        leaf_rows = np.ones(n, dtype=bool)
        leaf_rows[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
        self.leaf_item[parent_of_row[leaf_rows]] = order[leaf_rows]
        self._tables: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int((self.leaf_item >= 0).sum())

    def node_of(self, prefix) -> int:
        """Node reached by a token prefix, or -1 if the prefix is not in the trie."""
        node = 0
        for tok in prefix:
            start, count = self.first_child[node], self.num_children[node]
            pos = start + int(np.searchsorted(self.token[start:start + count], int(tok)))
            if pos >= start + count or self.token[pos] != int(tok):
                return -1
            node = pos
        return node

    def allowed(self, prefix) -> list[int]:
        """Token ids that may follow `prefix` (empty for a dead or unknown prefix, or a complete sequence)."""
        node = self.node_of(prefix)
        if node < 0:
            return []
        start = self.first_child[node]
        return self.token[start:start + self.num_children[node]].tolist()

    def item_of(self, path) -> int:
        """Row index of a complete sequence, or -1."""
        node = self.node_of(path)
        return int(self.leaf_item[node]) if node >= 0 and len(path) == self.depth else -1

    def tables(self, device) -> dict[str, torch.Tensor]:
        """The node table as tensors on `device` (cached per device)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = {name: torch.as_tensor(getattr(self, name), device=device)
                                 for name in ("token", "first_child", "num_children", "leaf_item")}
        return self._tables[key]


def _children(tables: dict[str, torch.Tensor], nodes: torch.Tensor):
    """(child node ids, their tokens, valid mask), each [N, W] with W the widest node in `nodes`."""
    counts = tables["num_children"][nodes]
    width = max(int(counts.max()), 1) if len(nodes) else 1
    offsets = torch.arange(width, device=nodes.device)
    valid = offsets[None, :] < counts[:, None]
    child = torch.where(valid, tables["first_child"][nodes][:, None] + offsets[None, :], 0)
    return child, tables["token"][child].clamp(min=0), valid


def _last_logits_kwargs(model) -> dict:
    """Ask for the last position's logits only when the model supports it (saves a [B, T, V] tensor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _search_batch(model, prompts, tables, depth: int, beam: int, top_k: int, pad_id: int, device):
    from training.backbone import pad_batch

    ids, mask = (t.to(device) for t in pad_batch(prompts, pad_id, left=True))
    n = len(prompts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                **_last_logits_kwargs(model))
    cache, logp = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    lengths = mask.sum(-1)
    nodes = torch.zeros((n, 1), dtype=torch.long, device=device)
    score = torch.zeros((n, 1), dtype=torch.float32, device=device)
    dropped = 0
    for level in range(depth):
        k = nodes.shape[1]
        child, tok, valid = _children(tables, nodes.reshape(-1))
        alive = torch.isfinite(score).reshape(-1)
        valid &= alive[:, None]
        dropped += int((alive & ~valid.any(-1)).sum())
        cand = (score.reshape(-1, 1) + logp.gather(1, tok)).masked_fill(~valid, NEG_INF)
        width = cand.shape[1]
        score, pick = cand.view(n, k * width).topk(min(beam, k * width), dim=1)
        nodes = child.view(n, -1).gather(1, pick).masked_fill(~torch.isfinite(score), 0)
        if level == depth - 1:
            break
        rows = (torch.arange(n, device=device)[:, None] * k + pick // width).reshape(-1)
        cache.reorder_cache(rows)  # index_select: picks and expands the parent beams' caches
        mask = torch.cat([mask[rows], torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        step_pos = (lengths.repeat_interleave(nodes.shape[1]) + level)[:, None]
        out = model(input_ids=tok.view(n, -1).gather(1, pick).reshape(-1, 1), attention_mask=mask,
                    position_ids=step_pos, past_key_values=cache, use_cache=True)
        cache, logp = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    leaf = tables["leaf_item"][nodes].cpu().numpy()
    finite = torch.isfinite(score).cpu().numpy()
    score = score.cpu().numpy()
    items = [leaf[b][finite[b]][:top_k].tolist() for b in range(n)]
    scores = [score[b][finite[b]][:top_k].tolist() for b in range(n)]
    return items, scores, dropped


def trie_beam_search(model, prompts: list[list[int]], trie: TokenTrie, beam: int, top_k: int, pad_id: int,
                     batch_size: int = 64, device=None) -> BeamResult:
    """Top-k trie items per prompt by beam search (summed log-probs, full-vocabulary softmax), best first.

    Prompts are token ids ending with the answer marker. Fewer than top_k items come back when fewer
    are reachable; a live beam whose prefix has no allowed token is dropped and counted.
    """
    if not 1 <= top_k <= beam:
        raise ValueError(f"trie_beam_search: need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
    device = device or next(model.parameters()).device
    tables = trie.tables(device)
    result = BeamResult()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                items, scores, dropped = _search_batch(model, prompts[start:start + batch_size], tables,
                                                       trie.depth, beam, top_k, pad_id, device)
                result.items += items
                result.scores += scores
                result.dropped += dropped
    finally:
        model.train(was_training)
    return result


def sequence_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      continuations: torch.Tensor) -> torch.Tensor:
    """[B, M] summed log-probs of M fixed continuations [B, M, L] after each left-padded prompt, with gradients.

    The prompt runs once; its KV cache is repeated M times to score all continuations in one pass.
    """
    continuations = torch.as_tensor(continuations, device=prompt_ids.device, dtype=torch.long)
    n, m, length = continuations.shape
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        return _full_sequence_logprobs(model, prompt_ids, prompt_mask, continuations)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_positions(prompt_mask),
                use_cache=length > 1, **_last_logits_kwargs(model))
    first = out.logits[:, -1].float()
    total = first.gather(1, continuations[:, :, 0]) - torch.logsumexp(first, dim=-1, keepdim=True)
    if length == 1:
        return total
    cache = out.past_key_values
    cache.batch_repeat_interleave(m)
    mask = torch.cat([prompt_mask.repeat_interleave(m, dim=0),
                      torch.ones((n * m, length - 1), dtype=prompt_mask.dtype, device=prompt_mask.device)], dim=1)
    steps = torch.arange(length - 1, device=prompt_ids.device)
    positions = prompt_mask.sum(-1).repeat_interleave(m)[:, None] + steps[None, :]
    out = model(input_ids=continuations[:, :, :-1].reshape(n * m, length - 1), attention_mask=mask,
                position_ids=positions, past_key_values=cache, use_cache=True)
    logits = out.logits.float()
    targets = continuations[:, :, 1:].reshape(n * m, length - 1, 1)
    rest = (logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)).sum(-1)
    return total + rest.view(n, m)


def _full_sequence_logprobs(model, prompt_ids, prompt_mask, continuations) -> torch.Tensor:
    """sequence_logprobs without a KV cache (gradient checkpointing turns it off): each prompt + continuation in full."""
    n, m, length = continuations.shape
    ids = torch.cat([prompt_ids.repeat_interleave(m, dim=0), continuations.reshape(n * m, length)], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(m, dim=0),
                      torch.ones((n * m, length), dtype=prompt_mask.dtype, device=prompt_mask.device)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -length - 1:-1].float()
    picked = logits.gather(-1, continuations.reshape(n * m, length, 1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked.sum(-1).view(n, m)


def generate_reference(model, prompts: list[list[int]], trie: TokenTrie, beam: int, top_k: int, pad_id: int,
                       batch_size: int = 16, device=None) -> BeamResult:
    """The same search through HF `generate` (num_beams, prefix_allowed_tokens_fn, length_penalty=0).

    A prefix outside the trie (HF's placeholder beams) may only continue with the pad token, and
    results that are not trie paths or HF placeholders are left out, so the output is comparable
    with `trie_beam_search` item for item.
    """
    from training.backbone import pad_batch

    if not 1 <= top_k <= beam:
        raise ValueError(f"generate_reference: need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
    device = device or next(model.parameters()).device
    result = BeamResult()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = (t.to(device) for t in pad_batch(prompts[start:start + batch_size], pad_id, left=True))
            width = ids.shape[1]

            def allowed(_batch_id: int, sent: torch.Tensor) -> list[int]:
                return trie.allowed(sent[width:].tolist()) or [pad_id]

            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=top_k,
                                     max_new_tokens=trie.depth, min_new_tokens=trie.depth, do_sample=False,
                                     length_penalty=0.0, early_stopping=True, prefix_allowed_tokens_fn=allowed,
                                     output_scores=True, return_dict_in_generate=True, pad_token_id=pad_id)
            paths = out.sequences[:, width:].view(len(ids), top_k, -1).cpu().numpy()
            seq_scores = out.sequences_scores.view(len(ids), top_k).float().cpu().numpy()
            for row_paths, row_scores in zip(paths, seq_scores):
                items, scores = [], []
                for path, value in zip(row_paths, row_scores):
                    item = trie.item_of(path.tolist())
                    if item >= 0 and value > HF_DUMMY_BEAM and item not in items:
                        items.append(item)
                        scores.append(float(value))
                result.items.append(items)
                result.scores.append(scores)
    finally:
        model.train(was_training)
    return result
