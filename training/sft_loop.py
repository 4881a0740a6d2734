"""The SFT loop (paper level 2), plain PyTorch: no Ray, no lake, so it runs anywhere torch does.

training/sft.py is the job around it (Ray Train, Delta inputs, the model registry).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from a3gr.config import BackboneConfig, PipelineConfig, SFTConfig
from training.common import (CheckpointStore, EvalSet, LocalCheckpoints, cosine_lr, eval_set_from, item_codes,
                             load_training_state, micro_batches, pick_device, quick_recall, save_training_state,
                             scid_tokens)

log = logging.getLogger("a3gr.sft")
FAILPOINT_ENV = "A3GR_FAILPOINT"

@dataclasses.dataclass
class SFTData:
    train: list[tuple[list[int], list[int]]]
    valid: list[tuple[list[int], list[int]]]
    eval_set: EvalSet
    item_ids: np.ndarray
    item_matrix: np.ndarray  # [items, 4] token ids, row order of item_ids


def prepare_data(examples: pd.DataFrame, item_scid: pd.DataFrame, tokenizer, bcfg: BackboneConfig,
                 sft: SFTConfig, seed: int) -> SFTData:
    """Tokenize the instruction table; the valid rows give the validation loss and Recall@10."""
    from training.backbone import encode_examples, item_token_matrix

    item_ids, codes = item_codes(item_scid)
    train = examples[examples["split"] == "train"].sort_values("example_id")
    valid = examples[examples["split"] == "valid"].sort_values("example_id")
    if sft.val_users:
        valid = valid.head(sft.val_users)
    eval_set = eval_set_from(examples, tokenizer, item_ids, bcfg.max_seq_len, sft.val_users, seed)
    return SFTData(encode_examples(tokenizer, train["prompt"], train["response"], bcfg.max_seq_len),
                   encode_examples(tokenizer, valid["prompt"], valid["response"], bcfg.max_seq_len),
                   eval_set, item_ids, item_token_matrix(tokenizer, codes))


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def lm_loss(model, batch, bf16: bool) -> torch.Tensor:
    ids, mask, labels = batch
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@torch.no_grad()
def validation_loss(model, valid, pad_id: int, batch_size: int, device, bf16: bool) -> float | None:
    if not valid:
        return None
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    for lo in range(0, len(valid), batch_size):
        batch = collate(valid[lo:lo + batch_size], pad_id, device)
        n = int((batch[2][:, 1:] != -100).sum())
        total += float(lm_loss(model, batch, bf16)) * n
        weight += n
    model.train(was_training)
    return total / max(weight, 1)


def total_steps(n_train: int, sft: SFTConfig, world: int) -> int:
    return max(1, math.ceil(sft.epochs * n_train / (sft.batch_size * sft.grad_accum * world)))


def train_sft(model, tokenizer, data: SFTData, sft: SFTConfig, store: CheckpointStore, best_dir: Path | None,
              device, seed: int, rank: int = 0, world: int = 1, trainable=None) -> dict:
    """The SFT loop; resumes from `store`. Returns {'history': [...], 'best': {...}, 'step': n}."""
    from batch_infer.beam import TokenTrie
    from training.backbone import save_backbone

    core = trainable or model
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=sft.weight_decay)
    steps = total_steps(len(data.train), sft, world)
    warmup = int(sft.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup))
    state = load_training_state(store, core, optimizer, scheduler) or {"step": 0, "history": [], "best": {}}
    trie = TokenTrie(data.item_matrix)
    pad_id = tokenizer.pad_token_id
    step = state["step"]
    model.train()
    bar = tqdm(total=steps, initial=step, desc="sft", unit="step", disable=rank != 0, mininterval=5)
    tokens, t0 = 0, time.perf_counter()

    def evaluate() -> dict:
        row = {"step": step, "val_loss": validation_loss(model, data.valid, pad_id, sft.batch_size, device, sft.bf16)}
        row.update(quick_recall(core, trie, data.eval_set, pad_id, sft.val_beam, device))
        row["tokens_per_s"] = round(tokens / max(time.perf_counter() - t0, 1e-9), 1)
        return row

    while step < steps:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for indices in micro_batches(len(data.train), sft.batch_size, seed, step * sft.grad_accum,
                                     sft.grad_accum, rank, world):
            batch = collate([data.train[i] for i in indices], pad_id, device)
            loss = lm_loss(model, batch, sft.bf16) / sft.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += int(batch[1].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                        refresh=False)
        row = None
        if step % sft.eval_every == 0 or step == steps:
            row = evaluate()
            row["train_loss"] = loss_sum
            state["history"].append(row)
            improved = row.get("recall@10", -1) > state["best"].get("recall@10", -1) or (
                row.get("recall@10", -1) == state["best"].get("recall@10", -1)
                and (row["val_loss"] or 0) < (state["best"].get("val_loss") or float("inf")))
            if rank == 0:
                log.info("sft step %d/%d: train loss %.4f, val loss %s, val R@10 %s, N@10 %s, %.0f tokens/s",
                         step, steps, loss_sum, fmt_metric(row["val_loss"]), fmt_metric(row.get("recall@10")),
                         fmt_metric(row.get("ndcg@10")), row["tokens_per_s"])
            if improved:
                state["best"] = dict(row)
                if rank == 0 and best_dir is not None:
                    save_backbone(core, tokenizer, best_dir)
        if row is not None or step % sft.checkpoint_every == 0:
            state["step"] = step
            save_state = {"step": step, "history": state["history"], "best": state["best"]}
            store.save(lambda d: save_training_state(d, core, optimizer, scheduler, save_state),
                       {"step": step, **({k: v for k, v in (row or {}).items() if v is not None})})
            if os.environ.get(FAILPOINT_ENV) == f"kill_after_checkpoint:{step}":
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a kill right after a checkpoint
    bar.close()
    return {"history": state["history"], "best": state["best"], "step": step}


def fmt_metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def build_initial_model(cfg: PipelineConfig, tables: dict, init_dir: Path) -> None:
    """Backbone with every SCID token, saved once so every (re)start and worker loads the same one."""
    from training.backbone import build_backbone, save_backbone

    if (init_dir / "config.json").exists():
        return
    examples = tables["sft_examples"]
    corpus = pd.concat([examples["prompt"], examples["response"]]).tolist()
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_backbone(cfg.train.backbone, scid_tokens(tables["item_scid"], tables["user_scid"]),
                                      corpus, cfg.seed)
    tmp = init_dir.with_name(init_dir.name + ".tmp")
    save_backbone(model, tokenizer, tmp)
    tmp.rename(init_dir)
    log.info("initial backbone (%d parameters, vocabulary %d) saved to %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), init_dir)


def run_local(cfg: PipelineConfig, tables: dict[str, pd.DataFrame], directory: Path, device=None) -> dict:
    """The same training without Ray or a lake (benchmarks, GPU experiments): tables in, model dir out."""
    from training.backbone import load_backbone

    build_initial_model(cfg, tables, directory / "init")
    model, tokenizer = load_backbone(directory / "init", cfg.train.backbone)
    device = device or pick_device(cfg.train.use_gpu)
    model.to(device)
    data = prepare_data(tables["sft_examples"], tables["item_scid"], tokenizer, cfg.train.backbone, cfg.train.sft,
                        cfg.seed)
    return train_sft(model, tokenizer, data, cfg.train.sft, LocalCheckpoints(directory / "checkpoints"),
                     directory / "best", device, cfg.seed)
