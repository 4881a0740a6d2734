"""Feedback labels: interactions + raw reviews -> feedback (disliked / neutral / liked, with the labeler).

Ratings map by the configured thresholds; text-only interactions are scored by VADER.
Run as `a3gr etl feedback` or `spark-submit etl/feedback.py --config ...`.
"""
from __future__ import annotations

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord
from a3gr.spark import get_spark
from a3gr.spark_delta import read_df
from etl.transforms import build_feedback

INPUTS = ["interactions", "raw_interactions", "id_map"]


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    e = cfg.etl
    sections = {"disliked_max_rating": e.disliked_max_rating, "neutral_max_rating": e.neutral_max_rating,
                "sentiment_disliked_below": e.sentiment_disliked_below,
                "sentiment_liked_above": e.sentiment_liked_above}
    with JobRun("feedback", cfg, input_tables=INPUTS, config_sections=sections, force=force) as job:
        if job.up_to_date:
            return job.record
        spark = spark or get_spark(cfg)
        tables = {t: read_df(spark, job.lake, t, engine=cfg.lake.engine) for t in INPUTS}
        feedback = build_feedback(tables["interactions"], tables["raw_interactions"], tables["id_map"], cfg.etl)
        job.publish("feedback", feedback)
    return job.record


if __name__ == "__main__":
    job_main(run)
