"""Instructions: interactions, items, users and SCIDs -> the multi-task SFT table `sft_examples`.

The suite checks that no train example mentions a user's valid or test item and that no example
mentions a test item. Run as `a3gr train instructions` or `spark-submit etl/instructions.py --config ...`.
"""
from __future__ import annotations

import dataclasses

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.runs import RunRecord
from a3gr.spark import get_spark
from a3gr.spark_delta import read_df
from etl.instruction_tasks import build_sft_examples

INPUTS = ["interactions", "items", "users", "item_scid", "user_scid"]


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    icfg = cfg.train.instructions
    sections = {"instructions": dataclasses.asdict(icfg), "max_history": cfg.etl.max_history, "seed": cfg.seed}
    with JobRun("instructions", cfg, input_tables=INPUTS, config_sections=sections, force=force) as job:
        if job.up_to_date:
            return job.record
        spark = spark or get_spark(cfg)
        t = {name: read_df(spark, job.lake, name, engine=cfg.lake.engine) for name in INPUTS}
        examples = build_sft_examples(t["interactions"], t["items"], t["users"], t["item_scid"], t["user_scid"],
                                      icfg, cfg.etl.max_history, cfg.seed)
        heldout = t["interactions"].where("split != 'train'").select("user_id", "item_id", "split").toPandas()
        job.publish("sft_examples", examples,
                    context={"heldout": heldout, "scid_levels": cfg.tokenize.item_rq.levels + 1})
    return job.record


if __name__ == "__main__":
    job_main(run)
