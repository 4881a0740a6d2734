"""Features: silver tables -> items, users (profile text) and the gold item_features / user_features.

Everything a user's profile or history holds comes from the training split only; the
expectation suites check that no held-out item leaks in.
Run as `a3gr etl features` or `spark-submit etl/features.py --config ...`.
"""
from __future__ import annotations

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord
from a3gr.spark import get_spark
from a3gr.spark_delta import read_df
from etl.transforms import build_item_features, build_items, build_user_features, build_users

INPUTS = ["interactions", "raw_items", "raw_interactions", "id_map", "feedback"]


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    sections = {"max_history": cfg.etl.max_history, "max_text_chars": cfg.etl.max_text_chars}
    with JobRun("features", cfg, input_tables=INPUTS, config_sections=sections, force=force) as job:
        if job.up_to_date:
            return job.record
        spark = spark or get_spark(cfg)
        t = {name: read_df(spark, job.lake, name, engine=cfg.lake.engine) for name in INPUTS}
        items = build_items(t["interactions"], t["raw_items"], t["raw_interactions"], t["id_map"], cfg.etl)
        job.publish("items", items)
        items = read_df(spark, job.lake, "items", engine=cfg.lake.engine)
        users = build_users(t["interactions"], items, t["feedback"], t["raw_interactions"], t["id_map"], cfg.etl)
        heldout = t["interactions"].where("split != 'train'").select("user_id", "item_id").toPandas()
        job.publish("users", users, context={"heldout": heldout})
        job.publish("item_features", build_item_features(items, t["interactions"], t["feedback"]))
        job.publish("user_features", build_user_features(t["interactions"], cfg.etl.max_history),
                    context={"max_history": cfg.etl.max_history})
    return job.record


if __name__ == "__main__":
    job_main(run)
