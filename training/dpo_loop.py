"""Progressive Softmax-DPO stages, plain PyTorch: no Ray, no lake (training/dpo.py is the job)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from a3gr.config import DPOConfig, PipelineConfig
from training.common import cosine_lr, eval_set_from, item_codes, micro_batches, pick_device, quick_recall

log = logging.getLogger("a3gr.dpo")

MODES = ("progressive", "sp_only", "no_progression", "plain")
STAGE_FILE = "stage.json"


def stage_plan(dpo: DPOConfig) -> list[tuple[str, list[str]]]:
    """[(stage name, preference stages whose rows it trains on)] for the configured mode."""
    if dpo.mode not in MODES:
        raise ValueError(f"train.dpo.mode must be one of {', '.join(MODES)}, got {dpo.mode!r}")
    if dpo.mode == "progressive":
        return [(s, [s]) for s in dpo.stages]
    if dpo.mode == "sp_only":
        return [(s, [s]) for s in dpo.stages if s.startswith("sp_")]
    if dpo.mode == "no_progression":
        return [("pooled", list(dpo.stages))]
    return [("plain", [dpo.stages[0]])]


def random_rejected(pairs: pd.DataFrame, item_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Plain Softmax-DPO: N distinct random catalogue items per row, never the chosen one."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(pairs), n), dtype=np.int64)
    for row, chosen in enumerate(pairs["chosen_item"].to_numpy()):
        pool = rng.choice(item_ids, size=min(len(item_ids), n + 1), replace=False)
        out[row] = pool[pool != chosen][:n]
    return out


@dataclasses.dataclass
class StageData:
    prompts: list[list[int]]
    continuations: torch.Tensor  # [rows, 1 + N, L] token ids; column 0 is the chosen item


def stage_data(pairs: pd.DataFrame, tokenizer, item_ids: np.ndarray, item_matrix: np.ndarray, max_len: int,
               rejected_items: np.ndarray | None = None) -> StageData:
    from training.backbone import encode_prompt

    row_of = pd.Series(np.arange(len(item_ids)), index=item_ids)
    rejected = rejected_items if rejected_items is not None else np.stack(pairs["rejected_items"].map(np.asarray))
    items = np.concatenate([pairs["chosen_item"].to_numpy(np.int64)[:, None], rejected], axis=1)
    rows = row_of.loc[items.ravel()].to_numpy().reshape(items.shape)
    return StageData([encode_prompt(tokenizer, p, max_len) for p in pairs["prompt"]],
                     torch.as_tensor(item_matrix[rows], dtype=torch.long))


def batch_logprobs(model, data: StageData, indices: np.ndarray, pad_id: int, device) -> torch.Tensor:
    from batch_infer.beam import sequence_logprobs
    from training.backbone import pad_batch

    ids, mask = pad_batch([data.prompts[i] for i in indices], pad_id, left=True)
    return sequence_logprobs(model, ids.to(device), mask.to(device), data.continuations[indices].to(device))


@torch.no_grad()
def reference_logprobs(model, data: StageData, pad_id: int, batch_size: int, device) -> torch.Tensor:
    model.eval()
    out = [batch_logprobs(model, data, np.arange(lo, min(lo + batch_size, len(data.prompts))), pad_id, device)
           for lo in range(0, len(data.prompts), batch_size)]
    return torch.cat(out).float().cpu()


def train_stage(model, data: StageData, reference: torch.Tensor, dpo: DPOConfig, pad_id: int, device,
                seed: int, name: str) -> list[dict]:
    """One Softmax-DPO stage over its rows; returns per-step metrics."""
    from training.dpo_loss import softmax_dpo_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=dpo.lr)
    steps = max(1, math.ceil(dpo.epochs * len(data.prompts) / dpo.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    model.train()
    history = []
    for step, indices in enumerate(tqdm(micro_batches(len(data.prompts), dpo.batch_size, seed, 0, steps),
                                        desc=f"dpo {name}", unit="step", mininterval=5)):
        policy = batch_logprobs(model, data, indices, pad_id, device).float()
        ref = reference[indices].to(device)
        loss, metrics = softmax_dpo_loss(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], dpo.beta)
        if dpo.sft_weight:
            loss = loss - dpo.sft_weight * policy[:, 0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": float(loss.detach()),
                        **{k: float(v) for k, v in metrics.items()}})
    return history


def run_stages(model_dir: Path, pairs: pd.DataFrame, examples: pd.DataFrame, item_scid: pd.DataFrame,
               cfg: PipelineConfig, out_dir: Path, device) -> list[dict]:
    """Every stage of the plan in order; a stage whose directory is complete is loaded, not retrained."""
    from batch_infer.beam import TokenTrie
    from batch_infer.engines import load_tokenizer
    from training.backbone import item_token_matrix, load_backbone, save_backbone

    dpo, bcfg, seed = cfg.train.dpo, cfg.train.backbone, cfg.seed
    results, current = [], Path(model_dir)
    # every stage keeps the SFT model's tokenizer: the item token matrix and validation set are built once
    tokenizer = load_tokenizer(model_dir)
    item_ids, codes = item_codes(item_scid)
    item_matrix = item_token_matrix(tokenizer, codes)
    trie = TokenTrie(item_matrix)
    eval_set = eval_set_from(examples, tokenizer, item_ids, bcfg.max_seq_len, cfg.train.sft.val_users, seed)
    pad_id = tokenizer.pad_token_id
    for number, (name, sources) in enumerate(stage_plan(dpo), 1):
        stage_dir = out_dir / f"{number}_{name}"
        if (stage_dir / STAGE_FILE).exists():
            result = json.loads((stage_dir / STAGE_FILE).read_text())
            log.info("dpo: stage %s already done (R@10 %.4f), skipped", name, result["metrics"].get("recall@10", -1))
            results.append(result)
            current = Path(result["model"])  # a stage skipped for lack of rows kept its input model
            continue
        rows = pairs[pairs["stage"].isin(sources)].sort_values("pair_id").reset_index(drop=True)
        if rows.empty:
            # e.g. sp_hard on a sparse codebook: no item shares two codes with enough others
            log.warning("dpo: stage %s has no rows in preference_pairs (stages %s); it is skipped", name, sources)
            result = {"stage": name, "sources": sources, "metrics": {"rows": 0, "skipped": True},
                      "model": str(current)}
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / STAGE_FILE).write_text(json.dumps(result, indent=2))
            results.append(result)
            continue
        t0 = time.perf_counter()
        model, _ = load_backbone(current, bcfg)
        model.to(device)
        rejected = random_rejected(rows, item_ids, dpo.n_rejected, seed) if name == "plain" else None
        data = stage_data(rows, tokenizer, item_ids, item_matrix, bcfg.max_seq_len, rejected)
        reference = reference_logprobs(model, data, pad_id, dpo.batch_size * 4, device)
        history = train_stage(model, data, reference, dpo, pad_id, device, seed + number, name)
        metrics = quick_recall(model, trie, eval_set, pad_id, cfg.train.sft.val_beam, device)
        tail = history[-max(1, len(history) // 10):]
        metrics.update(rows=len(rows), steps=len(history), seconds=round(time.perf_counter() - t0, 1),
                       final_loss=float(np.mean([h["loss"] for h in tail])),
                       first_loss=history[0]["loss"],
                       accuracy=float(np.mean([h.get("accuracy", 0.0) for h in tail])))
        save_backbone(model, tokenizer, stage_dir / "model")
        result = {"stage": name, "sources": sources, "metrics": metrics, "model": str(stage_dir / "model")}
        (stage_dir / STAGE_FILE).write_text(json.dumps(result, indent=2))
        log.info("dpo: stage %s: %d rows, loss %.4f -> %.4f, val R@10 %.4f, N@10 %.4f, %.0fs", name, len(rows),
                 metrics["first_loss"], metrics["final_loss"], metrics.get("recall@10", -1),
                 metrics.get("ndcg@10", -1), metrics["seconds"])
        results.append(result)
        current = stage_dir / "model"
    return results


def run_local(cfg: PipelineConfig, sft_dir: Path, tables: dict[str, pd.DataFrame], out_dir: Path,
              device=None) -> list[dict]:
    """The same stages without Ray or a lake (benchmarks, GPU experiments)."""
    return run_stages(sft_dir, tables["preference_pairs"], tables["sft_examples"], tables["item_scid"], cfg,
                      out_dir, device or pick_device(cfg.train.use_gpu))
