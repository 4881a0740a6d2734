"""Throughput and memory of SFT and Softmax-DPO steps on the default backbone.

    python bench/train.py [--config configs/embedded.yaml] [--set key=value ...] [--steps 20] [--repeats 3]

Prompts are SEQ prompts (a user SCID and 20 history item SCIDs) rendered by the real template,
over a random catalogue of --items items; the backbone is built from config exactly as the SFT job
builds it. Prints the median over --repeats of tokens/s for SFT steps (fp32, and bf16 autocast),
DPO rows/s and tokens/s (1 chosen + n_rejected continuations per row), and peak memory (process
RSS; CUDA peak when on a GPU).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from a3gr.config import load_config  # noqa: E402
from a3gr.prompts import seq_prompt  # noqa: E402
from a3gr.scid import format_scid, vocabulary  # noqa: E402


def synthetic_examples(n: int, n_items: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 256, n_items), rng.integers(0, 256, n_items), rng.integers(0, 256, n_items),
                      np.zeros(n_items, dtype=np.int64)], axis=1)
    scids = [format_scid(c) for c in codes]
    prompts, responses = [], []
    for _ in range(n):
        user = format_scid(rng.integers(0, 256, 3), "user")
        history = [scids[i] for i in rng.integers(0, n_items, 20)]
        prompts.append(seq_prompt(user, history))
        responses.append(scids[int(rng.integers(n_items))])
    return prompts, responses, codes


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=10000)
    args = parser.parse_args()

    from training.backbone import build_backbone, encode_example, encode_prompt, item_token_matrix, pad_batch
    from training.common import pick_device
    from training.dpo_loop import StageData, batch_logprobs
    from training.dpo_loss import softmax_dpo_loss
    from training.sft_loop import collate, lm_loss

    cfg = load_config(args.config, args.set)
    torch.set_num_threads(cfg.train.torch_threads)
    device = pick_device(cfg.train.use_gpu)
    sft, dpo = cfg.train.sft, cfg.train.dpo
    prompts, responses, codes = synthetic_examples(2000, args.items, cfg.seed)
    tokens = vocabulary([256, 256, 256, 1]) + vocabulary([256, 256, 256], "user")
    model, tokenizer = build_backbone(cfg.train.backbone, tokens, prompts + responses, cfg.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, torch threads {torch.get_num_threads()}, backbone {n_params / 1e6:.1f}M parameters, "
          f"vocabulary {len(tokenizer)}, SFT batch {sft.batch_size}, DPO batch {dpo.batch_size} x (1 + "
          f"{dpo.n_rejected})")
    examples = [encode_example(tokenizer, p, r, cfg.train.backbone.max_seq_len) for p, r in zip(prompts, responses)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def sft_rate(bf16: bool) -> float:
        rng = np.random.default_rng(0)
        counted, t0 = 0, 0.0
        for step in range(args.steps + 2):  # two warm-up steps
            if step == 2:
                counted, t0 = 0, time.perf_counter()
            batch = collate([examples[i] for i in rng.integers(0, len(examples), sft.batch_size)], tokenizer.pad_token_id,
                            device)
            loss = lm_loss(model, batch, bf16)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            counted += int(batch[1].sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return counted / (time.perf_counter() - t0)

    matrix = item_token_matrix(tokenizer, codes)
    rng = np.random.default_rng(1)
    rows = 256
    items = rng.integers(0, args.items, (rows, 1 + dpo.n_rejected))
    data = StageData([encode_prompt(tokenizer, p, cfg.train.backbone.max_seq_len) for p in prompts[:rows]],
                     torch.as_tensor(matrix[items], dtype=torch.long))
    reference = torch.zeros(rows, 1 + dpo.n_rejected)

    def dpo_rate() -> tuple[float, float]:
        counted_rows, counted_tokens, t0 = 0, 0, 0.0
        for step in range(args.steps + 2):
            if step == 2:
                counted_rows, counted_tokens, t0 = 0, 0, time.perf_counter()
            indices = rng.integers(0, rows, dpo.batch_size)
            policy = batch_logprobs(model, data, indices, tokenizer.pad_token_id, device).float()
            ref = reference[indices].to(device)
            loss, _ = softmax_dpo_loss(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], dpo.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            counted_rows += len(indices)
            ids, _ = pad_batch([data.prompts[i] for i in indices], tokenizer.pad_token_id)
            counted_tokens += int(ids.ne(tokenizer.pad_token_id).sum()) + policy.numel() * codes.shape[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        return counted_rows / elapsed, counted_tokens / elapsed

    fp32 = [sft_rate(False) for _ in range(args.repeats)]
    bf16 = [sft_rate(True) for _ in range(args.repeats)]
    dpo_runs = [dpo_rate() for _ in range(args.repeats)]
    print(f"SFT fp32: {statistics.median(fp32):,.0f} tokens/s (runs: {', '.join(f'{x:,.0f}' for x in fp32)})")
    print(f"SFT bf16 autocast: {statistics.median(bf16):,.0f} tokens/s "
          f"(runs: {', '.join(f'{x:,.0f}' for x in bf16)}); ratio bf16/fp32 "
          f"{statistics.median(bf16) / statistics.median(fp32):.2f}")
    print(f"DPO: {statistics.median(r for r, _ in dpo_runs):,.1f} rows/s, "
          f"{statistics.median(t for _, t in dpo_runs):,.0f} tokens/s (prompt once + {1 + dpo.n_rejected} x "
          f"{codes.shape[1]} continuation tokens per row)")
    print(f"peak RSS {peak_rss_gib():.2f} GiB" + (f", CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                                                 if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
