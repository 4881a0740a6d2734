"""Offline evaluation: every model and baseline under one protocol -> `eval_metrics` and a report.

    user_features + user_scid + item_scid + item_features + interactions (+ the registered models)
      -> per model and held-out split: a ranked item list per user
      -> Recall@K, NDCG@K, coverage@K, duplicate and invalid-SCID rates
      -> eval_metrics (this run's rows appended in one transaction) and
         <models_dir>/eval/<run_id>/: report.md, report.html, metrics.json and PNG charts

The protocol is the paper's: leave-one-out with one held-out item per user, ranked over the
whole catalogue (no sampled candidates).
- Users: every user of user_features, or a seeded sample of `eval.max_users`; the same users for
  every model and split.
- Split 'valid': the history is the user's training items and the target the valid item; 'test':
  the training items plus the valid item, target the test item (at most `etl.max_history` items,
  the most recent kept).
- Generative models (sft, dpo, dpo_<stage>, tiger; by registered name): trie-constrained beam
  search through the `infer.engine`. K <= `eval.paper_beam` is measured on the top items of a beam
  that wide (the paper: 20); for larger K that list is extended by the results of a beam as wide as
  the largest K, so the lists nest and Recall@K cannot fall as K grows. A model whose directory
  holds its own item code map (`item_scid.parquet`: the TIGER-style baseline `tiger`, text-only
  codes) gets item-only prompts over the same histories and searches its own item trie; the
  others get the user-SCID prompts and the trie of the `item_scid` table.
- popular: the same list for every user, items ordered by the interactions observed before the
  split (valid: train rows; test: train and valid rows). The user's history is NOT excluded: the
  generative models may recommend a seen item too, and the paper's protocol excludes nothing.
- sasrec: the registered collaborative encoder (`collaborative`, a SASRec) through
  `score_next_items`, which excludes the history's items (SASRec's own protocol).
A model in `eval.models` that is not registered is skipped with a warning and named in the run
record and the report; the nightly run goes on.
Run as `a3gr evaluate` or `python -m batch_infer.evaluate --config ...`.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from a3gr.config import PipelineConfig
from a3gr.jobs import JobRun, job_main
from a3gr.lake import Lake
from a3gr.registry import ITEM_CODES_FILE, latest_model, models_dir
from a3gr.runs import RunRecord, list_runs, save_run
from batch_infer.metrics import recall_ndcg
from expectations.suites import EVAL_AT_K_METRICS, EVAL_RATE_METRICS

log = logging.getLogger("a3gr.evaluate")

JOB = "evaluate"
INPUTS = ["user_features", "user_scid", "item_scid", "item_features", "interactions"]
POPULAR = "popular"
SASREC = "sasrec"
REGISTERED_AS = {SASREC: "collaborative"}  # evaluated name -> name in the `models` table, where they differ
OBSERVED_BEFORE = {"valid": ("train",), "test": ("train", "valid")}  # interactions a model may know per split
REPORT_FILES = ("report.md", "report.html", "metrics.json")

# Paper Table 1 (Instruments, test split; the paper averages 5 seeds), and our nearest counterpart of each row:
# sft is LC-Rec's multi-task SFT plus Align3GR's user-side tasks, dpo the whole Align3GR.
PAPER_DATASET = "lcrec:Instruments"
PAPER_COLUMNS = (("recall", 5), ("recall", 10), ("ndcg", 5), ("ndcg", 10))
PAPER_TABLE1 = {
    "SASRec": (0.0751, 0.0947, 0.0627, 0.0690),
    "TIGER": (0.0870, 0.1058, 0.0737, 0.0797),
    "LC-Rec": (0.0824, 0.1006, 0.0712, 0.0772),
    "EAGER-LLM": (0.0991, 0.1224, 0.0851, 0.0926),
    "Align3GR": (0.1103, 0.1442, 0.0970, 0.1113),
}
# tiger is TIGER's setting on our backbone (text-only item codes, SEQ only, no user SCID).
PAPER_COUNTERPART = {"SASRec": SASREC, "TIGER": "tiger", "LC-Rec": "sft", "Align3GR": "dpo"}


# ---------------------------------------------------------------------------------------------
# Pure part: users, held-out targets, rankings and their metrics.

@dataclass
class Ranking:
    """A model's ranked item ids per user (best first) and the counts behind the rate metrics."""
    items: list[list[int]]
    generated: int = 0  # sequences the model produced, valid or not
    duplicates: int = 0  # produced items that repeat an earlier item of the same user's output
    invalid: int = 0  # produced sequences that are not an item of the catalogue (dropped beams)


def sample_users(user_ids, max_users: int, seed: int) -> np.ndarray:
    """Sorted user ids: all of them, or a seeded sample of max_users (0 = all)."""
    ids = np.sort(np.asarray(user_ids, dtype=np.int64))
    if not max_users or len(ids) <= max_users:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=max_users, replace=False))


def heldout(user_features: pd.DataFrame, split: str, max_history: int) -> tuple[list[list[int]], np.ndarray]:
    """(history each user's model sees, held-out target) per row of user_features, for one split."""
    if split not in OBSERVED_BEFORE:
        raise ValueError(f"unknown evaluation split {split!r}; expected one of {list(OBSERVED_BEFORE)}")
    histories = [[int(i) for i in h] for h in user_features["history"]]
    if split == "test":
        histories = [(h + [int(v)])[-max_history:] for h, v in zip(histories, user_features["valid_item"])]
    return histories, user_features[f"{split}_item"].to_numpy(np.int64)


def popular_items(interactions: pd.DataFrame, split: str, catalog: np.ndarray) -> np.ndarray:
    """Every catalogue item, most interacted first among the rows observed before `split` (ties: lower id)."""
    observed = interactions[interactions["split"].isin(OBSERVED_BEFORE[split])]
    counts = observed["item_id"].value_counts().reindex(catalog, fill_value=0).to_numpy()
    order = np.lexsort((catalog, -counts))
    return np.asarray(catalog, dtype=np.int64)[order]


def beam_widths(ks, paper_beam: int, n_items: int) -> list[int]:
    """Beam widths to search (each returns that many items): paper_beam for K <= paper_beam, max K above."""
    widths = []
    if min(ks) <= paper_beam:
        widths.append(min(paper_beam, n_items))
    if max(ks) > paper_beam:
        widths.append(min(max(ks), n_items))
    return sorted(set(widths))


def extend_ranking(head: list[list[int]], tail: list[list[int]]) -> list[list[int]]:
    """Each head list followed by the tail list's items it does not hold yet (so shorter lists nest in longer)."""
    out = []
    for first, more in zip(head, tail):
        seen = set(first)
        extra = [i for i in more if not (i in seen or seen.add(i))]
        out.append(list(first) + extra)
    return out


def duplicate_count(lists) -> int:
    """Items that repeat an earlier item of the same list."""
    return sum(len(items) - len(set(items)) for items in lists)


def fixed_ranking(items: np.ndarray, n_users: int, depth: int) -> Ranking:
    """The same top-`depth` list for every user (the popularity baseline)."""
    top = [int(i) for i in items[:depth]]
    return Ranking([top] * n_users, generated=len(top) * n_users, duplicates=duplicate_count([top]) * n_users)


def coverage(lists, k: int, catalog_size: int) -> float:
    """Distinct items in the users' top K over the catalogue size."""
    return len(set(chain.from_iterable(items[:k] for items in lists))) / max(catalog_size, 1)


def ranking_metrics(ranking: Ranking, targets, ks, catalog_size: int) -> list[tuple[str, int | None, float]]:
    """(metric, k, value) rows: recall, ndcg and coverage at each K, then the duplicate and invalid-SCID rates."""
    scores = recall_ndcg(ranking.items, targets, ks)
    rows = []
    for k in ks:
        rows += [("recall", k, scores[f"recall@{k}"]), ("ndcg", k, scores[f"ndcg@{k}"]),
                 ("coverage", k, coverage(ranking.items, k, catalog_size))]
    produced = max(ranking.generated, 1)
    rows += [("duplicate_rate", None, ranking.duplicates / produced), ("invalid_scid_rate", None, ranking.invalid / produced)]
    return rows


def metric_frame(run_id: str, model: str, dataset: str, split: str, rows) -> pd.DataFrame:
    """eval_metrics rows of one model and split."""
    return pd.DataFrame({
        "run_id": run_id, "model": model, "dataset": dataset, "split": split,
        "metric": [m for m, _, _ in rows], "k": pd.array([k for _, k, _ in rows], dtype="Int32"),
        "value": [float(v) for _, _, v in rows]})


def dataset_name(cfg: PipelineConfig) -> str:
    """The `dataset` column: the source kind, plus which data set for the file-based sources."""
    source = cfg.source
    if source.kind == "lcrec":
        return f"lcrec:{source.lcrec_name}"
    if source.kind == "amazon" and source.reviews_path:
        return f"amazon:{Path(source.reviews_path).name.split('.')[0]}"
    return source.kind


# ---------------------------------------------------------------------------------------------
# Rankers: one per kind of model, each returning {split: Ranking} for the users in `inputs`.

@dataclass
class SplitInputs:
    """One split's users in evaluation order: what each model sees, and the held-out targets."""
    user_ids: np.ndarray
    histories: list[list[int]]
    targets: np.ndarray


def rank_sasrec(model_dir: str, inputs: dict[str, SplitInputs], depth: int) -> dict[str, Ranking]:
    from tokenize_jobs.collaborative import load_collaborative, score_next_items

    depth = min(depth, len(load_collaborative(model_dir)[1]))
    out = {}
    for split, data in inputs.items():
        top, _ = score_next_items(model_dir, data.histories, depth)
        lists = [[int(i) for i in row] for row in top]
        out[split] = Ranking(lists, generated=sum(map(len, lists)), duplicates=duplicate_count(lists))
    return out


def rank_generative(model_dir: str, prompts: dict[str, list[str]], item_scid: pd.DataFrame, widths: list[int],
                    cfg: PipelineConfig, device) -> dict[str, Ranking]:
    """Trie-constrained beam search over `item_scid`'s items at each width; the widest lists extend the narrowest."""
    from batch_infer.engines import encode_prompts, load_tokenizer, make_engine
    from training.backbone import item_token_matrix
    from training.common import item_codes

    tokenizer = load_tokenizer(model_dir)
    item_ids, codes = item_codes(item_scid)
    matrix = item_token_matrix(tokenizer, codes)
    encoded = {split: encode_prompts(tokenizer, texts, cfg.train.backbone.max_seq_len)
               for split, texts in prompts.items()}
    out = {split: Ranking([]) for split in prompts}
    for width in widths:
        engine = make_engine(cfg.infer.engine, str(model_dir), matrix, width, width, cfg.infer.batch_size, device)
        for split, prompts in encoded.items():
            t0 = time.perf_counter()
            result = engine.search(prompts)
            lists = [[int(item_ids[row]) for row in rows] for rows in result.items]
            ranking = out[split]
            ranking.items = extend_ranking(ranking.items, lists) if ranking.items else lists
            ranking.generated += sum(map(len, lists)) + result.dropped
            ranking.duplicates += duplicate_count(lists)
            ranking.invalid += result.dropped
            log.info("evaluate: %s beam %d on %d %s users in %.1fs", Path(model_dir).name, width, len(prompts),
                     split, time.perf_counter() - t0)
        del engine
    return out


def own_item_codes(model_dir: str) -> pd.DataFrame | None:
    """The item code map a model carries in its directory (the TIGER baseline), else None."""
    path = Path(model_dir) / ITEM_CODES_FILE
    return pd.read_parquet(path) if path.exists() else None


def split_prompts(inputs: dict[str, SplitInputs], users: pd.DataFrame, user_scid: pd.DataFrame | None,
                  item_scid: pd.DataFrame, max_history: int) -> dict[str, list[str]]:
    """Each split's prompt texts, in the users' order; user_scid None gives the item-only prompts."""
    from batch_infer.engines import build_prompts

    out = {}
    for split, data in inputs.items():
        frame = build_prompts(users, user_scid, item_scid, split, max_history).set_index("user_id")
        missing = np.setdiff1d(data.user_ids, frame.index.to_numpy())
        if len(missing):
            raise ValueError(f"build_prompts({split!r}) gave no prompt for users {missing[:5].tolist()}")
        frame = frame.loc[data.user_ids]
        wrong = frame["target_item"].to_numpy(np.int64) != data.targets
        if wrong.any():
            raise ValueError(f"build_prompts({split!r}): target_item differs from user_features' {split}_item for "
                             f"users {frame.index[wrong][:5].tolist()}")
        out[split] = frame["prompt"].tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Report: metrics.json, then report.md and report.html rendered from it, and the charts.

def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _label(metric: str, k) -> str:
    short = {"recall": "R", "ndcg": "N", "coverage": "cov", "duplicate_rate": "duplicates",
             "invalid_scid_rate": "invalid SCIDs"}[metric]
    return f"{short}@{k}" if k is not None else short


def split_tables(summary: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per split: (header, rows) with one row per model, best recall/ndcg per column in bold."""
    ks = summary["protocol"]["ks"]
    columns = [(m, k) for m in EVAL_AT_K_METRICS for k in ks] + [(m, None) for m in EVAL_RATE_METRICS]
    tables = {}
    for split in summary["protocol"]["splits"]:
        values = {(r["model"], r["metric"], r["k"]): r["value"] for r in summary["metrics"] if r["split"] == split}
        models = [m for m in summary["models"] if any(key[0] == m for key in values)]
        best = {c: max((values.get((m, *c), -1.0) for m in models), default=None) for c in columns}
        body = []
        for model in models:
            cells = [model]
            for metric, k in columns:
                value = values.get((model, metric, k))
                text = _cell(value)
                cells.append(f"**{text}**" if metric in ("recall", "ndcg") and value is not None
                             and len(models) > 1 and value == best[(metric, k)] and value > 0 else text)
            body.append(cells)
        tables[split] = (["model"] + [_label(m, k) for m, k in columns], body)
    return tables


def paper_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Paper Table 1 rows beside ours (test split): each paper row, then our counterpart, then our other models."""
    values = {(r["model"], r["metric"], r["k"]): r["value"] for r in summary["metrics"] if r["split"] == "test"}
    evaluated = [m for m in summary["models"] if any(key[0] == m for key in values)]

    def ours(model: str) -> list[str]:
        return [f"{model} (ours)", "ours"] + [_cell(values.get((model, m, k))) for m, k in PAPER_COLUMNS]

    rows, shown = [], set()
    for name, numbers in PAPER_TABLE1.items():
        rows.append([name, "paper"] + [f"{v:.4f}" for v in numbers])
        counterpart = PAPER_COUNTERPART.get(name)
        if counterpart in evaluated:
            rows.append(ours(counterpart))
            shown.add(counterpart)
    rows += [ours(m) for m in evaluated if m not in shown]
    return ["model", "source"] + [_label(m, k) for m, k in PAPER_COLUMNS], rows


def report_blocks(summary: dict) -> list[tuple]:
    """The report as blocks ('h1'|'h2'|'p'|'list'|'table'|'img', ...), rendered to Markdown and HTML alike."""
    p = summary["protocol"]
    widths = ", ".join(str(w) for w in p["beam_widths"])
    blocks = [("h1", f"Offline evaluation {summary['run_id']}"), ("list", [
        f"dataset: {summary['dataset']}; catalogue: {p['catalog_size']:,} items; users: {p['users']:,} of "
        f"{p['all_users']:,}" + (f" (seeded sample, seed {p['seed']})" if p["users"] < p["all_users"] else ""),
        f"protocol: leave-one-out, one held-out item per user, full ranking over the catalogue; splits: "
        f"{', '.join(p['splits'])}; history: at most {p['max_history']} items (test: training items + valid item)",
        f"generative models: trie-constrained beam search on the `{p['engine']}` engine, beam widths {widths} "
        f"(K <= {p['paper_beam']} from beam {min(p['beam_widths'], default=p['paper_beam'])}, as in the paper; "
        f"larger K from that list extended by the widest beam)",
        "popular: one list for every user, by interactions observed before the split, history not excluded; "
        "sasrec: the collaborative encoder, history excluded",
        "models: " + "; ".join(f"{name} ({info['registered_as']}/{info['version']}, {info['seconds']:.1f} s)"
                               if info.get("version") else f"{name} ({info['seconds']:.1f} s)"
                               for name, info in summary["models"].items()),
    ] + ([f"skipped: {'; '.join(f'{n} ({why})' for n, why in summary['skipped'].items())}"]
         if summary["skipped"] else []))]
    for split, (header, rows) in split_tables(summary).items():
        blocks += [("h2", f"Split: {split}"), ("table", header, rows)]
    if summary.get("paper_comparison"):
        header, rows = paper_table(summary)
        blocks += [("h2", "Beside the paper (Table 1, Instruments, test split)"),
                   ("p", "The paper's rows average 5 seeds with a Llama2-7B backbone; ours are one run of this "
                         "pipeline. tiger is TIGER's setting on our backbone (item codes from the text alone, the "
                         "SEQ task only, no user SCID); sft is LC-Rec's multi-task SFT plus Align3GR's user-side "
                         "tasks; dpo is the whole Align3GR (progressive SP- and RF-DPO)."),
                   ("table", header, rows)]
    if summary.get("charts"):
        blocks.append(("h2", "Charts"))
        blocks += [("img", name, alt) for name, alt in summary["charts"].items()]
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("#" if kind == "h1" else "##") + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then the two inline Markdown marks the report uses: **bold** and `code`."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{part}</b>" if i % 2 else part for i, part in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def render_html(blocks: list[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _pyplot():
    """pyplot on the Agg backend (jobs run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_headline(summary: dict, k: int, path: Path) -> Path:
    """Grouped bars: Recall@k and NDCG@k of every model, one panel per split."""
    plt = _pyplot()
    frame = pd.DataFrame(summary["metrics"])
    splits, models = summary["protocol"]["splits"], list(summary["models"])
    fig, axes = plt.subplots(1, len(splits), figsize=(max(6.0, 1.2 * len(models) + 2) * len(splits), 4.2),
                             squeeze=False)
    for ax, split in zip(axes[0], splits):
        xs = np.arange(len(models))
        for offset, metric in ((-0.2, "recall"), (0.2, "ndcg")):
            picked = frame[(frame["split"] == split) & (frame["metric"] == metric) & (frame["k"] == k)]
            values = [float(picked.loc[picked["model"] == m, "value"].max()) if (picked["model"] == m).any()
                      else 0.0 for m in models]
            bars = ax.bar(xs + offset, values, 0.4, label=f"{'Recall' if metric == 'recall' else 'NDCG'}@{k}")
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=1)
        ax.set_xticks(xs, models, rotation=20, ha="right")
        ax.set_title(f"{split} split")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"{summary['dataset']}: Recall@{k} and NDCG@{k} ({summary['protocol']['users']:,} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_curve(summary: dict, path: Path) -> Path:
    """Recall@K against K per model, one panel per split."""
    plt = _pyplot()
    frame = pd.DataFrame(summary["metrics"])
    splits = summary["protocol"]["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for model in summary["models"]:
            picked = frame[(frame["split"] == split) & (frame["metric"] == "recall") & (frame["model"] == model)]
            picked = picked.sort_values("k")
            ax.plot(picked["k"], picked["value"], marker="o", label=model)
        ax.set_xscale("log")
        ax.set_xticks(summary["protocol"]["ks"], [str(k) for k in summary["protocol"]["ks"]])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_title(f"{split} split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict, out_dir: str | Path) -> Path:
    """metrics.json, the charts, report.md and report.html in out_dir; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ks = summary["protocol"]["ks"]
    headline = 10 if 10 in ks else min(ks)
    summary = {**summary, "charts": {}}
    if summary["metrics"]:
        plot_headline(summary, headline, out / f"recall_ndcg_at_{headline}.png")
        summary["charts"][f"recall_ndcg_at_{headline}.png"] = f"Recall@{headline} and NDCG@{headline} per model"
        if len(ks) > 1:
            plot_recall_curve(summary, out / "recall_at_k.png")
            summary["charts"]["recall_at_k.png"] = "Recall@K per model"
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    blocks = report_blocks(summary)
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, f"Offline evaluation {summary['run_id']}"))
    return out / "report.md"


def report_dir(cfg: PipelineConfig, run_id: str) -> Path:
    return models_dir(cfg) / "eval" / run_id


def latest_report(cfg: PipelineConfig) -> Path | None:
    """report.md of the newest succeeded evaluation run that wrote one, else None."""
    for record in list_runs(Lake.from_config(cfg), JOB):
        path = report_dir(cfg, record.run_id) / "report.md"
        if record.status == "succeeded" and path.exists():
            return path
    return None


# ---------------------------------------------------------------------------------------------
# Job shell.

def resolve_models(lake: Lake, names) -> tuple[dict[str, dict | None], dict[str, str]]:
    """({evaluated name: registry row, None for popular}, {skipped name: why})."""
    found, skipped = {}, {}
    for name in names:
        if name == POPULAR:
            found[name] = None
            continue
        registered = REGISTERED_AS.get(name, name)
        row = latest_model(lake, registered)
        if row is None:
            skipped[name] = f"no model '{registered}' registered in table 'models'"
        elif not Path(row["path"]).exists():
            skipped[name] = f"registered path {row['path']} of {registered}/{row['version']} does not exist"
        else:
            found[name] = row
    for name, why in skipped.items():
        log.warning("evaluate: skipping %s: %s", name, why)
    return found, skipped


def run(cfg: PipelineConfig, spark=None, force: bool = False) -> RunRecord:
    """Evaluate every model of `eval.models` that is available; append eval_metrics; write the report.

    `spark` is unused (the inputs are small and read through delta-rs); it keeps the common job signature.
    """
    import torch

    ev = cfg.eval
    lake = Lake.from_config(cfg)
    models, skipped = resolve_models(lake, ev.models)
    dataset = dataset_name(cfg)
    sections = {"eval": dataclasses.asdict(ev), "dataset": dataset, "seed": cfg.seed,
                "max_history": cfg.etl.max_history, "max_seq_len": cfg.train.backbone.max_seq_len,
                "engine": cfg.infer.engine, "batch_size": cfg.infer.batch_size,
                "models": {name: row and f"{row['name']}/{row['version']}" for name, row in models.items()},
                "skipped": sorted(skipped)}
    with JobRun(JOB, cfg, input_tables=INPUTS, config_sections=sections, force=force, lake=lake) as job:
        if job.up_to_date:
            return job.record
        torch.set_num_threads(cfg.train.torch_threads)
        tables = {name: lake.read_pandas(name, version=job.record.inputs[f"table:{name}"]) for name in INPUTS}
        catalog = np.sort(tables["item_features"]["item_id"].to_numpy(np.int64))
        all_users = tables["user_features"]
        users = all_users.set_index("user_id").loc[sample_users(all_users["user_id"], ev.max_users, cfg.seed)]
        users = users.reset_index()
        inputs = {}
        for split in ev.splits:
            histories, targets = heldout(users, split, cfg.etl.max_history)
            inputs[split] = SplitInputs(users["user_id"].to_numpy(np.int64), histories, targets)
        depth = min(max(ev.ks), len(catalog))
        widths = beam_widths(ev.ks, ev.paper_beam, len(tables["item_scid"]))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("evaluate: %d of %d users, %d items, splits %s, models %s, beam widths %s", len(users),
                 len(all_users), len(catalog), ev.splits, list(models), widths)

        frames, timing, shared_prompts = [], {}, None
        for name, row in models.items():
            t0 = time.perf_counter()
            if name == POPULAR:
                rankings = {split: fixed_ranking(popular_items(tables["interactions"], split, catalog), len(users),
                                                 depth) for split in inputs}
            elif name == SASREC:
                rankings = rank_sasrec(row["path"], inputs, depth)
            elif (own := own_item_codes(row["path"])) is not None:  # its own codes: item-only prompts, its trie
                prompts = split_prompts(inputs, users, None, own, cfg.etl.max_history)
                rankings = rank_generative(row["path"], prompts, own, widths, cfg, device)
            else:  # the policies share one set of prompts
                shared_prompts = shared_prompts or split_prompts(inputs, users, tables["user_scid"],
                                                                 tables["item_scid"], cfg.etl.max_history)
                rankings = rank_generative(row["path"], shared_prompts, tables["item_scid"], widths, cfg, device)
            timing[name] = time.perf_counter() - t0
            for split, ranking in rankings.items():
                rows = ranking_metrics(ranking, inputs[split].targets, ev.ks, len(catalog))
                frames.append(metric_frame(job.run_id, name, dataset, split, rows))
                scores = dict(((m, k), v) for m, k, v in rows)
                log.info("evaluate: %s %s: %s", name, split, ", ".join(
                    f"{_label(m, k)} {scores[(m, k)]:.4f}" for m in ("recall", "ndcg") for k in ev.ks))

        metrics = pd.concat(frames, ignore_index=True) if frames else metric_frame(job.run_id, "", dataset, "", [])
        version = job.publish_arrow("eval_metrics", metrics, mode="append")
        # The table grows by appends; validation reconciles the whole table's rows at the version a run wrote.
        job.count("eval_metrics_appended", len(metrics))
        job.count("eval_metrics", lake.table("eval_metrics", version).to_pyarrow_dataset().count_rows())
        job.count("users", len(users))
        job.count("models_evaluated", len(models))
        job.count("models_skipped", len(skipped))

        summary = {
            "run_id": job.run_id, "dataset": dataset, "eval_metrics_version": version,
            "protocol": {"ks": list(ev.ks), "paper_beam": ev.paper_beam, "beam_widths": widths,
                         "splits": list(ev.splits), "users": len(users), "all_users": len(all_users),
                         "catalog_size": len(catalog), "max_history": cfg.etl.max_history, "seed": cfg.seed,
                         "engine": cfg.infer.engine},
            "models": {name: {"registered_as": row["name"] if row else None,
                              "version": row["version"] if row else None, "path": row["path"] if row else None,
                              "seconds": round(timing[name], 2)} for name, row in models.items()},
            "skipped": skipped,
            "metrics": [{**r, "k": None if pd.isna(r["k"]) else int(r["k"])}
                        for r in metrics[["model", "split", "metric", "k", "value"]].to_dict("records")],
            "paper_comparison": dataset == PAPER_DATASET and "test" in ev.splits,
        }
        path = write_report(summary, report_dir(cfg, job.run_id))
        log.info("evaluate: report at %s (and report.html beside it)", path)
    if skipped:
        # JobRun clears the message when it finishes; the skips are stored on the finished record.
        job.record.message = "skipped models: " + "; ".join(f"{name}: {why}" for name, why in skipped.items())
        save_run(lake, job.record)
    return job.record


if __name__ == "__main__":
    job_main(run)
