"""Multi-task SFT (paper level 2): the backbone learns every task of the instruction table.

    sft_examples + item_scid + user_scid -> backbone with SCID tokens -> SFT (loss on the response
    only; AdamW, warmup + cosine, gradient accumulation) -> the best checkpoint, registered as `sft`.

Runs as a Ray Train job (`a3gr train sft`, or `ray job submit -- python -m training.sft --config ...`).
Every `checkpoint_every` steps a checkpoint holds the model, optimizer, scheduler, step, RNG and
settings, so a killed run resumes at the same step. Every `eval_every` steps (and at the end) the
validation loss and a quick validation Recall@10 through the same trie-constrained beam search
as batch inference are computed; the best Recall@10 is kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import torch

from a3gr.config import PipelineConfig, config_to_dict
from a3gr.jobs import JobRun, job_main, setup_logging
from a3gr.runs import RunRecord
from training.sft_loop import fmt_metric, build_initial_model, prepare_data, train_sft

log = logging.getLogger("a3gr.sft")

JOB = "sft"
INPUTS = ["sft_examples", "item_scid", "user_scid"]


def settings_of(cfg: PipelineConfig) -> dict:
    """Everything that changes the trained model: its hash names the run (and its checkpoints)."""
    t = cfg.train
    return {"seed": cfg.seed, "backbone": dataclasses.asdict(t.backbone), "sft": dataclasses.asdict(t.sft),
            "torch_threads": t.torch_threads, "num_workers": t.num_workers, "use_gpu": t.use_gpu}


def run_key(settings: dict, inputs: dict) -> str:
    """The same settings and input versions resume the same run (and its checkpoints)."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_dir(cfg: PipelineConfig, key: str, job: str = JOB) -> Path:
    from a3gr.registry import models_dir

    return (models_dir(cfg) / job / key).resolve()


def read_inputs(lake_root: str, storage_env: str, versions: dict) -> dict[str, pd.DataFrame]:
    from a3gr.lake import Lake

    lake = Lake(lake_root, storage_env)
    return {name: lake.read_pandas(name, version=versions[f"table:{name}"]) for name in INPUTS}


def worker_tables(config: dict) -> dict[str, pd.DataFrame]:
    """The training tables of a worker: Parquet files the job wrote (`table_files`), else the lake versions."""
    if config.get("table_files"):
        return {name: pd.read_parquet(path) for name, path in config["table_files"].items()}
    return read_inputs(config["lake_root"], config["storage_env"], config["versions"])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: load the initial backbone, encode the table, train (resuming if possible)."""
    import ray.train
    import ray.train.torch

    from a3gr.config import config_from_dict
    from training.backbone import load_backbone
    from training.common import RayCheckpoints

    setup_logging()
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    seed = cfg.seed
    torch.set_num_threads(t.torch_threads)
    torch.manual_seed(seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model, tokenizer = load_backbone(config["init_dir"], t.backbone)
    model.to(device)
    tables = worker_tables(config)
    data = prepare_data(tables["sft_examples"], tables["item_scid"], tokenizer, t.backbone, t.sft, seed)
    if rank == 0:
        log.info("%s: %d training and %d validation examples, %d validation users, %d items", config["job"],
                 len(data.train), len(data.valid), len(data.eval_set.prompts), len(data.item_ids))
    trainable = model
    if world > 1:
        model = ray.train.torch.prepare_model(model)
    train_sft(model, tokenizer, data, t.sft, RayCheckpoints(rank), Path(config["best_dir"]), device, seed,
              rank, world, trainable=trainable)


def lake_source(cfg: PipelineConfig, versions: dict) -> dict:
    """Where the workers read their tables: the lake, at the versions the run record names."""
    return {"lake_root": str(Path(cfg.lake.root).resolve()) if "://" not in cfg.lake.root else cfg.lake.root,
            "storage_env": cfg.lake.storage_options_env, "versions": versions}


def fit(cfg: PipelineConfig, directory: Path, source: dict, job: str = JOB) -> dict:
    """Run (or resume) the Ray Train run `<job>-<directory name>`; the final checkpoint's trainer state.

    source: where the workers find `sft_examples` and `item_scid`: `lake_source(...)`, or
    {"table_files": {name: Parquet path}} for tables a job computed itself (the TIGER baseline).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from a3gr.ray_util import ensure_ray

    ensure_ray(cfg)
    name = f"{job}-{directory.name}"
    config = {"cfg": config_to_dict(cfg), "init_dir": str(directory / "init"), "best_dir": str(directory / "best"),
              "job": job, **source}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=max(1, cfg.train.num_workers), use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=name, storage_path=str(directory.parent / "_ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job}: Ray run {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


def register_best(job: JobRun, name: str, directory: Path, state: dict, metrics: dict | None = None) -> None:
    """Register <directory>/best as model `name` (version: the run key) with its best validation metrics."""
    from a3gr.registry import register_model

    best = state["best"]
    if not (directory / "best" / "config.json").exists():
        raise RuntimeError(f"{job.job}: training finished but no best model was saved under {directory / 'best'}")
    register_model(job.lake, name, directory.name, "backbone", directory / "best", job.run_id,
                   metrics={**{k: v for k, v in best.items() if v is not None}, "steps": state["step"],
                            **(metrics or {})},
                   config_hash=job.record.config_hash)
    log.info("%s: best validation Recall@10 %s at step %s; registered %s/%s", job.job,
             fmt_metric(best.get("recall@10")), best.get("step"), name, directory.name)


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    settings = settings_of(cfg)
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=settings, force=force) as job:
        if job.up_to_date:
            return job.record
        directory = run_dir(cfg, run_key(settings, job.record.inputs))
        tables = read_inputs(cfg.lake.root, cfg.lake.storage_options_env, job.record.inputs)
        build_initial_model(cfg, tables, directory / "init")
        state = fit(cfg, directory, lake_source(cfg, job.record.inputs))
        register_best(job, "sft", directory, state)
    return job.record


if __name__ == "__main__":
    job_main(run)
