"""The TIGER-style baseline (Rajput et al., 2023) in the same pipeline: text-only item codes, SEQ only.

    item_semantic -> an RQ-VAE on the item text vectors alone (k-means initialised codebooks; no
    collaborative signal, no user side) -> item codes + a uniqueness level (collision-free)
    interactions  -> one SEQ example per training position (history: earlier training items, at
    most etl.max_history; target: the next training item) with the item-only prompt
    (a3gr.prompts.item_seq_prompt, no user SCID), plus one `valid` row per user (history: all
    training items; target: the valid item) for the quick validation Recall@10; test items never
    -> the same backbone and SFT schedule as `sft` (train.backbone, train.sft; training/sft.py's
    Ray Train job) -> the best checkpoint, registered as `tiger`, with its own item code map
    `item_scid.parquet` beside the weights (the model's SCID tokens mean nothing without it;
    batch_infer/evaluate.py ranks over that map, not over the `item_scid` table).

The run directory (<models_dir>/tiger/<run key>) keeps the codes, the examples and the SFT
checkpoints, so a killed run resumes where it stopped; the run key is the settings and the input
versions. train.tiger.enabled=false records a skipped run and registers nothing.
Run as `a3gr train tiger` or `ray job submit -- python -m training.tiger --config ...`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from a3gr.config import PipelineConfig, RQVAEConfig, TigerConfig
from a3gr.jobs import JobRun, job_main, skipped_run
from a3gr.prompts import item_seq_prompt
from a3gr.registry import ITEM_CODES_FILE
from a3gr.runs import RunRecord
from a3gr.scid import add_uniqueness_level, collision_rate, format_scid
from tokenize_jobs.assign_scid import sorted_vectors
from tokenize_jobs.train_tokenizer import restart_idle_codes
from training import sft
from training.sft_loop import build_initial_model

log = logging.getLogger("a3gr.tiger")

JOB = "tiger"
INPUTS = ["item_semantic", "interactions"]
EXAMPLES_FILE = "examples.parquet"


# ------------------------------------------------------------------------------------------
# Pure part: item vectors -> codes; interactions -> SEQ examples

def resolved_settings(cfg: PipelineConfig) -> TigerConfig:
    """train.tiger with levels and codebook size taken from tokenize.item_rq where they are 0."""
    t = cfg.train.tiger
    return dataclasses.replace(t, levels=t.levels or cfg.tokenize.item_rq.levels,
                               codebook_size=t.codebook_size or cfg.tokenize.item_rq.codebook_size)


def train_text_rqvae(vectors: np.ndarray, settings: TigerConfig, seed: int):
    """(RQ-VAE, its input) on the L2-normalised rows of `vectors`: k-means initialised codebooks, AdamW
    epochs, and after each epoch but the last the codes idle for `dead_code_after` epochs re-seeded."""
    from tokenize_jobs.rqvae import RQVAE

    x = torch.as_tensor(vectors, dtype=torch.float32)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rq_cfg = RQVAEConfig(levels=settings.levels, codebook_size=settings.codebook_size, code_dim=settings.code_dim,
                         hidden=settings.hidden, beta=settings.beta, dead_code_after=settings.dead_code_after)
    progress = {"idle": torch.zeros(settings.levels, settings.codebook_size, dtype=torch.int64)}
    with torch.random.fork_rng(devices=[]):  # the global RNG (weight init) is seeded here and left as it was
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = RQVAE(x.shape[1], rq_cfg)
        model.kmeans_init(x, generator=generator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
        for epoch in range(settings.epochs):
            model.train()
            order = torch.randperm(len(x), generator=generator)
            for lo in range(0, len(x), settings.batch_size):
                loss = model(x[order[lo:lo + settings.batch_size]]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if settings.dead_code_after > 0 and epoch < settings.epochs - 1:
                # without re-seeding, the commitment loss collapses the codebooks onto a few codes
                restart_idle_codes(model, x, model.encode(x).numpy(), progress, "idle", settings.dead_code_after,
                                   seed + epoch)
    return model.eval(), x


def text_only_codes(vectors: np.ndarray, item_ids: np.ndarray, settings: TigerConfig, seed: int) -> np.ndarray:
    """[n, levels + 1] item codes from the text vectors alone; the last level ranks items (by item_id)
    within a shared code, so every item's code is unique. The same inputs and seed give the same codes.

    `vectors` rows belong to `item_ids`; `settings` must have its levels and codebook size set
    (`resolved_settings`). The last level needs as many codes as the largest group of items that
    share their first codes: data-dependent, so the vocabulary is sized from the codes themselves.
    """
    if len(vectors) != len(item_ids):
        raise ValueError(f"text_only_codes: {len(vectors)} vectors for {len(item_ids)} item ids")
    if not len(vectors):
        raise ValueError("text_only_codes: no item vectors (table 'item_semantic' is empty)")
    if settings.levels < 1 or settings.codebook_size < 1:
        raise ValueError(f"text_only_codes: levels and codebook_size must be >= 1, got {settings.levels} and "
                         f"{settings.codebook_size}; resolve train.tiger with resolved_settings")
    model, x = train_text_rqvae(vectors, settings, seed)
    with torch.no_grad():
        codes = model.encode(x).numpy()
    return add_uniqueness_level(codes, np.asarray(item_ids, dtype=np.int64))


def code_stats(codes: np.ndarray) -> dict:
    """What the registry records about the codes: collisions before the uniqueness level and its size."""
    return {"items": int(len(codes)), "scid_levels": int(codes.shape[1]),
            "collision_rate_before_uniqueness": round(collision_rate(codes[:, :-1]), 6),
            "uniqueness_codes": int(codes[:, -1].max()) + 1}


def item_scid_frame(item_ids: np.ndarray, codes: np.ndarray, version: str) -> pd.DataFrame:
    """The code map in the `item_scid` schema (item_id, codes, scid, tokenizer_version), by item_id."""
    order = np.argsort(item_ids, kind="stable")
    ids, codes = np.asarray(item_ids, dtype=np.int64)[order], np.asarray(codes, dtype=np.int64)[order]
    return pd.DataFrame({"item_id": ids, "codes": [row.astype(np.int32).tolist() for row in codes],
                         "scid": [format_scid(row, "item") for row in codes], "tokenizer_version": version})


def tiger_examples(interactions: pd.DataFrame, codes_by_item, max_history: int,
                   max_per_user: int = 0) -> pd.DataFrame:
    """SEQ rows in the `sft_examples` schema with the item-only prompt, from the train and valid interactions.

    interactions: user_id, item_id, position, split; rows of other splits (test) are ignored.
    codes_by_item: item_id -> item SCID string. Per user (training items ordered by position):
    one 'train' row per training position i >= 1 (history: training items before it, the last
    `max_history`; response: item i's SCID) -- the most recent `max_per_user` positions when it is
    > 0, as train.instructions.max_seq_per_user does for `sft` -- and one 'valid' row (history:
    the last `max_history` training items; response: the valid item). example_id is
    `seq:<user>:<position>`, as in sft_examples.
    """
    scid_of = pd.Series(codes_by_item) if not isinstance(codes_by_item, pd.Series) else codes_by_item
    known = interactions[interactions["split"].isin(("train", "valid"))]
    missing = np.setdiff1d(known["item_id"].to_numpy(np.int64), scid_of.index.to_numpy(np.int64))
    if len(missing):
        raise KeyError(f"tiger_examples: {len(missing)} item(s) of table 'interactions' have no text-only code "
                       f"(no row in 'item_semantic'), e.g. item_id {missing[:5].tolist()}")
    rows = []

    def add(user: int, position: int, history: list[int], target: int, split: str) -> None:
        rows.append({"example_id": f"seq:{user}:{position}", "task": "seq", "template": 0, "user_id": user,
                     "prompt": item_seq_prompt([scid_of[i] for i in history]), "response": scid_of[target],
                     "target_item": target, "item_ids": list(dict.fromkeys(history + [target])), "split": split})

    for user, events in known.sort_values(["user_id", "position"]).groupby("user_id", sort=True):
        user = int(user)
        train = events[events["split"] == "train"]
        items, positions = train["item_id"].astype("int64").tolist(), train["position"].astype("int64").tolist()
        first = 1 if max_per_user <= 0 else max(1, len(items) - max_per_user)
        for i in range(first, len(items)):
            add(user, positions[i], items[max(0, i - max_history):i], items[i], "train")
        valid = events[events["split"] == "valid"]
        if len(valid) and items:
            add(user, int(valid["position"].iloc[-1]), items[max(0, len(items) - max_history):],
                int(valid["item_id"].iloc[-1]), "valid")
    frame = pd.DataFrame(rows, columns=["example_id", "task", "template", "user_id", "prompt", "response",
                                        "target_item", "item_ids", "split"])
    frame["target_item"] = frame["target_item"].astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------
# The job shell

def settings_of(cfg: PipelineConfig) -> dict:
    """Everything that changes the baseline: the SFT settings (same backbone, same schedule) and its own."""
    return {**sft.settings_of(cfg), "tiger": dataclasses.asdict(resolved_settings(cfg)),
            "max_history": cfg.etl.max_history, "max_seq_per_user": cfg.train.instructions.max_seq_per_user}


def read_inputs(job: JobRun) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(item ids, their semantic vectors, train/valid interactions) at the versions the run record names."""
    versions = job.record.inputs
    semantic = job.lake.read_arrow("item_semantic", version=versions["table:item_semantic"],
                                   columns=["item_id", "vector"])
    item_ids, vectors = sorted_vectors(semantic, "item_id", "vector", "item_semantic")
    interactions = job.lake.read_pandas("interactions", version=versions["table:interactions"],
                                        columns=["user_id", "item_id", "position", "split"])
    return item_ids, vectors, interactions[interactions["split"].isin(("train", "valid"))]


def write_parquet(frame: pd.DataFrame, path: Path, table: str | None = None) -> Path:
    """Write atomically (a temp file renamed); `table` conforms the columns to that catalogue schema."""
    from a3gr.catalog import spec
    from a3gr.lake import conform_arrow

    data = pa.Table.from_pandas(frame, preserve_index=False)
    if table:
        data = conform_arrow(data, spec(table).schema, table)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(data, tmp)
    tmp.rename(path)
    return path


def item_code_map(directory: Path, item_ids: np.ndarray, vectors: np.ndarray, settings: TigerConfig,
                  seed: int) -> pd.DataFrame:
    """The run's item code map: trained once per run directory, then read back (a resumed run keeps its codes)."""
    from expectations.runner import require_valid

    path = directory / ITEM_CODES_FILE
    if path.exists():
        return pd.read_parquet(path)
    log.info("tiger: RQ-VAE (%d levels x %d codes) on %d item text vectors of size %d, %d epochs",
             settings.levels, settings.codebook_size, len(item_ids), vectors.shape[1], settings.epochs)
    codes = text_only_codes(vectors, item_ids, settings, seed)
    frame = item_scid_frame(item_ids, codes, f"{JOB}/{directory.name}")
    require_valid("item_scid", frame, {"scid_levels": codes.shape[1]})  # unique, well-formed SCIDs
    directory.mkdir(parents=True, exist_ok=True)
    write_parquet(frame, path, "item_scid")
    return pd.read_parquet(path)


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Train (or resume) the TIGER-style baseline and register it as `tiger`; a skip when disabled."""
    from training.common import item_codes

    settings = settings_of(cfg)
    if not cfg.train.tiger.enabled:
        return skipped_run(JOB, cfg, "train.tiger.enabled is false: no TIGER baseline trained", settings)
    tiger = resolved_settings(cfg)
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=settings, force=force) as job:
        if job.up_to_date:
            return job.record
        torch.set_num_threads(cfg.train.torch_threads)
        directory = sft.run_dir(cfg, sft.run_key(settings, job.record.inputs), JOB)
        item_ids, vectors, interactions = read_inputs(job)
        item_scid = item_code_map(directory, item_ids, vectors, tiger, cfg.seed)
        stats = code_stats(item_codes(item_scid)[1])
        examples = tiger_examples(interactions, item_scid.set_index("item_id")["scid"], cfg.etl.max_history,
                                  cfg.train.instructions.max_seq_per_user)
        write_parquet(examples, directory / EXAMPLES_FILE, "sft_examples")
        log.info("tiger: %d items (%.1f%% sharing their first %d codes, %d uniqueness codes), %d training and "
                 "%d validation examples", stats["items"], 100 * stats["collision_rate_before_uniqueness"],
                 tiger.levels, stats["uniqueness_codes"], int((examples["split"] == "train").sum()),
                 int((examples["split"] == "valid").sum()))
        build_initial_model(cfg, {"sft_examples": examples, "item_scid": item_scid, "user_scid": None},
                            directory / "init")
        state = sft.fit(cfg, directory, {"table_files": {"sft_examples": str(directory / EXAMPLES_FILE),
                                                         "item_scid": str(directory / ITEM_CODES_FILE)}}, JOB)
        if (directory / "best").exists():
            write_parquet(item_scid, directory / "best" / ITEM_CODES_FILE, "item_scid")
        sft.register_best(job, JOB, directory, state, metrics=stats)
    return job.record


if __name__ == "__main__":
    job_main(run)
