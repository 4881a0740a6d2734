"""SCID assignment: SC vectors -> RQ-VAE codes -> item_scid / user_scid, plus the tokenizer health report.

Items get a 4th code that ranks them (by item_id) within their group of identical 3-level codes,
so every item SCID is unique; users keep their 3 codes and may share an SCID. The report
(codebook usage, collisions, U2I AUC, reconstruction, two PNGs) goes to
<models_dir>/tokenizer/<tokenizer version>/report/.
Run as `ray job submit -- python -m tokenize_jobs.assign_scid --config ...`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.lake import Lake
from a3gr.registry import models_dir, require_model
from a3gr.runs import RunRecord
from a3gr.scid import add_uniqueness_level, format_scid
from tokenize_jobs.report import reconstruction_error, tokenizer_health, write_report

log = logging.getLogger("a3gr.assign_scid")

ENCODE_BATCH = 65536  # rows per RQ-VAE forward pass (bounds memory on large catalogues)
# side (= SCID kind) -> (vectors table, id column, registered RQ-VAE)
SIDES = {"item": ("item_embeddings", "item_id", "item_rqvae"),
         "user": ("user_embeddings", "user_id", "user_rqvae")}


def encode_vectors(model, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n, levels], reconstructions [n, dim]) of the rows of `vectors` under an RQ-VAE."""
    import torch

    model.eval()
    codes, recon = [], []
    with torch.no_grad():
        for start in range(0, len(vectors), ENCODE_BATCH):
            out = model(torch.as_tensor(vectors[start:start + ENCODE_BATCH], dtype=torch.float32))
            codes.append(out.codes.numpy())
            recon.append(out.recon.numpy())
    if not codes:
        return np.zeros((0, model.cfg.levels), dtype=np.int64), np.zeros((0, vectors.shape[1]), dtype=np.float32)
    return np.concatenate(codes), np.concatenate(recon)


def scid_table(id_column: str, ids: np.ndarray, codes: np.ndarray, kind: str, tokenizer_version: str) -> pa.Table:
    """Rows of item_scid / user_scid: id, codes (int32 list), SCID string, tokenizer version."""
    codes = np.asarray(codes, dtype=np.int64)
    return pa.table({
        id_column: pa.array(np.asarray(ids, dtype=np.int64)),
        "codes": pa.array([row.tolist() for row in codes], type=pa.list_(pa.int32())),
        "scid": pa.array([format_scid(row, kind) for row in codes], type=pa.string()),
        "tokenizer_version": pa.array([tokenizer_version] * len(codes), type=pa.string()),
    })


def unique_item_codes(codes: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """[n, L] -> [n, L+1]: the uniqueness level, ranking items by item_id within a shared code."""
    return add_uniqueness_level(codes, np.asarray(item_ids, dtype=np.int64))


def _read_vectors(lake: Lake, table: str, id_column: str, model: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sc vectors) sorted by id; the vectors must come from the run that trained `model`."""
    frame = lake.read_arrow(table, columns=[id_column, "sc", "model_version"])
    versions = set(frame.column("model_version").unique().to_pylist())
    if versions != {model["version"]}:
        raise ValueError(f"table '{table}': sc vectors are from tokenizer run(s) {sorted(versions)}, but the latest "
                         f"'{model['name']}' is version {model['version']}; re-run tokenize_jobs.train_tokenizer")
    return sorted_vectors(frame, id_column, "sc", table)


def sorted_vectors(frame: pa.Table, id_column: str, column: str, table: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 matrix of the list column `column`), sorted by id; vectors of mixed lengths are an error."""
    ids = frame.column(id_column).to_numpy()
    lists = frame.column(column).combine_chunks()
    dims = set(lists.value_lengths().to_numpy().tolist())
    if len(dims) > 1:
        raise ValueError(f"table '{table}': column '{column}' has vectors of several lengths {sorted(dims)}")
    vectors = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), -1)
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def _text_source(lake: Lake, item_ids: np.ndarray) -> np.ndarray:
    """items.text_source per item id ('unknown' for an id the items table lacks)."""
    items = lake.read_pandas("items", columns=["item_id", "text_source"]).set_index("item_id")["text_source"]
    return items.reindex(item_ids).fillna("unknown").to_numpy()


def _history(model_root: Path, run_id: str) -> list[dict]:
    path = model_root / "tokenizer" / run_id / "history.json"
    if not path.exists():
        log.warning("no training history at %s; the report has no loss curves or AUC", path)
        return []
    return json.loads(path.read_text())


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Encode SC vectors with the latest registered RQ-VAEs; publish item_scid (and user_scid when dual)."""
    from tokenize_jobs.rqvae import RQVAE

    lake = Lake.from_config(cfg)
    sides = ["item", "user"] if cfg.tokenize.dual else ["item"]
    models = {side: require_model(lake, SIDES[side][2], "tokenize_jobs.train_tokenizer") for side in sides}
    # The job depends on which RQ-VAE versions are latest, not on the whole models table: reading
    # the table's version would re-run this job (and everything after it) whenever any later stage
    # registers a model.
    sections = {"dual": cfg.tokenize.dual, "models": {SIDES[s][2]: models[s]["version"] for s in sides}}
    input_tables = [SIDES[s][0] for s in sides] + ["items"]
    with JobRun("assign_scid", cfg, input_tables=input_tables, config_sections=sections, force=force,
                lake=lake) as job:
        if job.up_to_date:
            return job.record
        import torch

        torch.set_num_threads(cfg.tokenize.torch_threads)
        codes, recon, ids, sizes = {}, {}, {}, {}
        for side in sides:
            table, id_column, _ = SIDES[side]
            ids[side], vectors = _read_vectors(lake, table, id_column, models[side])
            rq = RQVAE.load(models[side]["path"])
            codes[side], recon_vectors = encode_vectors(rq, vectors)
            recon[side] = reconstruction_error(vectors, recon_vectors)
            sizes[side] = rq.cfg.codebook_size

        model_root = models_dir(cfg)
        version = str(models["item"]["version"])
        history = _history(model_root, str(models["item"]["run_id"]))
        health = tokenizer_health(codes["item"], codes.get("user"), sizes, _text_source(lake, ids["item"]),
                                  history, recon)
        health["tokenizer_version"] = version
        # written before the tables are validated, so a failing suite leaves its evidence behind
        paths = write_report(health, history, model_root / "tokenizer" / version / "report",
                             title=f"Tokenizer health: {version}")

        items, users = health["items"], health["users"]
        job.count("item_codes_shared_before_uniqueness", round(items["collision_rate"] * items["n"]))
        job.count("item_max_group_size", items["max_group_size"])
        item_codes = unique_item_codes(codes["item"], ids["item"])
        job.publish_arrow("item_scid", scid_table("item_id", ids["item"], item_codes, "item", version),
                          context={"expected_row_count": len(item_codes), "scid_levels": item_codes.shape[1]})
        if users:
            job.count("users_sharing_scid", round(users["collision_rate"] * users["n"]))
            job.publish_arrow("user_scid", scid_table("user_id", ids["user"], codes["user"], "user",
                                                      str(models["user"]["version"])),
                              context={"expected_row_count": users["n"], "scid_levels": codes["user"].shape[1]})
        log.info("item SCIDs: %d items, %d distinct before the uniqueness level (collision rate %.4f, largest "
                 "group %d), all distinct after it; user SCIDs: %s; U2I AUC %s; report: %s",
                 items["n"], items["distinct_codes"], items["collision_rate"], items["max_group_size"],
                 f"{users['distinct_codes']} distinct for {users['n']} users (sharing rate "
                 f"{users['collision_rate']:.4f})" if users else "not built (tokenize.dual=false)",
                 health["u2i_auc"]["final"], paths[1])
    return job.record


if __name__ == "__main__":
    job_main(run)
