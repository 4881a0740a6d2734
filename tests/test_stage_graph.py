"""The stage graph derived from a3gr.pipeline.STAGES: dependencies, engines, nightly/retrain split."""
from __future__ import annotations

import pytest

from a3gr.pipeline import STAGES
from a3gr.stage_graph import (MODEL_LINES_READ, MODEL_WRITERS, NIGHTLY_STAGES, RETRAIN_STAGES, downstream,
                              stage_dependencies, stage_kind)

# The graph as the tables imply it today; a change to STAGES that moves an edge shows up here.
EXPECTED = {
    "ingest": set(),
    "interactions": {"ingest"},
    "feedback": {"ingest", "interactions"},
    "features": {"ingest", "interactions", "feedback"},
    "semantic": {"features"},
    "collaborative": {"interactions", "features"},
    "train_tokenizer": {"semantic", "collaborative", "interactions"},
    "assign_scid": {"train_tokenizer", "features"},
    "instructions": {"interactions", "features", "assign_scid"},
    "sft": {"instructions", "assign_scid"},
    "preferences": {"instructions", "assign_scid", "feedback", "sft"},
    "dpo": {"preferences", "instructions", "assign_scid", "sft"},
    "tiger": {"semantic", "interactions"},
    "infer": {"features", "assign_scid", "dpo"},  # the served policy only, never the baseline
    "evaluate": {"features", "assign_scid", "interactions", "dpo", "tiger"},
}


def test_dependencies_of_the_pipeline():
    assert stage_dependencies() == EXPECTED


def test_every_dependency_runs_earlier():
    order = list(STAGES)
    for stage, ups in stage_dependencies().items():
        assert all(order.index(u) < order.index(stage) for u in ups), stage


def test_latest_earlier_writer_wins_and_external_tables_are_ignored():
    stages = {
        "a": ("etl.a", ("external",), ("t",)),
        "b": ("etl.b", ("t",), ("t",)),           # rewrites t: later readers depend on b, not a
        "c": ("tokenize_jobs.c", ("t", "u"), ("u",)),  # reads u before anyone wrote it: no edge
    }
    assert stage_dependencies(stages) == {"a": set(), "b": {"a"}, "c": {"b"}}


def test_models_counts_as_written_by_the_recommenders_per_model_line():
    assert MODEL_WRITERS == {"sft": "policy", "dpo": "policy", "tiger": "tiger"}
    assert MODEL_LINES_READ == {"evaluate": ("policy", "tiger")}
    stages = {
        "tok": ("tokenize_jobs.tok", (), ("emb", "models")),  # registers an artifact, not a policy
        "assign": ("tokenize_jobs.assign", ("emb", "models"), ("scid",)),
        "sft": ("training.sft", ("scid",), ("models",)),
        "dpo": ("training.dpo", ("models",), ("models",)),
        "tiger": ("training.tiger", ("emb",), ("models",)),  # registered after dpo, on its own line
        "infer": ("batch_infer.infer", ("scid", "models"), ("recs",)),
        "evaluate": ("batch_infer.evaluate", ("scid", "models"), ("metrics",)),
    }
    deps = stage_dependencies(stages)
    assert deps["assign"] == {"tok"}  # through emb only
    assert deps["dpo"] == {"sft"}
    assert deps["tiger"] == {"tok"}  # not the policies: the baseline trains apart from them
    assert deps["infer"] == {"assign", "dpo"}  # the final policy, not sft, and not the later tiger
    assert deps["evaluate"] == {"assign", "dpo", "tiger"}  # every line it compares


def test_stage_kind_by_package():
    assert {s for s in STAGES if stage_kind(s) == "spark"} == {"ingest", "interactions", "feedback", "features",
                                                              "instructions"}
    assert stage_kind("sft") == "ray" and stage_kind("infer") == "ray" and stage_kind("semantic") == "ray"
    with pytest.raises(ValueError, match="package 'serving'"):
        stage_kind("x", {"x": ("serving.x", (), ())})


def test_downstream_is_transitive():
    assert downstream("evaluate") == set()
    assert downstream("ingest") == set(STAGES) - {"ingest"}
    assert downstream("dpo") == {"infer", "evaluate"}
    assert downstream("tiger") == {"evaluate"}
    assert downstream("semantic") == {"train_tokenizer", "assign_scid", "instructions", "sft", "preferences",
                                      "dpo", "tiger", "infer", "evaluate"}
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        downstream("nope")


def test_nightly_and_retrain_stages_split_the_pipeline():
    assert set(NIGHTLY_STAGES) | set(RETRAIN_STAGES) == set(STAGES)
    assert not set(NIGHTLY_STAGES) & set(RETRAIN_STAGES)
    assert RETRAIN_STAGES == ("semantic", "collaborative", "train_tokenizer", "assign_scid", "instructions", "sft",
                              "preferences", "dpo", "tiger")
