"""Nightly batch inference: the top-K items of every user, one `recommendations` partition per run date.

    user_features + user_scid + item_scid + the served model (infer.model, else 'sft')
      -> SEQ prompt per user (history = training items + valid + test, last max_history)
      -> trie-constrained beam search on a Ray Data actor pool (one engine per actor)
      -> staged batch files -> validated -> recommendations[run_date] replaced in ONE Delta transaction

Atomic: readers see the previous night's partition or the complete new one (a predicate overwrite
of that partition only, `Lake.replace_partition`); other dates stay untouched.
Resumable: each finished batch of `infer.batch_size` users is staged as
<lake root>/_staging/recommendations/<run_date>/<model>-<key>/batch-XXXXX.parquet (temp file, then
rename). The key hashes the model, input versions and settings, so a restarted run reuses exactly
the batches a killed run finished and computes only the rest; the staging folder goes after the commit.
One run per date at a time: a run drops the staged batches of its date that other keys left behind.
Users: 'all', or 'active': only users whose user_features row or user SCID changed since the last
successful run (or are new); the others keep that run's rows, copied into the new partition, so every
partition is a complete night. Everyone is recomputed when the model, the item catalogue or a setting
that changes results differs from that run's.
Run as `a3gr infer` or `ray job submit -- python -m batch_infer.infer --config ...`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import signal
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from tqdm import tqdm

from a3gr.config import PipelineConfig, config_to_dict
from a3gr.jobs import JobRun, job_main
from a3gr.lake import Lake
from a3gr.runs import RunRecord, last_succeeded
from batch_infer.engines import build_prompts, load_tokenizer

log = logging.getLogger("a3gr.infer")

JOB = "infer"
TABLE = "recommendations"
INPUTS = ["user_features", "user_scid", "item_scid"]
FAILPOINT_ENV = "A3GR_FAILPOINT"  # kill_after_batch:N SIGKILLs the driver right after staging its N-th batch
USER_MODES = ("all", "active")
ROW_TYPES = {"user_id": "int64", "rank": "int32", "item_id": "int64", "scid": object, "score": "float64",
             "model_version": object}
ROW_COLUMNS = list(ROW_TYPES)
LOG_EVERY_S = 30.0


def resolve_run_date(value: str) -> date:
    """infer.run_date as a real date (YYYY-MM-DD), or today in UTC when empty."""
    if not value:
        return datetime.now(timezone.utc).date()
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"infer.run_date must be a date YYYY-MM-DD (or empty for today, UTC), got {value!r}") from None


def validation_recall(model: dict) -> tuple[float | None, int | None]:
    """(validation Recall@10, validation users) a training job registered with a model, where it did."""
    metrics = json.loads(model.get("metrics") or "{}")
    recall, users = metrics.get("recall@10"), metrics.get("val_users")
    return (float(recall) if recall is not None else None), (int(users) if users is not None else None)


def promotion_check(name: str, model: dict, baseline: dict) -> str | None:
    """Why `model` must not replace `baseline` (the SFT policy), or None when it may.

    Both validation figures come from the training jobs' constrained search on the same seeded
    validation users; where one is missing or the user counts differ there is nothing to compare,
    and the configured model is served.
    """
    recall, users = validation_recall(model)
    base_recall, base_users = validation_recall(baseline)
    if recall is None or base_recall is None or users != base_users:
        log.warning("infer: promotion gate cannot compare %s/%s with sft/%s (validation Recall@10 %s on %s users "
                    "vs %s on %s); serving %s", name, model["version"], baseline["version"], recall, users,
                    base_recall, base_users, name)
        return None
    if recall < base_recall:
        return (f"{name}/{model['version']} validation Recall@10 {recall:.4f} < sft/{baseline['version']} "
                f"{base_recall:.4f} on the same {users} users")
    return None


def resolve_model(lake: Lake, name: str, promotion_gate: bool = False) -> tuple[str, dict]:
    """(name, registry row) of the model to serve: `name`, else the latest 'sft'.

    With `promotion_gate`, `name` is served only if its validation Recall@10 is not below sft's;
    otherwise sft is, and the reason is logged.
    """
    from a3gr.registry import ITEM_CODES_FILE, latest_model

    for candidate in dict.fromkeys([name, "sft"]):
        model = latest_model(lake, candidate)
        if model is not None:
            if (Path(model["path"]) / ITEM_CODES_FILE).exists():
                raise ValueError(f"infer.model '{candidate}' carries its own item codes ({ITEM_CODES_FILE}: an "
                                 "evaluation baseline such as tiger), while the nightly run serves over table "
                                 "'item_scid'; set infer.model to a policy (dpo, sft)")
            if candidate != name:
                log.warning("infer: no '%s' model registered; serving '%s' version %s", name, candidate,
                            model["version"])
            elif promotion_gate and candidate != "sft" and (baseline := latest_model(lake, "sft")) is not None:
                why_not = promotion_check(candidate, model, baseline)
                if why_not:
                    log.warning("infer: promotion gate: %s; serving sft/%s instead", why_not, baseline["version"])
                    return "sft", baseline
            return candidate, model
    raise LookupError(f"table 'models' has no '{name}' model and no 'sft' fallback; run `a3gr train sft` "
                      "(and `a3gr train dpo`) first, or set infer.model to a registered name")


def serving_settings(cfg_dict: dict) -> dict:
    """The settings that change the recommendations (from a config dict, so a past run's can be compared)."""
    infer = cfg_dict["infer"]
    return {"engine": infer["engine"], "beam": infer["beam"], "top_k": infer["top_k"],
            "max_history": cfg_dict["etl"]["max_history"], "max_seq_len": cfg_dict["train"]["backbone"]["max_seq_len"]}


def recommendation_rows(user_ids: np.ndarray, items: list[list[int]], scores: list[list[float]],
                        item_ids: np.ndarray, item_scids: np.ndarray, top_k: int, model_version: str) -> pd.DataFrame:
    """Exactly `top_k` rows per user (rank 1..K, best first) from an engine's per-prompt trie rows and scores.

    A user with fewer than `top_k` items (e.g. beams dropped at a dead trie prefix) is an error naming them.
    """
    short = [(int(u), len(i)) for u, i in zip(user_ids, items) if len(i) < top_k]
    if short:
        raise RuntimeError(f"infer: {len(short)} user(s) got fewer than top_k={top_k} items from the engine, e.g. "
                           + ", ".join(f"user_id {u} ({n} items)" for u, n in short[:5])
                           + "; raise infer.beam or check the item trie")
    rows = np.asarray([r[:top_k] for r in items], dtype=np.int64).reshape(len(items), top_k)
    return pd.DataFrame({
        "user_id": np.repeat(np.asarray(user_ids, dtype=np.int64), top_k),
        "rank": np.tile(np.arange(1, top_k + 1, dtype=np.int32), len(items)),
        "item_id": item_ids[rows].ravel(),
        "scid": item_scids[rows].ravel(),
        "score": np.asarray([s[:top_k] for s in scores], dtype=np.float64).ravel(),
        "model_version": model_version,
    })


class Recommender:
    """Ray Data callable class: one engine per actor; batch (batch, user_id, prompt) -> K rows per user."""

    def __init__(self, engine: str, model_dir: str, item_matrix: np.ndarray, item_ids: np.ndarray,
                 item_scids: np.ndarray, beam: int, top_k: int, batch_size: int, max_len: int, model_version: str,
                 use_gpu: bool, torch_threads: int):
        import torch

        from batch_infer.engines import make_engine

        torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = make_engine(engine, model_dir, item_matrix, beam, top_k, batch_size, device)
        self.item_ids, self.item_scids = item_ids, item_scids
        self.top_k, self.max_len, self.model_version = top_k, max_len, model_version

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from batch_infer.engines import encode_prompts

        result = self.engine.search(encode_prompts(self.tokenizer, batch["prompt"], self.max_len))
        rows = recommendation_rows(batch["user_id"].to_numpy(), result.items, result.scores, self.item_ids,
                                   self.item_scids, self.top_k, self.model_version)
        return rows.assign(batch=np.repeat(batch["batch"].to_numpy(np.int64), self.top_k))


class Staging:
    """Finished batches of one run (date, model, inputs, settings) as parquet files under the lake root."""

    def __init__(self, lake_root: str, run_date: date, key: str):
        if "://" in lake_root:
            self.fs, root = pafs.FileSystem.from_uri(lake_root)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(lake_root)
        self.date_dir = f"{root.rstrip('/')}/_staging/{TABLE}/{run_date.isoformat()}"
        self.dir = f"{self.date_dir}/{key}"

    def path(self, batch: int) -> str:
        return f"{self.dir}/batch-{batch:05d}.parquet"

    def drop_stale(self) -> None:
        """Remove staged batches of the same date left by runs with another model, inputs or settings."""
        found = self.fs.get_file_info(pafs.FileSelector(self.date_dir, allow_not_found=True))
        for info in found:
            if info.type == pafs.FileType.Directory and info.path.rstrip("/") != self.dir:
                log.info("infer: removing stale staged batches %s", info.path)
                self.fs.delete_dir(info.path)

    def load(self, batches: list[pd.DataFrame]) -> dict[int, pd.DataFrame]:
        """Staged results of the batches whose files exist, are readable and hold exactly their users."""
        done = {}
        for index, users in enumerate(batches):
            path = self.path(index)
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                continue
            try:
                frame = pq.read_table(path, filesystem=self.fs).to_pandas()
            except Exception as exc:  # unreadable: recompute this batch rather than fail the night
                log.error("infer: staged batch %s cannot be read (%s: %s); recomputing it", path,
                          type(exc).__name__, exc)
                continue
            if set(frame["user_id"]) != set(users["user_id"]):
                log.error("infer: staged batch %s holds other users than batch %d; recomputing it", path, index)
                continue
            done[index] = frame
        return done

    def write(self, batch: int, frame: pd.DataFrame) -> None:
        """Atomic: a temp file renamed into place, so a kill never leaves half a batch."""
        self.fs.create_dir(self.dir, recursive=True)
        tmp = f"{self.dir}/.tmp-batch-{batch:05d}-{os.getpid()}.parquet"
        pq.write_table(pa.Table.from_pandas(frame[ROW_COLUMNS], preserve_index=False), tmp, filesystem=self.fs)
        self.fs.move(tmp, self.path(batch))

    def remove(self) -> None:
        self.fs.delete_dir_contents(self.date_dir, missing_dir_ok=True)
        self.fs.delete_dir(self.date_dir)


def plan_active_users(features: pd.DataFrame, user_scid: pd.DataFrame, previous_features: pd.DataFrame,
                      previous_user_scid: pd.DataFrame, previous_users: np.ndarray) -> np.ndarray:
    """user_ids to recompute: new, changed (history, valid/test item or user SCID) or absent from the last night."""
    def fingerprint(f: pd.DataFrame, s: pd.DataFrame) -> pd.Series:
        scid = pd.Series(s["scid"].to_numpy(), index=s["user_id"].to_numpy())
        return pd.Series([json.dumps([[int(i) for i in h], int(v), int(t), str(scid.get(u))])
                          for u, h, v, t in zip(f["user_id"], f["history"], f["valid_item"], f["test_item"])],
                         index=f["user_id"].to_numpy())

    now, before = fingerprint(features, user_scid), fingerprint(previous_features, previous_user_scid)
    before = before.reindex(now.index)
    changed = before.isna().to_numpy() | (now.to_numpy() != before.to_numpy())
    changed |= ~np.isin(now.index.to_numpy(), previous_users)
    return now.index.to_numpy()[changed]


def _carry_over(lake: Lake, cfg: PipelineConfig, tables: dict, model_version: str) -> tuple[pd.DataFrame, str]:
    """('active' mode) Rows of the last successful run to keep, and why; empty when everyone is recomputed."""
    empty = pd.DataFrame(columns=ROW_COLUMNS)
    previous = last_succeeded(lake, JOB)
    if previous is None or TABLE not in previous.outputs:
        return empty, "everyone is new: no earlier successful run"
    if serving_settings(previous.config) != serving_settings(config_to_dict(cfg)):
        return empty, f"everyone: settings changed since {previous.run_id}"

    def catalogue(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[["item_id", "scid"]].sort_values("item_id").reset_index(drop=True)

    versions = {name: previous.inputs[f"table:{name}"] for name in INPUTS}
    prev_date = date.fromisoformat(previous.config["infer"]["run_date"])
    try:  # time travel to that run's inputs and output
        before = {name: lake.read_pandas(name, version=v) for name, v in versions.items()}
        rows = lake.table(TABLE, previous.outputs[TABLE]).to_pandas(filters=[("run_date", "=", prev_date)])
    except Exception as exc:  # e.g. vacuumed versions: recompute everyone rather than fail the night
        return empty, f"everyone: the inputs of {previous.run_id} cannot be read ({type(exc).__name__}: {exc})"
    if not catalogue(before["item_scid"]).equals(catalogue(tables["item_scid"])):
        return empty, f"everyone: item catalogue changed since {previous.run_id}"
    if rows.empty or (rows["model_version"] != model_version).any():
        return empty, f"everyone: model changed since {previous.run_id}"
    active = plan_active_users(tables["user_features"], tables["user_scid"], before["user_features"],
                               before["user_scid"], rows["user_id"].unique())
    keep = rows["user_id"].isin(tables["user_features"]["user_id"]) & ~rows["user_id"].isin(active)
    return (rows.loc[keep, ROW_COLUMNS].astype(ROW_TYPES).reset_index(drop=True),
            f"the others kept from {prev_date} ({previous.run_id})")


def stream_batches(pending: dict[int, pd.DataFrame], cfg: PipelineConfig, engine_kwargs: dict):
    """(batch index, its K rows per user) as each batch finishes on the Ray Data actor pool, in any order."""
    import ray

    from a3gr.ray_util import ensure_ray

    ensure_ray(cfg)
    inf = cfg.infer
    blocks = [users.assign(batch=index)[["batch", "user_id", "prompt"]] for index, users in pending.items()]
    dataset = ray.data.from_pandas(blocks).map_batches(
        Recommender, fn_constructor_kwargs=engine_kwargs, batch_size=inf.batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=max(1, inf.num_actors)), num_gpus=inf.gpus_per_actor,
        num_cpus=cfg.train.torch_threads)
    parts: dict[int, list[pd.DataFrame]] = {}
    remaining = {index: len(users) for index, users in pending.items()}
    for out in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        for index, rows in out.groupby("batch", sort=False):
            # Ray Data hands back Arrow-backed columns; plain numpy ones keep staged files and the table alike
            parts.setdefault(int(index), []).append(rows[ROW_COLUMNS].astype(ROW_TYPES))
            remaining[int(index)] -= rows["user_id"].nunique()
            if remaining[int(index)] == 0:
                yield int(index), pd.concat(parts.pop(int(index)), ignore_index=True)


def _staging_key(model_name: str, model: dict, sections: dict, inputs: dict, batch_size: int) -> str:
    blob = json.dumps({"sections": sections, "inputs": inputs, "batch_size": batch_size}, sort_keys=True, default=str)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model_name}-{model['version']}")
    return f"{safe}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Recommend top_k items to every (or every active) user and replace the run date's partition."""
    from expectations.runner import require_valid
    from training.backbone import item_token_matrix
    from training.common import item_codes

    inf = cfg.infer
    if inf.users not in USER_MODES:
        raise ValueError(f"infer.users must be one of {USER_MODES}, got {inf.users!r}")
    if not 1 <= inf.top_k <= inf.beam:
        raise ValueError(f"infer: need 1 <= top_k <= beam, got top_k={inf.top_k}, beam={inf.beam}")
    run_date = resolve_run_date(inf.run_date)
    cfg = copy.deepcopy(cfg)
    cfg.infer.run_date = run_date.isoformat()  # the run record then says which night it wrote
    lake = Lake.from_config(cfg)
    model_name, model = resolve_model(lake, inf.model, inf.promotion_gate)
    model_version = f"{model_name}/{model['version']}"
    # depend on the served model's version, not on the models table (training registers other models too)
    sections = {**serving_settings(config_to_dict(cfg)), "run_date": run_date.isoformat(), "users": inf.users,
                "model": model_version}
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=sections, force=force, lake=lake) as job:
        if job.up_to_date:
            return job.record
        tables = {name: lake.read_pandas(name, version=job.record.inputs[f"table:{name}"]) for name in INPUTS}
        item_ids, codes = item_codes(tables["item_scid"])
        item_scids = tables["item_scid"].set_index("item_id").loc[item_ids, "scid"].to_numpy(object)
        if inf.top_k > len(item_ids):
            raise ValueError(f"infer.top_k={inf.top_k} exceeds the {len(item_ids)} items of item_scid: no user can get "
                             "that many distinct items; lower infer.top_k (and infer.beam)")
        item_matrix = item_token_matrix(load_tokenizer(model["path"]), codes)

        carried = pd.DataFrame(columns=ROW_COLUMNS)
        features = tables["user_features"]
        if inf.users == "active":
            carried, source = _carry_over(lake, cfg, tables, model_version)
            features = features[~features["user_id"].isin(carried["user_id"])]
            log.info("infer: active users: %d to recompute, %d kept; %s", len(features),
                     carried["user_id"].nunique(), source)
        prompts = build_prompts(features, tables["user_scid"], tables["item_scid"], "serve", cfg.etl.max_history)
        batches = [prompts.iloc[lo:lo + inf.batch_size] for lo in range(0, len(prompts), inf.batch_size)]

        staging = Staging(cfg.lake.root, run_date,
                          _staging_key(model_name, model, sections, job.record.inputs, inf.batch_size))
        staging.drop_stale()
        results = staging.load(batches)
        pending = {i: b for i, b in enumerate(batches) if i not in results}
        todo_users = sum(len(b) for b in pending.values())
        if results:
            log.info("infer: resuming: %d of %d batches already staged in %s; inferring the other %d users",
                     len(results), len(batches), staging.dir, todo_users)
        log.info("infer: %d users in %d batches of %d on %d actor(s), engine %s, model %s, beam %d, top_k %d -> %s",
                 todo_users, len(pending), inf.batch_size, inf.num_actors, inf.engine, model_version, inf.beam,
                 inf.top_k, run_date)
        job.count("batches_reused", len(results))
        job.count("batches_inferred", len(pending))
        job.count("users_inferred", todo_users)
        job.count("users_carried_over", carried["user_id"].nunique())
        if pending:
            engine_kwargs = {"engine": inf.engine, "model_dir": str(model["path"]), "item_matrix": item_matrix,
                             "item_ids": item_ids, "item_scids": item_scids, "beam": inf.beam, "top_k": inf.top_k,
                             "batch_size": inf.batch_size, "max_len": cfg.train.backbone.max_seq_len,
                             "model_version": model_version, "use_gpu": inf.gpus_per_actor > 0,
                             "torch_threads": cfg.train.torch_threads}
            _infer_pending(pending, results, staging, cfg, engine_kwargs, todo_users)

        parts = ([carried] if len(carried) else []) + [results[i] for i in sorted(results)]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=ROW_COLUMNS)
        frame = frame.sort_values(["user_id", "rank"], kind="stable").reset_index(drop=True)
        frame.insert(0, "run_date", run_date)
        context = {"top_k": inf.top_k, "item_ids": item_ids, "item_scids": item_scids,
                   "expected_row_count": len(tables["user_features"]) * inf.top_k}
        require_valid(TABLE, frame, context)
        version = lake.replace_partition(TABLE, frame, {"run_date": run_date}, run_id=job.run_id)
        job.record.outputs[TABLE] = version
        # the whole table's rows at that version (every night), so `a3gr validate` can reconcile it
        job.record.row_counts[TABLE] = lake.table(TABLE, version).to_pyarrow_dataset().count_rows()
        job.count("partition_rows", len(frame))
        staging.remove()
        log.info("infer: %s v%d: partition run_date=%s replaced with %d rows (%d users x %d)", TABLE, version,
                 run_date, len(frame), frame["user_id"].nunique(), inf.top_k)
    return job.record


def _infer_pending(pending: dict, results: dict, staging: Staging, cfg: PipelineConfig, engine_kwargs: dict,
                   todo_users: int) -> None:
    """Run the pending batches, staging each as it finishes (users/s on a progress bar and in the log)."""
    failpoint = os.environ.get(FAILPOINT_ENV, "")
    kill_after = int(failpoint.split(":")[1]) if failpoint.startswith("kill_after_batch:") else None
    done_users, staged, t0, last_log = 0, 0, time.perf_counter(), time.perf_counter()
    with tqdm(total=todo_users, desc="infer", unit="user", mininterval=5) as bar:
        for index, rows in stream_batches(pending, cfg, engine_kwargs):
            staging.write(index, rows)
            results[index] = rows
            staged += 1
            users = len(pending[index])
            done_users += users
            bar.update(users)
            now = time.perf_counter()
            if now - last_log >= LOG_EVERY_S or staged == len(pending):
                last_log = now
                log.info("infer: %d/%d batches staged, %d/%d users, %.1f users/s (model loading included)", staged,
                         len(pending), done_users, todo_users, done_users / max(now - t0, 1e-9))
            if kill_after is not None and staged == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a kill right after staging a batch


if __name__ == "__main__":
    job_main(run)
