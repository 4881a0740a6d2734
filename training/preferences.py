"""Preference table (paper level 3 data): one chosen item against N rejected per prompt, by DPO stage.

    sft_examples (training SEQ prompts) + item_scid + feedback + the registered SFT model
      -> constrained beam search over the item trie for each prompt (the model's own candidates)
      -> sp_easy / sp_medium / sp_hard: candidates bucketed by shared SCID prefix with the chosen item
      -> rf_easy / rf_hard: a liked next item against the user's disliked / neutral items
      -> preference_pairs

Prompts are each sampled user's most recent training position (dpo.max_prompts per family), so
the valid and test items never appear. Run as `a3gr train preferences`.
"""
from __future__ import annotations

import logging

import torch

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.registry import require_model
from a3gr.runs import RunRecord
from training.candidates import build_preference_pairs
from training.common import pick_device

log = logging.getLogger("a3gr.preferences")

JOB = "preferences"
INPUTS = ["sft_examples", "item_scid", "feedback"]


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    from a3gr.lake import Lake
    from training.backbone import load_backbone

    lake = Lake.from_config(cfg)
    sft = require_model(lake, "sft", "`a3gr train sft`")
    # depend on the SFT version, not on the models table (later stages register models too)
    sections = {"seed": cfg.seed, "dpo": {k: getattr(cfg.train.dpo, k) for k in
                                          ("stages", "n_rejected", "max_prompts", "candidates", "latest_prompts")},
                "max_seq_len": cfg.train.backbone.max_seq_len, "sft_model": sft["version"]}
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=sections, force=force, lake=lake) as job:
        if job.up_to_date:
            return job.record
        torch.set_num_threads(cfg.train.torch_threads)
        tables = {name: lake.read_pandas(name, version=job.record.inputs[f"table:{name}"]) for name in INPUTS}
        device = pick_device(cfg.train.use_gpu)
        model, tokenizer = load_backbone(sft["path"])
        model.to(device)
        pairs, stats = build_preference_pairs(tables["sft_examples"], tables["item_scid"], tables["feedback"],
                                              model, tokenizer, cfg, f"sft/{sft['version']}", device)
        for stage, counts in stats.items():
            for name, value in counts.items():
                job.count(f"{stage}.{name}", int(value))
        log.info("preferences: %s", ", ".join(f"{s}={n}" for s, n in pairs["stage"].value_counts().sort_index()
                                              .items()))
        job.publish_arrow("preference_pairs", pairs, context={"n_rejected": cfg.train.dpo.n_rejected})
    return job.record


if __name__ == "__main__":
    job_main(run)
