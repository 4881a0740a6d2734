"""Tokenizer health report: codebook usage and perplexity per level, collisions, U2I AUC, reconstruction.

`tokenizer_health` is pure (arrays and the training history in, a JSON-able dict out);
`write_report` turns it into report.json, report.md and two PNGs next to the tokenizer run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from a3gr.scid import LEVEL_NAMES
from tokenize_jobs.rqvae import codebook_usage

LOSS_KEYS = ("loss_u2i", "loss_item_rq", "loss_user_rq")
RECON_KEYS = ("recon_item", "recon_user")


def level_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: its letter, codes used (count and fraction of the codebook) and perplexity exp(entropy)."""
    return [{"level": LEVEL_NAMES[level], "used": int(round(u["used_fraction"] * codebook_size)), **u}
            for level, u in enumerate(codebook_usage(np.asarray(codes, dtype=np.int64), codebook_size))]


def group_sizes(codes: np.ndarray) -> np.ndarray:
    """For each row, how many rows (itself included) have the same full code."""
    codes = np.asarray(codes)
    if not len(codes):
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()]


def code_summary(codes: np.ndarray, codebook_size: int, sizes: np.ndarray | None = None) -> dict:
    """Usage per level and how many rows share their full code.

    sizes: group sizes computed over a larger population (so a subset's collisions count
    rows outside the subset too); default: computed within `codes`.
    """
    codes = np.asarray(codes, dtype=np.int64)
    sizes = group_sizes(codes) if sizes is None else np.asarray(sizes)
    return {"n": int(len(codes)), "codebook_size": int(codebook_size), "levels": level_usage(codes, codebook_size),
            "distinct_codes": int(len(np.unique(codes, axis=0))) if len(codes) else 0,
            "collision_rate": float((sizes > 1).mean()) if len(sizes) else 0.0,
            "max_group_size": int(sizes.max()) if len(sizes) else 0}


def reconstruction_error(x: np.ndarray, recon: np.ndarray) -> dict:
    """Mean squared error per element and relative error sum||x - x_hat||^2 / sum||x||^2."""
    x, recon = np.asarray(x, dtype=np.float64), np.asarray(recon, dtype=np.float64)
    sq = ((x - recon) ** 2).sum()
    return {"mse": float(sq / max(x.size, 1)), "relative": float(sq / max((x ** 2).sum(), 1e-12))}


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def phase_switch_epoch(history: list[dict]) -> int | None:
    """The first phase-2 epoch, or None when training never reached phase 2."""
    return next((int(h["epoch"]) for h in history if int(h.get("phase", 1)) == 2), None)


def auc_summary(history: list[dict]) -> dict:
    """Validation U2I AUC: last epoch, best epoch, and at the end of phase 1."""
    aucs = [(int(h["epoch"]), int(h.get("phase", 1)), _num(h.get("val_auc"))) for h in history]
    aucs = [a for a in aucs if not math.isnan(a[2])]
    if not aucs:
        return {"final": None, "best": None, "best_epoch": None, "end_of_phase1": None}
    best = max(aucs, key=lambda a: a[2])
    phase1 = [a for a in aucs if a[1] == 1]
    return {"final": aucs[-1][2], "best": best[2], "best_epoch": best[0],
            "end_of_phase1": phase1[-1][2] if phase1 else None}


def tokenizer_health(item_codes: np.ndarray, user_codes: np.ndarray | None, codebook_size: int | dict,
                     item_text_source: np.ndarray, history: list[dict], recon: dict) -> dict:
    """Health of one tokenizer version (a JSON-able dict).

    item_codes: [n_items, L] RQ-VAE codes *before* the uniqueness level; user_codes: [n_users, L]
    or None (item-only tokenization); codebook_size: int, or {"item": k, "user": k};
    item_text_source: per item, 'metadata' / 'reviews' / 'none' (items without metadata rely on
    the collaborative side and the fallback text, so their usage is shown apart);
    history: the trainer's per-epoch dicts; recon: {"item": reconstruction_error(...), "user": ...}.
    """
    sizes = codebook_size if isinstance(codebook_size, dict) else {"item": codebook_size, "user": codebook_size}
    item_codes = np.asarray(item_codes, dtype=np.int64)
    source = np.asarray(item_text_source).astype(str)
    if len(source) != len(item_codes):
        raise ValueError(f"item_text_source has {len(source)} entries for {len(item_codes)} items")
    item_sizes = group_sizes(item_codes)
    has_meta = source == "metadata"
    by_source = {"metadata": code_summary(item_codes[has_meta], sizes["item"], item_sizes[has_meta]),
                 "no_metadata": code_summary(item_codes[~has_meta], sizes["item"], item_sizes[~has_meta])}
    by_source["no_metadata"]["text_sources"] = {s: int(n) for s, n in zip(*np.unique(source[~has_meta],
                                                                                  return_counts=True))}
    epoch_seconds = [float(h["train_seconds"]) for h in history if h.get("train_seconds") is not None]
    return {
        "items": code_summary(item_codes, sizes["item"], item_sizes),
        "items_by_text_source": by_source,
        "users": None if user_codes is None else code_summary(user_codes, sizes["user"]),
        "u2i_auc": auc_summary(history),
        "reconstruction": recon,
        "epochs": len(history),
        "phase_switch_epoch": phase_switch_epoch(history),
        "mean_epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else None,
    }


# --- rendering --------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _groups(health: dict) -> list[tuple[str, dict]]:
    groups = [("all items", health["items"]),
              ("items with metadata", health["items_by_text_source"]["metadata"]),
              ("items without metadata", health["items_by_text_source"]["no_metadata"])]
    return groups + ([("users", health["users"])] if health.get("users") else [])


def render_markdown(health: dict, history: list[dict], title: str = "Tokenizer health") -> str:
    items, users, auc = health["items"], health.get("users"), health["u2i_auc"]
    lines = [f"# {title}", ""]
    lines += [f"- items: {items['n']:,}; distinct {len(items['levels'])}-level codes: {items['distinct_codes']:,}; "
              f"collision rate before the uniqueness level: {items['collision_rate']:.4f}; "
              f"largest group of items sharing a code: {items['max_group_size']} (so the uniqueness level needs "
              f"{items['max_group_size']} tokens)"]
    if users:
        lines.append(f"- users: {users['n']:,}; distinct SCIDs: {users['distinct_codes']:,}; "
                     f"share of users whose SCID another user has too: {users['collision_rate']:.4f}")
    lines.append(f"- U2I AUC (validation): final {_fmt(auc['final'])}, best {_fmt(auc['best'])} "
                 f"(epoch {_fmt(auc['best_epoch'])}), end of phase 1 {_fmt(auc['end_of_phase1'])}")
    for kind, err in (health.get("reconstruction") or {}).items():
        lines.append(f"- {kind} reconstruction error: MSE {_fmt(err['mse'])}, relative {_fmt(err['relative'])}")
    lines.append(f"- epochs: {health['epochs']}; phase 2 from epoch {_fmt(health['phase_switch_epoch'])}; "
                 f"mean epoch time {_fmt(health.get('mean_epoch_seconds'), 3)} s")
    lines += ["", "## Codebook usage per level", "",
              "Used: codes used / codebook size; perplexity: exp(entropy) of the code distribution "
              "(at most the codebook size).", ""]
    groups = _groups(health)
    lines.append("| level | " + " | ".join(f"{name} (n={g['n']:,}): used, perplexity" for name, g in groups) + " |")
    lines.append("|---" * (len(groups) + 1) + "|")
    for level in range(len(items["levels"])):
        cells = []
        for _, g in groups:
            if level < len(g["levels"]):
                u = g["levels"][level]
                cells.append(f"{u['used']}/{g['codebook_size']} ({u['used_fraction']:.0%}), {u['perplexity']:.1f}")
            else:
                cells.append("-")
        lines.append(f"| {items['levels'][level]['level']} | " + " | ".join(cells) + " |")
    no_meta = health["items_by_text_source"]["no_metadata"]
    lines += ["", f"Items without metadata: {no_meta['n']:,} "
                  f"({', '.join(f'{k}: {v:,}' for k, v in no_meta.get('text_sources', {}).items()) or 'none'}); "
                  f"collision rate before the uniqueness level {no_meta['collision_rate']:.4f} "
                  f"(items with metadata: {health['items_by_text_source']['metadata']['collision_rate']:.4f})."]
    if history:
        columns = ["epoch", "phase", *LOSS_KEYS, *RECON_KEYS, "val_auc", "dead_codes_restarted", "train_seconds"]
        columns = [c for c in columns if any(c in h for h in history)]
        lines += ["", "## Training history", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(_fmt(h.get(c)) for c in columns) + " |" for h in history]
    return "\n".join(lines) + "\n"


def _pyplot():
    """pyplot on the Agg backend (jobs run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_usage(health: dict, path: Path) -> Path:
    plt = _pyplot()
    groups = _groups(health)
    levels = [u["level"] for u in health["items"]["levels"]]
    width = 0.8 / len(groups)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("used_fraction", "codes used / codebook size"), ("perplexity", "perplexity / codebook size"))
    for ax, (key, label) in zip(axes, panels):
        for i, (name, g) in enumerate(groups):
            values = [u[key] / (g["codebook_size"] if key == "perplexity" else 1.0) for u in g["levels"]]
            xs = np.arange(len(values)) + (i - (len(groups) - 1) / 2) * width
            bars = ax.bar(xs, values, width, label=f"{name} (n={g['n']:,})")
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        ax.set_xticks(np.arange(len(levels)), [f"level {name}" for name in levels])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Codebook usage per level")
    axes[1].set_title("Code perplexity per level (1 = uniform over the codebook)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(groups), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(history: list[dict], path: Path) -> Path:
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    switch = phase_switch_epoch(history)
    fig, (ax_loss, ax_recon) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, keys in ((ax_loss, LOSS_KEYS), (ax_recon, RECON_KEYS)):
        plotted = []
        for key in keys:
            values = [_num(h.get(key)) for h in history]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker=".", label=key)
                plotted += [v for v in values if not math.isnan(v)]
        if plotted and min(plotted) > 0:
            ax.set_yscale("log")  # the RQ losses are orders of magnitude below the U2I loss
        if switch is not None:
            ax.axvline(switch - 0.5, color="grey", linestyle="--")
            ax.axvspan(switch - 0.5, max(epochs) + 0.5, color="grey", alpha=0.08)
            ax.text(switch - 0.5, 1.0, " phase 2 ", transform=ax.get_xaxis_transform(), ha="left", va="bottom",
                    fontsize=8)
            ax.text(switch - 0.5, 1.0, " phase 1 ", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                    fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("training loss (unweighted)")
    ax_recon.set_ylabel("reconstruction error")
    twins = {ax_loss: None, ax_recon: None}
    aucs = [_num(h.get("val_auc")) for h in history]
    if not all(math.isnan(v) for v in aucs):
        twins[ax_loss] = ax_loss.twinx()
        twins[ax_loss].plot(epochs, aucs, color="black", marker="o", markersize=3, label="val U2I AUC")
        twins[ax_loss].set_ylabel("validation U2I AUC")
    dead = [_num(h.get("dead_codes_restarted")) for h in history]
    if not all(math.isnan(v) or v == 0 for v in dead):
        twins[ax_recon] = ax_recon.twinx()
        twins[ax_recon].bar(epochs, dead, color="tab:red", alpha=0.25, label="dead codes restarted")
        twins[ax_recon].set_ylabel("dead codes restarted")
        ax_recon.set_zorder(twins[ax_recon].get_zorder() + 1)  # curves in front of the bars
        ax_recon.patch.set_visible(False)
    for ax, twin in twins.items():
        # one legend per panel, below it, for the curves on both y axes
        handles = ax.get_legend_handles_labels()[0] + (twin.get_legend_handles_labels()[0] if twin else [])
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8,
                  frameon=False)
    ax_loss.set_title("Two-phase training: losses and U2I AUC", pad=14)
    ax_recon.set_title("RQ-VAE reconstruction error", pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(health: dict, history: list[dict], out_dir: str | Path, title: str = "Tokenizer health") -> list[Path]:
    """report.json, report.md, usage_per_level.png and (with a history) loss_curves.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(health, indent=2, sort_keys=True))
    paths[1].write_text(render_markdown(health, history, title))
    paths.append(plot_usage(health, out / "usage_per_level.png"))
    if history:
        paths.append(plot_loss_curves(history, out / "loss_curves.png"))
    return paths
