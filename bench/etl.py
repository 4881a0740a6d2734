"""Benchmark: the full Instruments ETL (ingest -> interactions -> feedback -> features), median of N runs.

Prints wall time per stage and in total, input rows/s, and peak memory of the whole job (the Python
driver, the Spark JVM and its Python workers, sampled every 0.2 s). Needs ../shared/data.

    .venv/bin/python bench/etl.py [--repeats 3] [--config configs/paper.yaml]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def one_run(config: str, lake: str) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "a3gr", "etl", "all", "--config", config, "--set", f"lake.root={lake}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{output[-4000:]}")
    return elapsed, peak, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (ROOT.parent / "shared" / "data" / "instruments").exists():
        raise SystemExit("needs ../shared/data/instruments")
    sys.path.insert(0, str(ROOT))
    from a3gr.config import load_config
    from a3gr.lake import Lake

    times, peaks, rows = [], [], 0
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            lake_root = f"{tmp}/lake"
            elapsed, peak, output = one_run(args.config, lake_root)
            cfg = load_config(ROOT / args.config, [f"lake.root={lake_root}"])
            rows = len(Lake.from_config(cfg).read_arrow("raw_interactions", columns=["user_key"]))
            stage_lines = [line for line in output.splitlines() if "succeeded in" in line]
            print(f"run {i + 1}: {elapsed:.1f} s, peak {peak / 2**30:.2f} GiB")
            for line in stage_lines:
                print("   ", line.split(": ", 1)[-1][:110])
        times.append(elapsed)
        peaks.append(peak)
    med = statistics.median(times)
    print(f"\nfull Instruments ETL ({rows:,} raw interactions), median of {args.repeats}: {med:.1f} s "
          f"(min {min(times):.1f}, max {max(times):.1f}), {rows / med:,.0f} input rows/s, "
          f"peak memory {statistics.median(peaks) / 2**30:.2f} GiB (median; max {max(peaks) / 2**30:.2f})")


if __name__ == "__main__":
    main()
