"""Users/s and peak memory of nightly batch inference, per engine, on real prompts and a trained model.

    python bench/infer.py --tables /tmp/instr_seq --model /tmp/align_cpu/sft/best \\
        [--users 512] [--engines transformers,vllm] [--settings 20:10,100:100] [--repeats 3] [--batch-size 64]

--tables holds parquet snapshots (bench/align.py --export): item_scid (the item trie), user_scid and
sft_examples, whose SEQ 'valid' rows carry one serving-style prompt per user (template 0, as
`build_prompts` renders them). --users of those users are drawn with --seed; every engine gets the same ones.

Each (engine, beam:top_k) runs in its own subprocess (`--engine-worker NAME`), so every number is that
of a fresh process, as in the nightly job; 'vllm' runs under --python-vllm (vLLM lives in another venv).
A worker builds the engine with `make_engine` and warms it up on 8 other users (reported as start-up s),
then times `engine.search` over all sampled users --repeats times (vLLM's prefix cache is emptied before
each, so no run reuses another's prompts). Printed per row: users/s (median, and each run), start-up s,
peak memory, and the share of users whose top-k list is identical to the first engine's.

Peak memory: the worker's RSS high-water (getrusage) plus, for engines with child processes (vLLM's
engine core), the largest sampled sum of the children's RSS (psutil, every 0.1 s). RSS counts shared
pages (torch libraries) once per process, so the vLLM figure overstates the machine's use a little.
Threads: --threads for torch and for vLLM's CPU OpenMP binding (VLLM_CPU_OMP_THREADS_BIND, unless set).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT_PREFIX = "BENCH_INFER_RESULT "
WARMUP_USERS = 8


def sample_prompts(tables: Path, users: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sampled users, warm-up users): DataFrames (user_id, prompt) by user_id, from the SEQ valid prompts."""
    seq = pd.read_parquet(tables / "sft_examples.parquet", columns=["user_id", "prompt", "task", "split"],
                          filters=[("task", "==", "seq"), ("split", "==", "valid")])
    if seq["user_id"].duplicated().any() or len(seq) < users + WARMUP_USERS:
        raise ValueError(f"{tables}/sft_examples.parquet: need one SEQ valid prompt per user and at least "
                         f"{users + WARMUP_USERS} users, got {len(seq)} rows for {seq['user_id'].nunique()} users")
    picked = seq.sample(n=users + WARMUP_USERS, random_state=seed)[["user_id", "prompt"]]
    user_scid = pd.read_parquet(tables / "user_scid.parquet", columns=["user_id", "scid"])
    scid_of = dict(zip(user_scid["user_id"], user_scid["scid"]))
    stale = [u for u, p in zip(picked["user_id"], picked["prompt"]) if scid_of.get(u) is None or scid_of[u] not in p]
    if stale:
        raise ValueError(f"{tables}: the prompt of user_id {stale[:5]} does not show the user's SCID from "
                         "user_scid.parquet; are sft_examples and user_scid from the same snapshot?")
    return picked.iloc[:users].sort_values("user_id"), picked.iloc[users:]


class ChildMemory(threading.Thread):
    """Largest sum of RSS over this process's descendants, sampled every `every` seconds until `stop`."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every, self.peak, self.children = psutil.Process(), every, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(self.every):
            total, alive = 0, 0
            for child in self.me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                    alive += 1
                except psutil.Error:  # a child that ended between the listing and the read
                    pass
            self.peak, self.children = max(self.peak, total), max(self.children, alive)

    def stop(self) -> None:
        self.done.set()
        self.join()


def fresh_cache(engine) -> None:
    """Empty vLLM's prefix cache, so a timed run never reuses prompts computed by an earlier one."""
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.reset_prefix_cache()


def run_worker(args) -> dict:
    """Build one engine, warm it up, time `search` over the sampled users; the result as a JSON-able dict."""
    import torch

    from batch_infer.engines import encode_prompts, load_tokenizer, make_engine
    from training.backbone import item_token_matrix
    from training.common import item_codes

    torch.set_num_threads(args.threads)
    children = ChildMemory()
    children.start()
    users, warmup = sample_prompts(Path(args.tables), args.users, args.seed)
    tokenizer = load_tokenizer(args.model)
    item_ids, codes = item_codes(pd.read_parquet(Path(args.tables) / "item_scid.parquet", columns=["item_id", "scid"]))
    matrix = item_token_matrix(tokenizer, codes)
    prompts = encode_prompts(tokenizer, users["prompt"], args.max_len)
    beam, top_k = args.beam, args.top_k

    start = time.perf_counter()
    engine = make_engine(args.engine_worker, args.model, matrix, beam, top_k, args.batch_size, args.device)
    engine.search(encode_prompts(tokenizer, warmup["prompt"], args.max_len))
    startup = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        fresh_cache(engine)
        start = time.perf_counter()
        result = engine.search(prompts)
        seconds.append(time.perf_counter() - start)
    children.stop()
    short = sum(len(row) < top_k for row in result.items)
    return {"engine": args.engine_worker, "beam": beam, "top_k": top_k,
            "users_per_s": [len(prompts) / s for s in seconds], "startup_s": startup,
            "peak_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + children.peak) / 2**30,
            "memory": "self" + (f" + {children.children} children" if children.children else ""),
            "short_users": short,
            "user_ids": users["user_id"].tolist(),
            "items": [item_ids[np.asarray(row, dtype=np.int64)].tolist() for row in result.items]}


def launch(args, engine: str, beam: int, top_k: int) -> dict:
    """Run one worker subprocess and return its result line."""
    python = args.python_vllm if engine == "vllm" else sys.executable
    command = [python, __file__, "--engine-worker", engine, "--tables", args.tables, "--model", args.model,
               "--users", str(args.users), "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--threads", str(args.threads),
               "--beam", str(beam), "--top-k", str(top_k)] + (["--device", args.device] if args.device else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {engine} beam {beam} top {top_k} failed (exit {proc.returncode}):\n"
                           + proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def agreement(result: dict, reference: dict) -> float:
    """Share of users whose top-k item lists are identical in both results (same users, same order)."""
    if result["user_ids"] != reference["user_ids"]:
        raise ValueError(f"{result['engine']} and {reference['engine']} ran on different users")
    return float(np.mean([a == b for a, b in zip(result["items"], reference["items"])]))


def print_table(results: list[dict]) -> None:
    print(f"{'engine':<13}{'beam/top':>9}{'users/s':>9}  {'runs':<22}{'start s':>8}{'peak GiB':>9}  "
          f"{'memory':<18}{'same top-k':>10}")
    reference = {}
    for r in results:
        setting = (r["beam"], r["top_k"])
        reference.setdefault(setting, r)
        same = "ref" if reference[setting] is r else f"{agreement(r, reference[setting]):.1%}"
        runs = ", ".join(f"{v:.1f}" for v in r["users_per_s"])
        note = f"  ({r['short_users']} users short of top-k)" if r["short_users"] else ""
        print(f"{r['engine']:<13}{'%d/%d' % setting:>9}{statistics.median(r['users_per_s']):>9.1f}  "
              f"{runs:<22}{r['startup_s']:>8.1f}{r['peak_gib']:>9.2f}  {r['memory']:<18}{same:>10}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", required=True, help="folder of parquet snapshots (item_scid, user_scid, "
                        "sft_examples)")
    parser.add_argument("--model", required=True, help="backbone directory saved by training.backbone.save_backbone")
    parser.add_argument("--users", type=int, default=512, help="seeded sample of users with a SEQ valid prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="transformers,vllm", help="comma-separated; the first is the "
                        "reference of the agreement column")
    parser.add_argument("--settings", default="20:10,100:100", help="beam:top_k pairs (paper protocol, nightly)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per worker; users/s is the median")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (transformers)")
    parser.add_argument("--max-len", type=int, default=320, help="prompt token limit: train.backbone.max_seq_len "
                        "of the run that trained --model (prompts are cut from the left, as in training)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads / vLLM CPU OpenMP threads")
    parser.add_argument("--device", default=None, help="torch device of the transformers engine (default cuda "
                        "when present)")
    parser.add_argument("--python-vllm", default="/work/vllm-venv/bin/python", help="interpreter with vLLM")
    parser.add_argument("--engine-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--beam", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--top-k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine_worker:
        print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
        return
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    print(f"{args.users} users of {args.tables}, model {args.model}, {args.repeats} timed run(s) each, "
          f"{args.threads} thread(s)", flush=True)
    results = []
    for beam, top_k in settings:
        for engine in args.engines.split(","):
            results.append(launch(args, engine, beam, top_k))
            print(f"  done: {engine} beam {beam} top {top_k}", flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
