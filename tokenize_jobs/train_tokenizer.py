"""Train the dual SCID tokenizer: SC encoder + U2I alignment, then a user and an item RQ-VAE.

Inputs: item_semantic, user_semantic, item_collab, user_collab (vectors) and interactions.
Each side's features are concat(L2-normalised semantic, L2-normalised collaborative); the
collaborative half is left out when tokenize.use_collaborative is false. Every train interaction
(user, item) is a positive pair; validation pairs are (user, valid item), scored against one
fixed random item per pair for the AUC.

Schedule (PAPER.md section 1), one Ray Train run (TorchTrainer, tokenize.num_workers workers):
  phase 1  alpha=1, gamma=0: the SC towers learn U2I alignment until the validation AUC has not
           improved for sc.phase1_patience epochs (or sc.phase1_max_epochs). At the switch both
           RQ-VAEs are k-means initialised on the current SC embeddings.
  phase 2  alpha=sc.alpha2 on U2I + gamma=sc.gamma2 on (user RQ loss + item RQ loss) for
           sc.phase2_epochs; the RQ losses backpropagate into the SC towers. After each epoch,
           codes unused for rq.dead_code_after epochs are re-seeded from random residuals.
The item RQ loss is taken on the batch's positives and its uniformly sampled negatives, so rare
items are quantised as well as popular ones.

What `sc` (item_embeddings.sc, user_embeddings.sc) holds is always exactly the RQ-VAE's input,
so `RQVAE.encode(sc)` gives the SCID codes in every mode:
  use_u2i=true   the SC embedding: unit vectors of size sc.dim from the SC towers.
  use_u2i=false  no SC towers are trained; the RQ-VAEs quantise the features directly (their
                 encoder MLPs play the SC encoder's part) and sc = the features themselves
                 (concat of the L2-normalised vectors, size semantic [+ collaborative]). The run
                 is phase 2 only, with alpha=0 and no AUC.
  dual=false     no user RQ-VAE (users are not tokenized); user sc is still written.

Every epoch reports a checkpoint (towers, RQ-VAEs, optimizer, epoch, phase, best AUC, patience
and dead-code counters, RNG state, history). The Ray run is named from the config hash and the
input versions, so a killed job started again continues from its last finished epoch; the run
directory is deleted once the outputs are published, so a completed run is never resumed.

Outputs: item_embeddings and user_embeddings (every id: semantic, collaborative or null, sc,
model_version = run id) and, under <models_dir>/tokenizer/<run id>/, sc_encoder/ (SCTowers),
item_rqvae/ and user_rqvae/ (RQVAE.save), each registered in `models` (kind "tokenizer"), and
history.json: per epoch epoch, phase, attempt (1 + resumes), train_seconds, loss_u2i,
loss_item_rq, loss_user_rq, val_auc, recon_item, recon_user, usage_item, usage_user (per level:
used fraction, perplexity) and dead_codes_restarted; null where a quantity does not apply.
Run as `ray job submit -- python -m tokenize_jobs.train_tokenizer --config ...`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from a3gr.config import PipelineConfig, RQVAEConfig, SCConfig, TokenizeConfig
from a3gr.jobs import JobRun, job_main, setup_logging
from a3gr.runs import RunRecord
from tokenize_jobs.rqvae import RQVAE, codebook_usage
from tokenize_jobs.sc_encoder import SCTowers, u2i_auc, u2i_loss

log = logging.getLogger("a3gr.train_tokenizer")

JOB = "train_tokenizer"
INPUTS = ["item_semantic", "user_semantic", "item_collab", "user_collab", "interactions"]
STATE_FILE = "state.pt"
MODEL_KIND = "tokenizer"


# ------------------------------------------------------------------------------------------
# Pure part: tables -> aligned feature arrays and pairs

def l2_normalize(a: np.ndarray) -> np.ndarray:
    return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def vectors_by_id(frame: pd.DataFrame, id_column: str, ids: np.ndarray, table: str) -> np.ndarray:
    """The `vector` column of `frame` as a float32 matrix in the order of `ids` (all must be present)."""
    position = pd.Series(np.arange(len(frame)), index=frame[id_column].to_numpy())
    missing = np.setdiff1d(ids, position.index.to_numpy())
    if len(missing):
        raise ValueError(f"table '{table}': no vector for {len(missing)} {id_column}s, e.g. {missing[:5].tolist()}")
    rows = frame["vector"].to_numpy()[position.loc[ids].to_numpy()]
    lengths = {len(v) for v in rows}
    if len(lengths) != 1:
        raise ValueError(f"table '{table}': column 'vector' has mixed lengths {sorted(lengths)}")
    return np.stack(rows).astype(np.float32)


def features(semantic: np.ndarray, collaborative: np.ndarray | None) -> np.ndarray:
    """concat(L2-normalised semantic, L2-normalised collaborative), or the semantic half alone."""
    parts = [l2_normalize(semantic)] + ([l2_normalize(collaborative)] if collaborative is not None else [])
    return np.concatenate(parts, axis=1)


def index_pairs(frame: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """(user_id, item_id) rows -> int64 [n, 2] of (user index, item index); unknown ids are an error."""
    u = pd.Index(user_ids).get_indexer(frame["user_id"].to_numpy())
    i = pd.Index(item_ids).get_indexer(frame["item_id"].to_numpy())
    for name, idx, column, table in (("user", u, "user_id", "user_semantic"), ("item", i, "item_id", "item_semantic")):
        if (idx < 0).any():
            bad = frame[column].to_numpy()[idx < 0]
            raise ValueError(f"table 'interactions': {int((idx < 0).sum())} rows whose {column} has no row in "
                             f"'{table}', e.g. {bad[:5].tolist()}")
    return np.stack([u, i], axis=1).astype(np.int64)


def build_inputs(tables: dict[str, pd.DataFrame], use_collaborative: bool) -> dict:
    """Feature matrices, ids and pairs for training, from the five input tables."""
    item_ids = np.sort(tables["item_semantic"]["item_id"].to_numpy())
    user_ids = np.sort(tables["user_semantic"]["user_id"].to_numpy())
    item_sem = vectors_by_id(tables["item_semantic"], "item_id", item_ids, "item_semantic")
    user_sem = vectors_by_id(tables["user_semantic"], "user_id", user_ids, "user_semantic")
    item_col = vectors_by_id(tables["item_collab"], "item_id", item_ids, "item_collab") if use_collaborative else None
    user_col = vectors_by_id(tables["user_collab"], "user_id", user_ids, "user_collab") if use_collaborative else None
    inter = tables["interactions"]
    train = index_pairs(inter[inter["split"] == "train"], user_ids, item_ids)
    valid = index_pairs(inter[inter["split"] == "valid"], user_ids, item_ids)
    if not len(train):
        raise ValueError("table 'interactions': no rows with split='train'")
    return {"item_ids": item_ids, "user_ids": user_ids, "item_semantic": item_sem, "user_semantic": user_sem,
            "item_collab": item_col, "user_collab": user_col,
            "item_x": features(item_sem, item_col), "user_x": features(user_sem, user_col),
            "train_pairs": train, "valid_pairs": valid}


# ------------------------------------------------------------------------------------------
# The model and one training epoch

def settings_of(cfg: PipelineConfig) -> dict:
    """The config this job depends on: tokenize minus the encoders' sections, plus the seed."""
    out = {k: v for k, v in dataclasses.asdict(cfg.tokenize).items() if k not in ("semantic", "collaborative")}
    out["seed"] = cfg.seed
    return out


def tokenize_config(settings: dict) -> TokenizeConfig:
    fields = {f.name for f in dataclasses.fields(TokenizeConfig)}
    plain = {k: v for k, v in settings.items() if k in fields and k not in ("sc", "item_rq", "user_rq")}
    return TokenizeConfig(sc=SCConfig(**settings["sc"]), item_rq=RQVAEConfig(**settings["item_rq"]),
                          user_rq=RQVAEConfig(**settings["user_rq"]), **plain)


class TokenizerModel(nn.Module):
    """SC towers (when use_u2i) + item RQ-VAE + user RQ-VAE (when dual), trained as one module."""

    def __init__(self, user_in: int, item_in: int, t: TokenizeConfig):
        super().__init__()
        self.towers = SCTowers(user_in, item_in, t.sc) if t.use_u2i else None
        self.item_rq = RQVAE(t.sc.dim if t.use_u2i else item_in, t.item_rq)
        self.user_rq = RQVAE(t.sc.dim if t.use_u2i else user_in, t.user_rq) if t.dual else None
        self.temperature = t.sc.temperature

    def embed_users(self, x: torch.Tensor) -> torch.Tensor:
        """The user `sc` vector: SC embedding, or the features themselves without U2I."""
        return self.towers.user(x) if self.towers is not None else x

    def embed_items(self, x: torch.Tensor) -> torch.Tensor:
        return self.towers.item(x) if self.towers is not None else x

    def rq_models(self) -> dict[str, RQVAE]:
        return {"item": self.item_rq, **({"user": self.user_rq} if self.user_rq is not None else {})}

    def forward(self, user_x, pos_x, neg_x, pos_ids, neg_ids, alpha: float, gamma: float):
        """(alpha * U2I + gamma * (item RQ + user RQ), {loss name: value}) for one batch."""
        u, v_pos, v_neg = self.embed_users(user_x), self.embed_items(pos_x), self.embed_items(neg_x)
        total, parts = u.new_zeros(()), {}
        if alpha > 0 and self.towers is not None:
            loss = u2i_loss(u, v_pos, v_neg, self.temperature, pos_ids=pos_ids, neg_ids=neg_ids)
            total, parts["loss_u2i"] = total + alpha * loss, loss.item()
        if gamma > 0:
            for side, rq_input in (("item", torch.cat([v_pos, v_neg])), ("user", u)):
                rq = self.rq_models().get(side)
                if rq is not None:
                    loss = rq(rq_input).loss
                    total, parts[f"loss_{side}_rq"] = total + gamma * loss, loss.item()
        return total, parts


def loss_weights(phase: int, t: TokenizeConfig) -> tuple[float, float]:
    if not t.use_u2i:
        return 0.0, 1.0
    return (1.0, 0.0) if phase == 1 else (t.sc.alpha2, t.sc.gamma2)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A seed per (run seed, epoch, stream): a resumed epoch draws exactly what it would have."""
    return (seed * 1_000_003 + epoch * 1009 + stream) % (2 ** 63)


def train_epoch(model: nn.Module, optimizer, data: dict, t: TokenizeConfig, seed: int, epoch: int,
                alpha: float, gamma: float, rank: int = 0, world: int = 1) -> dict:
    """One pass over this worker's shard of the train pairs; mean of each loss."""
    pairs = data["train_pairs"]
    # The same permutation on every worker, cut into equal shards: DDP needs equal step counts.
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    per_worker = max(1, len(pairs) // world)
    shard = order[rank * per_worker:(rank + 1) * per_worker]
    batch = max(1, t.sc.batch_size // world)
    negatives = torch.Generator().manual_seed(epoch_seed(seed, epoch, 1 + rank))
    n_items = data["item_x"].shape[0]
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, len(shard), batch):
        idx = pairs[shard[start:start + batch]]
        users, items = idx[:, 0], idx[:, 1]
        neg = torch.randint(n_items, (t.sc.sampled_negatives,), generator=negatives).to(items.device)
        loss, parts = model(data["user_x"][users], data["item_x"][items], data["item_x"][neg], items, neg,
                            alpha, gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {k: v / steps for k, v in sums.items()}


@torch.no_grad()
def embed_all(core: TokenizerModel, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return core.embed_users(data["user_x"]), core.embed_items(data["item_x"])


@torch.no_grad()
def validation_auc(core: TokenizerModel, data: dict, users: torch.Tensor, items: torch.Tensor) -> float | None:
    if core.towers is None or not len(data["valid_pairs"]):
        return None
    pairs = data["valid_pairs"]
    return u2i_auc(users[pairs[:, 0]], items[pairs[:, 1]], items[data["valid_negatives"]])


def kmeans_init_all(core: TokenizerModel, data: dict, t: TokenizeConfig, seed: int, epoch: int) -> None:
    """k-means initialise each RQ-VAE (that asks for it) on its current inputs, the same on every worker."""
    users, items = embed_all(core, data)
    inputs = {"item": items, "user": users}
    cfgs = {"item": t.item_rq, "user": t.user_rq}
    for stream, (side, rq) in enumerate(core.rq_models().items(), start=10):
        if cfgs[side].kmeans_init:
            rq.kmeans_init(inputs[side], generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, stream)))


@torch.no_grad()
def quantization_report(core: TokenizerModel, users: torch.Tensor, items: torch.Tensor) -> dict:
    """Per RQ-VAE side: codes of every row, reconstruction error and codebook usage."""
    inputs = {"item": items, "user": users}
    out = {}
    for side, rq in core.rq_models().items():
        result = rq(inputs[side])
        codes = result.codes.cpu().numpy()
        out[side] = {"codes": codes, "recon": float(result.recon_loss),
                     "usage": codebook_usage(codes, rq.cfg.codebook_size),
                     "unique_fraction": float(len(np.unique(codes, axis=0)) / max(1, len(codes)))}
    return out


def fresh_progress(t: TokenizeConfig) -> dict:
    return {"epoch": 0, "phase": 1 if t.use_u2i else 2, "phase_epoch": 0, "best_auc": -1.0, "bad_epochs": 0,
            "attempt": 1, "done": False, "history": [],
            "idle_item": torch.zeros(t.item_rq.levels, t.item_rq.codebook_size, dtype=torch.int64),
            "idle_user": torch.zeros(t.user_rq.levels, t.user_rq.codebook_size, dtype=torch.int64)}


def end_of_epoch(core: TokenizerModel, data: dict, t: TokenizeConfig, seed: int, progress: dict,
                 losses: dict, seconds: float) -> dict:
    """Evaluate, then advance the schedule (phase switch, dead-code restarts, done); the history row."""
    epoch, phase = progress["epoch"] + 1, progress["phase"]
    users, items = embed_all(core, data)
    auc = validation_auc(core, data, users, items)
    quant = quantization_report(core, users, items) if phase == 2 else {}
    restarted = 0
    progress["phase_epoch"] += 1
    if phase == 1:
        if auc is not None and auc > progress["best_auc"]:
            progress["best_auc"], progress["bad_epochs"] = auc, 0
        else:
            progress["bad_epochs"] += 1
        if progress["bad_epochs"] >= t.sc.phase1_patience or progress["phase_epoch"] >= t.sc.phase1_max_epochs:
            kmeans_init_all(core, data, t, seed, epoch)
            progress.update(phase=2, phase_epoch=0)
            progress["done"] = t.sc.phase2_epochs <= 0
    else:
        progress["done"] = progress["phase_epoch"] >= t.sc.phase2_epochs
        if not progress["done"]:
            inputs = {"item": items, "user": users}
            cfgs = {"item": t.item_rq, "user": t.user_rq}
            for stream, (side, rq) in enumerate(core.rq_models().items(), start=20):
                restarted += restart_idle_codes(rq, inputs[side], quant[side]["codes"], progress, f"idle_{side}",
                                                cfgs[side].dead_code_after, epoch_seed(seed, epoch, stream))
    progress["epoch"] = epoch
    row = {"epoch": epoch, "phase": phase, "attempt": progress["attempt"], "train_seconds": round(seconds, 3),
           "loss_u2i": losses.get("loss_u2i"), "loss_item_rq": losses.get("loss_item_rq"),
           "loss_user_rq": losses.get("loss_user_rq"), "val_auc": auc,
           "recon_item": quant.get("item", {}).get("recon"), "recon_user": quant.get("user", {}).get("recon"),
           "usage_item": quant.get("item", {}).get("usage"), "usage_user": quant.get("user", {}).get("usage"),
           "dead_codes_restarted": restarted}
    progress["history"].append(row)
    return row


def restart_idle_codes(rq: RQVAE, x: torch.Tensor, codes: np.ndarray, progress: dict, key: str,
                       after: int, seed: int) -> int:
    """Count epochs each code went unused; re-seed those idle for `after` epochs (0 = never)."""
    used = torch.zeros_like(progress[key], dtype=torch.bool)
    for level in range(codes.shape[1]):
        used[level, np.unique(codes[:, level])] = True
    idle = torch.where(used, torch.zeros_like(progress[key]), progress[key] + 1)
    if after <= 0:
        progress[key] = idle
        return 0
    dead = idle >= after
    restarted = rq.restart_dead_codes(x, (~dead).long(), generator=torch.Generator().manual_seed(seed)) \
        if dead.any() else 0
    progress[key] = torch.where(dead, torch.zeros_like(idle), idle)
    return restarted


def format_epoch(row: dict) -> str:
    def num(v):
        return "-" if v is None else f"{v:.4f}"

    usage = " ".join(side + "_used=" + "/".join(f"{u['used_fraction']:.2f}" for u in row[f"usage_{side}"])
                     for side in ("item", "user") if row.get(f"usage_{side}"))
    return (f"epoch {row['epoch']} phase {row['phase']}: u2i={num(row['loss_u2i'])} "
            f"item_rq={num(row['loss_item_rq'])} user_rq={num(row['loss_user_rq'])} "
            f"val_auc={num(row['val_auc'])} recon_item={num(row['recon_item'])} recon_user={num(row['recon_user'])} "
            f"{usage} restarted={row['dead_codes_restarted']} (trained in {row['train_seconds']:.1f}s)")


def save_state(directory: str | Path, core: TokenizerModel, optimizer, progress: dict) -> None:
    torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
                "torch_rng": torch.get_rng_state()}, Path(directory) / STATE_FILE)


def load_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore from the latest checkpoint if any, then train epoch by epoch."""
    import ray.train
    import ray.train.torch

    setup_logging()
    settings, arrays = config["settings"], config["arrays"]
    t = tokenize_config(settings)
    seed = settings["seed"]
    torch.set_num_threads(t.torch_threads)
    torch.manual_seed(seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    data = {k: torch.from_numpy(np.array(v)).to(device) for k, v in arrays.items()}
    core = TokenizerModel(data["user_x"].shape[1], data["item_x"].shape[1], t).to(device)
    optimizer = torch.optim.AdamW(core.parameters(), lr=t.sc.lr)
    progress = fresh_progress(t)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        progress = state["progress"]
        progress["attempt"] += 1
        if rank == 0:
            log.info("train_tokenizer: resumed after epoch %d (phase %d)%s", progress["epoch"], progress["phase"],
                     ", training already finished" if progress["done"] else "")
    elif not t.use_u2i:
        kmeans_init_all(core, data, t, seed, 0)

    model = core
    if world > 1:
        # phase 1 leaves the RQ-VAEs out of the loss, so some parameters get no gradient
        model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": True})
    while not progress["done"]:
        t0 = time.perf_counter()
        alpha, gamma = loss_weights(progress["phase"], t)
        losses = train_epoch(model, optimizer, data, t, seed, progress["epoch"] + 1, alpha, gamma, rank, world)
        row = end_of_epoch(core, data, t, seed, progress, losses, time.perf_counter() - t0)
        if rank == 0:
            log.info("train_tokenizer: %s", format_epoch(row))
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_state(directory, core, optimizer, progress)
            ray.train.report({k: v for k, v in row.items() if not k.startswith("usage")},
                             checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


# ------------------------------------------------------------------------------------------
# The job shell

def trainer_arrays(inputs: dict, seed: int) -> dict:
    """What the workers train on, with one fixed random negative item per validation pair."""
    valid = inputs["valid_pairs"]
    n_items = len(inputs["item_ids"])
    rng = np.random.default_rng(seed)
    # shifting by 1..n-1 never lands on the positive itself
    negatives = (valid[:, 1] + rng.integers(1, max(2, n_items), size=len(valid))) % n_items
    return {"user_x": inputs["user_x"], "item_x": inputs["item_x"], "train_pairs": inputs["train_pairs"],
            "valid_pairs": valid, "valid_negatives": negatives.astype(np.int64)}


def run_name(config_hash: str, inputs: dict) -> str:
    """Stable Ray run name: the same config and input versions resume the same run."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]
    return f"tokenizer-{config_hash}-{digest}"


def ray_storage(cfg: PipelineConfig) -> Path:
    from a3gr.registry import models_dir

    return (models_dir(cfg) / JOB / "_ray").resolve()


def fit(cfg: PipelineConfig, settings: dict, arrays: dict, name: str) -> dict:
    """Run (or resume) the Ray Train run `name`; the final checkpoint's state."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from a3gr.ray_util import ensure_ray

    ensure_ray(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"settings": settings, "arrays": arrays},
        scaling_config=ScalingConfig(num_workers=cfg.tokenize.num_workers, use_gpu=False),
        run_config=RunConfig(name=name, storage_path=str(ray_storage(cfg)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train_tokenizer: Ray run {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return load_state(directory)


def embedding_frame(id_column: str, ids, semantic, collaborative, sc, version: str) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({id_column: ids, "semantic": list(semantic),
                         "collaborative": list(collaborative) if collaborative is not None else [None] * n,
                         "sc": list(sc.astype(np.float32)), "model_version": [version] * n})


def final_metrics(history: list[dict], quant: dict, side: str | None) -> dict:
    """Registry metrics: final validation AUC, and for an RQ-VAE its recon error and codebook usage."""
    aucs = [row["val_auc"] for row in history if row["val_auc"] is not None]
    out = {"val_auc": aucs[-1] if aucs else None, "epochs": len(history)}
    if side is not None:
        out.update(recon=quant[side]["recon"], usage=quant[side]["usage"],
                   unique_fraction=quant[side]["unique_fraction"])
    return out


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    from a3gr.registry import models_dir, register_model

    settings = settings_of(cfg)
    t = cfg.tokenize
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=settings, force=force) as job:
        if job.up_to_date:
            return job.record
        torch.set_num_threads(t.torch_threads)
        torch.manual_seed(cfg.seed)
        # read exactly the versions the run record names
        tables = {name: job.lake.read_pandas(name, version=job.record.inputs[f"table:{name}"])
                  for name in INPUTS if t.use_collaborative or not name.endswith("_collab")}
        inputs = build_inputs(tables, t.use_collaborative)
        log.info("train_tokenizer: %d items, %d users, %d train pairs, %d validation pairs, "
                 "features item %d / user %d", len(inputs["item_ids"]), len(inputs["user_ids"]),
                 len(inputs["train_pairs"]), len(inputs["valid_pairs"]), inputs["item_x"].shape[1],
                 inputs["user_x"].shape[1])
        name = run_name(job.record.config_hash, job.record.inputs)
        state = fit(cfg, settings, trainer_arrays(inputs, cfg.seed), name)

        core = TokenizerModel(inputs["user_x"].shape[1], inputs["item_x"].shape[1], tokenize_config(settings))
        core.load_state_dict(state["model"])
        history = state["progress"]["history"]
        users, items = embed_all(core, {"user_x": torch.from_numpy(inputs["user_x"]),
                                        "item_x": torch.from_numpy(inputs["item_x"])})
        quant = quantization_report(core, users, items)

        out_dir = (models_dir(cfg) / "tokenizer" / job.run_id).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = {"item_rqvae": (core.item_rq, "item")}
        if core.user_rq is not None:
            artifacts["user_rqvae"] = (core.user_rq, "user")
        if core.towers is not None:
            artifacts["sc_encoder"] = (core.towers, None)
        for artifact, (module, _) in artifacts.items():
            module.save(out_dir / artifact)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))

        for side, sc in (("item", items), ("user", users)):
            collaborative = inputs[f"{side}_collab"]
            vector_dims = {"semantic": inputs[f"{side}_semantic"].shape[1], "sc": sc.shape[1]}
            if collaborative is not None:
                vector_dims["collaborative"] = collaborative.shape[1]
            job.publish_arrow(f"{side}_embeddings", embedding_frame(
                f"{side}_id", inputs[f"{side}_ids"], inputs[f"{side}_semantic"], collaborative, sc.numpy(),
                job.run_id), context={"vector_dims": vector_dims})
        for artifact, (_, side) in artifacts.items():
            register_model(job.lake, artifact, job.run_id, MODEL_KIND, out_dir / artifact, job.run_id,
                           metrics=final_metrics(history, quant, side), config_hash=job.record.config_hash)
        log.info("train_tokenizer: %d epochs; final val AUC %s; item codes unique for %.1f%% of items",
                 len(history), final_metrics(history, quant, None)["val_auc"],
                 100 * quant["item"]["unique_fraction"])
        # published: a later run with the same inputs and config must start afresh, not resume this one
        shutil.rmtree(ray_storage(cfg) / name, ignore_errors=True)
    return job.record


if __name__ == "__main__":
    job_main(run)
