"""Progressive Softmax-DPO (paper level 3): SP easy -> medium -> hard, then RF easy -> hard.

    preference_pairs + the registered SFT model -> one Softmax-DPO stage after another, each
    stage starting from (and referenced against) the previous stage's result -> `dpo_<stage>`
    models, the last also registered as `dpo`.

Softmax-DPO (training/dpo_loss.py) compares the chosen SCID with all N rejected at once; TRL's
DPOTrainer takes one rejected response, so the loop is ours. Reference log-probs are computed
once per stage with the stage's starting model (policy == reference there), so no frozen copy
is held in memory. A finished stage is a directory with a `stage.json`; a re-run skips it.

Modes (train.dpo.mode), the rows of the paper's Table 5:
  progressive     the configured stages in order, each the reference of the next;
  sp_only         only the self-play stages, in order;
  no_progression  all configured stages' rows pooled into one stage;
  plain           one stage with N random catalogue items as the rejected set (plain Softmax-DPO).
Run as `a3gr train dpo` (a Ray Train job).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from a3gr.config import PipelineConfig, config_to_dict
from a3gr.jobs import JobRun, job_main, setup_logging
from a3gr.registry import require_model
from a3gr.runs import RunRecord
from training.dpo_loop import STAGE_FILE, run_stages, stage_plan

log = logging.getLogger("a3gr.dpo")

JOB = "dpo"
INPUTS = ["preference_pairs", "sft_examples", "item_scid"]


def settings_of(cfg: PipelineConfig, sft_version: str) -> dict:
    t = cfg.train
    return {"seed": cfg.seed, "dpo": dataclasses.asdict(t.dpo), "lora": dataclasses.asdict(t.backbone.lora),
            "max_seq_len": t.backbone.max_seq_len, "val_users": t.sft.val_users, "val_beam": t.sft.val_beam,
            "sft_model": sft_version}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the stages run on rank 0's device; stage directories are the checkpoints."""
    import ray.train
    import ray.train.torch

    from a3gr.config import config_from_dict
    from a3gr.lake import Lake

    setup_logging()
    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed)
    if ray.train.get_context().get_world_rank() != 0:
        return
    lake = Lake(config["lake_root"], cfg.lake.storage_options_env)
    tables = {name: lake.read_pandas(name, version=config["versions"][f"table:{name}"]) for name in INPUTS}
    results = run_stages(Path(config["sft_dir"]), tables["preference_pairs"], tables["sft_examples"],
                         tables["item_scid"], cfg, Path(config["out_dir"]), ray.train.torch.get_device())
    ray.train.report({"stages": len(results)})


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from a3gr.lake import Lake
    from a3gr.ray_util import ensure_ray
    from a3gr.registry import models_dir, register_model

    lake = Lake.from_config(cfg)
    sft = require_model(lake, "sft", "`a3gr train sft`")
    settings = settings_of(cfg, sft["version"])
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=settings, force=force, lake=lake) as job:
        if job.up_to_date:
            return job.record
        key = hashlib.sha256(json.dumps([settings, job.record.inputs], sort_keys=True).encode()).hexdigest()[:12]
        out_dir = (models_dir(cfg) / JOB / key).resolve()
        ensure_ray(cfg)
        root = cfg.lake.root if "://" in cfg.lake.root else str(Path(cfg.lake.root).resolve())
        TorchTrainer(train_loop_per_worker,
                     train_loop_config={"cfg": config_to_dict(cfg), "lake_root": root, "versions": job.record.inputs,
                                        "sft_dir": sft["path"], "out_dir": str(out_dir)},
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.train.use_gpu),
                     run_config=RunConfig(name=f"dpo-{key}", storage_path=str(out_dir.parent / "_ray"))).fit()
        results = []
        for number, (name, _) in enumerate(stage_plan(cfg.train.dpo), 1):
            result = json.loads((out_dir / f"{number}_{name}" / STAGE_FILE).read_text())
            register_model(lake, f"dpo_{name}", key, "backbone", result["model"], job.run_id,
                           metrics=result["metrics"], config_hash=job.record.config_hash)
            results.append(result)
        # a last stage skipped for lack of rows kept its input model: the figures are that model's
        trained = [r for r in results if not r["metrics"].get("skipped")] or results
        register_model(lake, "dpo", key, "backbone", results[-1]["model"], job.run_id,
                       metrics={"stage": trained[-1]["stage"], **trained[-1]["metrics"]},
                       config_hash=job.record.config_hash)
        log.info("dpo: %s", "; ".join(f"{r['stage']} R@10 {r['metrics'].get('recall@10', float('nan')):.4f}"
                                      for r in results))
    return job.record


if __name__ == "__main__":
    job_main(run)
