"""SFT then progressive Softmax-DPO on one dataset, without Ray or a lake: validation Recall@10 after each.

The same loops as the `sft`, `preferences` and `dpo` jobs (training/*_loop.py, training/candidates.py),
driven from parquet snapshots of their input tables, so the run can go to any machine with torch
(e.g. a GPU box without Spark, Ray or delta-rs):

    python bench/align.py --export LAKE --tables DIR        # snapshot the input tables of LAKE
    python bench/align.py --tables DIR --config configs/paper.yaml --out OUT [--set key=value ...]

Prints SFT's validation Recall@10 / NDCG@10 and each DPO stage's, on the same validation users,
with training times, and for each DPO stage a paired comparison with SFT (users only one of the two
hits at 10, and the exact McNemar p-value of that split); writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from a3gr.config import load_config  # noqa: E402

TABLES = ("sft_examples", "item_scid", "user_scid", "feedback")
COLUMNS = {"feedback": ["user_id", "item_id", "split", "label"]}
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def validation_hits(model_dir: Path, eval_set, item_matrix, cfg, device):
    """Per-user hit@10 of a saved model on the validation users (the jobs' validation search)."""
    from batch_infer.beam import TokenTrie
    from batch_infer.metrics import rank_of_target
    from training.backbone import load_backbone
    from training.common import validation_top

    model, tokenizer = load_backbone(model_dir)
    model.to(device)
    top = validation_top(model, TokenTrie(item_matrix), eval_set, tokenizer.pad_token_id, cfg.train.sft.val_beam,
                         device)
    ranks = rank_of_target(top, eval_set.target_rows)
    return (ranks > 0) & (ranks <= 10)


def mcnemar(base_hits, new_hits) -> dict:
    """Paired comparison on the same users: wins, losses and the exact two-sided McNemar p-value."""
    wins, losses = int((new_hits & ~base_hits).sum()), int((base_hits & ~new_hits).sum())
    n, low = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0
    return {"wins": wins, "losses": losses, "p_value": p}


def export(lake_root: str, directory: Path) -> None:
    from a3gr.lake import Lake

    lake = Lake(lake_root)
    directory.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        frame = lake.read_pandas(name, columns=COLUMNS.get(name))
        frame.to_parquet(directory / f"{name}.parquet", compression="zstd")
        print(f"{name}: {len(frame)} rows -> {directory / f'{name}.parquet'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", required=True, type=Path, help="directory of <table>.parquet snapshots")
    parser.add_argument("--export", metavar="LAKE", help="write the snapshots of this lake and exit")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("align_out"))
    parser.add_argument("--reuse", action="store_true",
                        help="reuse OUT's SFT model and preference rows from an earlier run (DPO variants only)")
    parser.add_argument("--dpo-variant", action="append", default=[], metavar="K=V[,K=V...]",
                        help="also run DPO with these extra overrides (repeatable), from the same SFT model and pairs")
    args = parser.parse_args()
    if args.export:
        export(args.export, args.tables)
        return

    from training import dpo_loop, sft_loop
    from training.backbone import load_backbone
    from training.candidates import build_preference_pairs
    from training.common import pick_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.set)
    torch.set_num_threads(cfg.train.torch_threads)
    device = pick_device(cfg.train.use_gpu)
    tables = {name: pd.read_parquet(args.tables / f"{name}.parquet") for name in TABLES}
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device {device}; {len(tables['sft_examples'])} instruction rows, {len(tables['item_scid'])} items")

    t0 = time.perf_counter()
    saved_sft, saved_pairs = args.out / "sft_result.json", args.out / "preference_pairs.parquet"
    if args.reuse and saved_sft.exists():
        sft = json.loads(saved_sft.read_text())
    else:
        sft = sft_loop.run_local(cfg, tables, args.out / "sft", device)
        saved_sft.write_text(json.dumps(sft, default=str))
    sft_seconds = time.perf_counter() - t0
    best = sft["best"]
    print(f"SFT: {sft['step']} steps in {sft_seconds:.0f}s; best val R@10 {best.get('recall@10')} "
          f"N@10 {best.get('ndcg@10')} at step {best.get('step')}")

    t1 = time.perf_counter()
    model, tokenizer = load_backbone(args.out / "sft" / "best")
    model.to(device)
    if args.reuse and saved_pairs.exists():
        pairs, stats = pd.read_parquet(saved_pairs), {}
    else:
        pairs, stats = build_preference_pairs(tables["sft_examples"], tables["item_scid"], tables["feedback"], model,
                                              tokenizer, cfg, "sft/best", device)
        pairs.to_parquet(saved_pairs)
    pref_seconds = time.perf_counter() - t1
    print(f"preference rows: {pairs['stage'].value_counts().sort_index().to_dict()} in {pref_seconds:.0f}s; {stats}")

    from training.backbone import item_token_matrix
    from training.common import eval_set_from, item_codes

    item_ids, codes = item_codes(tables["item_scid"])
    item_matrix = item_token_matrix(tokenizer, codes)
    eval_set = eval_set_from(tables["sft_examples"], tokenizer, item_ids, cfg.train.backbone.max_seq_len,
                             cfg.train.sft.val_users, cfg.seed)
    sft_hits = validation_hits(args.out / "sft" / "best", eval_set, item_matrix, cfg, device)
    print(f"SFT on {len(sft_hits)} validation users: R@10 {sft_hits.mean():.4f}")
    rows = [{"model": "sft", **{k: best.get(k) for k in METRICS}, "seconds": round(sft_seconds),
             "val_users": len(sft_hits), "hits@10": int(sft_hits.sum())}]
    variants = [("", cfg)] + [(v, load_config(args.config, args.set + v.split(","))) for v in args.dpo_variant]
    if args.reuse:  # only the variants: the default one ran with the SFT model
        variants = variants[1:]
    all_stages = {}
    for number, (label, variant_cfg) in enumerate(variants):
        t2 = time.perf_counter()
        stages = dpo_loop.run_local(variant_cfg, args.out / "sft" / "best", {**tables, "preference_pairs": pairs},
                                    args.out / f"dpo-{label or 'default'}".replace("=", "-").replace(",", "_"), device)
        all_stages[label or "default"] = stages
        for s in stages:
            paired = {}
            if not s["metrics"].get("skipped"):
                hits = validation_hits(Path(s["model"]), eval_set, item_matrix, cfg, device)
                paired = {"hits@10": int(hits.sum()), **mcnemar(sft_hits, hits)}
            rows.append({"model": f"dpo{'[' + label + ']' if label else ''}:{s['stage']}",
                         **{k: s["metrics"].get(k) for k in METRICS}, "seconds": s["metrics"].get("seconds"),
                         **paired})
        print(f"DPO {label or 'default'}: {time.perf_counter() - t2:.0f}s")
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"times: SFT {sft_seconds:.0f}s, preference table {pref_seconds:.0f}s; validation users {best.get('val_users')}")
    results = {"device": str(device), "sft": sft, "dpo": all_stages, "table": rows, "stats": stats,
               "seconds": {"sft": sft_seconds, "preferences": pref_seconds}}
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
