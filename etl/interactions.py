"""Interactions: raw_interactions -> id_map + interactions (dedupe, k-core, stable ids, leave-one-out).

Run as `a3gr etl interactions` or `spark-submit etl/interactions.py --config ...`.
"""
from __future__ import annotations

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord
from a3gr.spark import get_spark
from a3gr.spark_delta import read_df
from etl.transforms import build_interactions


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    sections = {"k_core": cfg.etl.k_core}
    with JobRun("interactions", cfg, input_tables=["raw_interactions"], config_sections=sections,
                force=force) as job:
        if job.up_to_date:
            return job.record
        spark = spark or get_spark(cfg)
        engine = cfg.lake.engine
        raw = read_df(spark, job.lake, "raw_interactions", engine=engine)
        # The id map is this job's own state: existing keys keep their ids across runs.
        existing = read_df(spark, job.lake, "id_map", engine=engine) if job.lake.exists("id_map") else None
        interactions, id_map = build_interactions(raw, existing, cfg.etl.k_core)
        job.publish("id_map", id_map)
        job.publish("interactions", interactions)
    return job.record


if __name__ == "__main__":
    job_main(run)
