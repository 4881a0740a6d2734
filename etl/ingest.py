"""Ingest: raw source files -> bronze tables (raw_interactions, raw_items, raw_users, quarantine).

Run as `a3gr etl ingest --config configs/embedded.yaml` or
`spark-submit etl/ingest.py --config configs/embedded.yaml`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord
from a3gr.spark import get_spark
from etl.sources import BronzeFrames, read_amazon, read_lcrec
from etl.synthetic import generate_synthetic

OUTPUTS = ("raw_interactions", "raw_items", "raw_users", "quarantine")


def source_files(cfg: PipelineConfig) -> dict[str, str]:
    """The raw files this source reads (the synthetic ones are generated first, deterministically)."""
    src = cfg.source
    if src.kind == "synthetic":
        out_dir = src.synthetic.out_dir or f"{cfg.lake.root.rstrip('/')}/_raw/synthetic"
        return generate_synthetic(out_dir, src.synthetic, cfg.seed)
    if src.kind == "amazon":
        if not src.reviews_path:
            raise ValueError("source.kind=amazon needs source.reviews_path")
        return {"reviews_path": src.reviews_path, "meta_path": src.meta_path}
    if src.kind == "lcrec":
        base = Path(src.lcrec_dir) / src.lcrec_name
        files = {kind: f"{base}.{kind}" for kind in ("inter.json", "item2id", "user2id")}
        if Path(f"{base}.item.json").exists():
            files["item.json"] = f"{base}.item.json"
        return files | {"reviews_path": src.reviews_path, "meta_path": src.meta_path}
    raise ValueError(f"unknown source.kind {src.kind!r}; expected synthetic, amazon or lcrec")


def extract(spark, cfg: PipelineConfig, files: dict[str, str], run_id: str) -> BronzeFrames:
    src = cfg.source
    if src.kind == "lcrec":
        return read_lcrec(spark, src.lcrec_dir, src.lcrec_name, run_id, cfg.etl,
                          reviews_path=src.reviews_path or None, meta_path=src.meta_path or None)
    return read_amazon(spark, files["reviews_path"], files.get("meta_path") or None, run_id, cfg.etl,
                       source=src.kind)


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    files = source_files(cfg)
    sections = {"seed": cfg.seed, "source": dataclasses.asdict(cfg.source), "etl": dataclasses.asdict(cfg.etl)}
    with JobRun("ingest", cfg, input_files=files, config_sections=sections, force=force) as job:
        if job.up_to_date:
            return job.record
        spark = spark or get_spark(cfg)
        bronze = extract(spark, cfg, files, job.run_id)
        for name, value in bronze.counts.items():
            job.count(name, value)
        job.publish("raw_interactions", bronze.interactions)
        job.publish("raw_items", bronze.items)
        job.publish("raw_users", bronze.users)
        job.publish("quarantine", bronze.quarantine)
        bronze.unpersist()
    return job.record


if __name__ == "__main__":
    job_main(run)
