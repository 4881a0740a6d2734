"""Benchmark: dual SCID tokenization on full Instruments (ETL, then semantic -> collaborative ->
train_tokenizer -> assign_scid), median of N runs.

Prints the semantic encoder's throughput (steady-state item texts/s of the job's encoder, and the
semantic job's own rate over items + users), SC encoder + RQ-VAE training time per epoch (the
trainer's per-epoch timings, per phase), wall time per stage, distinct item SCIDs / items, codebook
usage per level and the validation U2I AUC. Needs ../shared/data; one run takes a long time on a
small CPU machine, so --repeats defaults to 1. --lake reads the figures of an already built lake.

    .venv/bin/python bench/tokenizer.py [--repeats 1] [--config configs/paper.yaml] [--set key=value ...]
                                       [--report-dir DIR] [--lake EXISTING_LAKE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("semantic", "collaborative", "train_tokenizer", "assign_scid")


def run_pipeline(config: str, overrides: list[str]) -> float:
    """The whole pipeline (ETL and tokenization) in a fresh process; its wall seconds."""
    cmd = [sys.executable, "-m", "a3gr", "pipeline", "run", "--config", config]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{proc.stdout[-6000:]}")
    return time.perf_counter() - started


def encoder_throughput(cfg, lake) -> dict:
    """Steady-state item embedding rate of the semantic job's encoder (TextEncoder, the job's batch size
    and thread count, one process): every item text once, model load timed apart."""
    from tokenize_jobs.semantic import TextEncoder, resolve_model_dir

    sem = cfg.tokenize.semantic
    texts = lake.read_pandas("items", columns=["text"])["text"].astype(str).tolist()
    t0 = time.perf_counter()
    encoder = TextEncoder(str(resolve_model_dir(cfg)), sem.max_seq_length, cfg.tokenize.torch_threads)
    loaded = time.perf_counter()
    for start in range(0, len(texts), sem.batch_size):
        encoder.encode(texts[start:start + sem.batch_size])
    return {"items": len(texts), "seconds": time.perf_counter() - loaded, "load_s": loaded - t0}


def collect(cfg, lake, keep_report: str | None = None) -> dict:
    """The figures of one run, read back from the lake, its runs table and the model directory.

    keep_report: a folder to copy the run's health report (md, json, PNGs) to.
    """
    import numpy as np

    from a3gr.registry import latest_model, models_dir
    from a3gr.runs import last_succeeded

    runs = {job: last_succeeded(lake, job) for job in STAGES}
    model = latest_model(lake, "item_rqvae")
    history = json.loads((models_dir(cfg) / "tokenizer" / model["run_id"] / "history.json").read_text())
    report_dir = models_dir(cfg) / "tokenizer" / model["version"] / "report"
    health = json.loads((report_dir / "report.json").read_text())
    if keep_report:
        shutil.copytree(report_dir, keep_report, dirs_exist_ok=True)
    scids = lake.read_pandas("item_scid", columns=["scid"])["scid"]
    encoder = encoder_throughput(cfg, lake)
    semantic = runs["semantic"].row_counts
    job_texts = semantic.get("item_semantic_embedded", 0) + semantic.get("user_semantic_embedded", 0)
    per_phase = {phase: [h["train_seconds"] for h in history if h["phase"] == phase] for phase in (1, 2)}
    return {
        "items_per_s": encoder["items"] / encoder["seconds"], "items_embedded": encoder["items"],
        "encoder_load_s": encoder["load_s"],
        "job_texts": job_texts, "job_texts_per_s": job_texts / runs["semantic"].duration_s,
        "epoch_s": {p: float(np.mean(v)) if v else None for p, v in per_phase.items()},
        "epochs": {p: len(v) for p, v in per_phase.items()},
        "job_s_per_epoch": runs["train_tokenizer"].duration_s / max(len(history), 1),
        "stages": {job: record.duration_s for job, record in runs.items()},
        "distinct_scids": int(scids.nunique()), "items": int(len(scids)),
        "health": health,
    }


def spread(values, unit: str = "", digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = f"{statistics.median(values):,.{digits}f}{unit}"
    return text + (f" (min {min(values):,.{digits}f}, max {max(values):,.{digits}f})" if len(values) > 1 else "")


def print_usage(health: dict) -> None:
    groups = [("all items", health["items"]), ("items with metadata", health["items_by_text_source"]["metadata"]),
              ("items without metadata", health["items_by_text_source"]["no_metadata"])]
    if health.get("users"):
        groups.append(("users", health["users"]))
    print("\ncodebook usage per level (codes used / codebook size, perplexity), last run:")
    print(f"  {'':<32}" + "".join(f"{'level ' + u['level']:>22}" for u in health["items"]["levels"]))
    for name, g in groups:
        cells = "".join(f"{u['used']:>5}/{g['codebook_size']:<4} {u['used_fraction']:>4.0%} {u['perplexity']:>6.1f}"
                        for u in g["levels"])
        label = f"{name} (n={g['n']:,})"
        print(f"  {label:<32}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--repeats", type=int, default=1, help="whole-pipeline runs (each is long)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--report-dir", default=None, help="copy the last run's health report (md, json, PNGs) here")
    parser.add_argument("--lake", default=None, help="read the figures of this already built lake; run nothing")
    args = parser.parse_args()
    if not args.lake and not (ROOT.parent / "shared" / "data" / "instruments").exists():
        raise SystemExit("needs ../shared/data/instruments (the LC-Rec Instruments files)")
    sys.path.insert(0, str(ROOT))
    from a3gr.config import load_config
    from a3gr.lake import Lake

    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    base = load_config(ROOT / args.config, args.set)
    runs = []
    if args.lake:
        cfg = load_config(ROOT / args.config, [*args.set, f"lake.root={args.lake}"])
        runs.append({**collect(cfg, Lake.from_config(cfg), args.report_dir), "pipeline_s": None})
    for i in range(0 if args.lake else args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [*args.set, f"lake.root={tmp}/lake"]
            elapsed = run_pipeline(args.config, overrides)
            cfg = load_config(ROOT / args.config, overrides)
            runs.append({**collect(cfg, Lake.from_config(cfg), args.report_dir), "pipeline_s": elapsed})
            print(f"run {i + 1}: pipeline {elapsed:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                         runs[-1]["stages"].items()))

    last = runs[-1]
    health = last["health"]
    print(f"\ntokenization with {args.config}, median of {len(runs)} run(s) on {os.cpu_count()} CPU cores:")
    sem = base.tokenize.semantic
    print(f"  semantic encoder: {spread([r['items_per_s'] for r in runs], ' items/s')} "
          f"({last['items_embedded']:,} item texts, batch {sem.batch_size}, {base.tokenize.torch_threads} torch "
          f"thread(s), max {sem.max_seq_length} tokens; model load {last['encoder_load_s']:.1f} s apart)")
    print(f"  semantic job, whole (items + users, Ray start and model load included): "
          f"{spread([r['job_texts_per_s'] for r in runs], ' texts/s')} ({last['job_texts']:,} texts)")
    for phase, what in ((1, "phase 1 (U2I only)"), (2, "phase 2 (U2I + RQ-VAEs)")):
        print(f"  training time per epoch, {what}: {spread([r['epoch_s'][phase] for r in runs], ' s', 2)} "
              f"over {last['epochs'][phase]} epochs (training pass only)")
    print(f"  train_tokenizer job time / epochs (evaluation, restarts, Ray and I/O included): "
          f"{spread([r['job_s_per_epoch'] for r in runs], ' s', 2)}")
    for stage in STAGES:
        print(f"  {stage:<16} {spread([r['stages'][stage] for r in runs], ' s')}")
    print(f"  whole pipeline (ETL included): {spread([r['pipeline_s'] for r in runs], ' s')}")
    print(f"  distinct item SCIDs / items: {last['distinct_scids']:,} / {last['items']:,}; before the 4th level: "
          f"{health['items']['distinct_codes']:,} distinct (collision rate {health['items']['collision_rate']:.4f}, "
          f"largest group {health['items']['max_group_size']})")
    if health.get("users"):
        print(f"  user SCIDs: {health['users']['distinct_codes']:,} distinct for {health['users']['n']:,} users "
              f"(sharing rate {health['users']['collision_rate']:.4f})")
    aucs = {k: spread([r["health"]["u2i_auc"][k] for r in runs], "", 4) for k in ("final", "best", "end_of_phase1")}
    print(f"  validation U2I AUC: final {aucs['final']}, best {aucs['best']}, end of phase 1 {aucs['end_of_phase1']}")
    rq = base.tokenize.item_rq
    print(f"  item codebooks: {rq.levels} levels x {rq.codebook_size} codes (dim {rq.code_dim}) + the uniqueness "
          f"level, which needs {health['items']['max_group_size']} tokens (paper: 3 x 256, dim 32)")
    for kind, err in health["reconstruction"].items():
        print(f"  {kind} RQ-VAE reconstruction: relative error {err['relative']:.4f}, MSE {err['mse']:.3g}")
    print_usage(health)


if __name__ == "__main__":
    main()
