"""Validate a stored table on demand (`a3gr validate`), with the context its suite needs."""
from __future__ import annotations

from a3gr.config import PipelineConfig
from a3gr.lake import Lake
from a3gr.runs import list_runs


def validation_context(lake: Lake, cfg: PipelineConfig, table: str, version: int) -> dict:
    """Facts from other tables and from the run record that the table's suite checks against."""
    context: dict = {"max_history": cfg.etl.max_history}
    tok = cfg.tokenize
    if table in ("item_collab", "user_collab"):
        context["vector_dims"] = {"vector": tok.collaborative.dim}
    if table in ("item_scid", "user_scid", "sft_examples"):
        context["scid_levels"] = tok.user_rq.levels if table == "user_scid" else tok.item_rq.levels + 1
    if table in ("users", "sft_examples") and lake.exists("interactions"):
        inter = lake.read_pandas("interactions", columns=["user_id", "item_id", "split"])
        context["heldout"] = inter.loc[inter["split"] != "train", ["user_id", "item_id", "split"]]
    if table == "preference_pairs":
        context["n_rejected"] = cfg.train.dpo.n_rejected
    if table == "recommendations":
        context["top_k"] = cfg.infer.top_k
        if lake.exists("item_scid"):
            items = lake.read_pandas("item_scid", columns=["item_id", "scid"])
            context["item_ids"], context["item_scids"] = items["item_id"].to_numpy(), items["scid"].to_numpy()
    # Row-count reconciliation: the run that wrote this version recorded how many rows it wrote.
    for record in list_runs(lake):
        if record.status == "succeeded" and record.outputs.get(table) == version and table in record.row_counts:
            context["expected_row_count"] = record.row_counts[table]
            break
    return context


def validate_stored(lake: Lake, cfg: PipelineConfig, table: str, version: int | None = None):
    from expectations.runner import validate_table

    version = lake.version(table) if version is None else version
    frame = lake.read_pandas(table, version=version)
    return validate_table(table, frame, validation_context(lake, cfg, table, version))
