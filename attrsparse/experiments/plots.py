"""Figures for a sweep's ``results.json`` and for the dependency analysis (matplotlib, Agg).

* :func:`plot_curves` -> ``curves.png`` / ``curves.svg``: 2x2 panels against the **executed,
  parameter-weighted** activation ratio (not the requested one): (a) BLEU vs the dense output with
  stderr bars (the layout of the paper's Fig. 3), (b) ROUGE-L vs dense, (c) TruthfulQA's
  truth BLEU diff (max-correct minus max-incorrect reference BLEU) with the dense value as a
  horizontal line, (d) MC1 accuracy with the dense MC1 line.
* :func:`plot_dependency` -> ``dependency.png`` / ``.svg``: relative attribution-score change (%)
  of MLP neurons and heads vs activation ratio (paper Fig. 5, right), and histograms of the
  first-order attribution error normalised by the theorem's bound ``|x|*||g||``, before and after
  adding the correction. Missing keys skip their panel.

The schemas are described in :mod:`attrsparse.experiments.report`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.figures import METRIC_LABELS, metric_colors, metric_label, pyplot, save_figure
from ..core.figures import num as _num

__all__ = ["METRIC_LABELS", "metric_label", "metric_colors", "plot_curves", "plot_dependency",
           "normalised_errors"]

_MARKERS = {"gradient": "v", "magnitude": "o", "snip": "D", "ig": "^", "gxo": "s",
            "corrected_gxo": "*"}


def _metric_order(names) -> list[str]:
    paper = [m for m in METRIC_LABELS if m in names]
    return paper + [m for m in dict.fromkeys(names) if m not in METRIC_LABELS]


def plot_curves(results: dict, out_dir: Path) -> list[Path]:
    """Write ``curves.png`` and ``curves.svg`` (see module docstring); return their paths."""
    aggs = results.get("aggregates", [])
    dense = results.get("dense", {}) or {}
    names = _metric_order([a["metric"] for a in aggs])
    colors = metric_colors(names)
    n_total = dense.get("n_questions") or (results.get("data") or {}).get("n_questions")

    panels = [
        ("bleu_vs_dense", "bleu_vs_dense_stderr", "(a) BLEU vs dense output", "BLEU vs dense"),
        ("rougeL_vs_dense", "rougeL_vs_dense_stderr", "(b) ROUGE-L vs dense output",
         "ROUGE-L vs dense"),
        ("truth_bleu_diff", None, "(c) Truthfulness vs TruthfulQA references",
         "truth BLEU diff (correct - incorrect)"),
        ("mc1", None, "(d) MC1 accuracy (log-likelihood)", "MC1 accuracy"),
    ]
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (field, err_field, title, ylabel) in zip(axes.flat, panels):
        drawn = 0
        for name in names:
            rows = sorted((a for a in aggs if a["metric"] == name),
                          key=lambda a: _num(a.get("executed_ratio")))
            x = np.array([_num(a.get("executed_ratio")) for a in rows])
            y = np.array([_num(a.get(field)) for a in rows])
            ok = np.isfinite(x) & np.isfinite(y)
            if not ok.any():
                continue
            yerr = None
            if err_field:
                yerr = np.array([_num(a.get(err_field)) for a in rows])[ok]
                yerr = np.where(np.isfinite(yerr), yerr, 0.0)
            label = metric_label(name)
            ns = {a.get("n_questions") for a in rows}
            if n_total and ns != {n_total}:
                label += f" (n={'/'.join(str(n) for n in sorted(ns, key=str))})"
            ax.errorbar(x[ok], y[ok], yerr=yerr, color=colors[name], label=label,
                        marker=_MARKERS.get(name, "P"), markersize=6, capsize=3, linewidth=1.5)
            drawn += 1
        ref = _num(dense.get(field)) if field in ("truth_bleu_diff", "mc1") else math.nan
        if math.isfinite(ref):
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="dense")
        chance = _num(dense.get("mc1_chance")) if field == "mc1" else math.nan
        if math.isfinite(chance):
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("executed activation ratio (parameter-weighted)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
    cfg = results.get("config", {}) or {}
    model = cfg.get("model") or (results.get("model") or {}).get("spec", "?")
    fig.suptitle(f"{model} on {cfg.get('dataset', '?')}: {n_total} questions, "
                 f"template '{cfg.get('template', '?')}', policy {cfg.get('policy', '?')}",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, out_dir, "curves")


def normalised_errors(dep: dict) -> dict[str, np.ndarray]:
    """``{"before": gxo_error/bound, "after": corrected_error/bound}`` for samples with bound > 0.

    Keys whose samples are missing are left out; empty dict when the bound is missing.
    """
    samples = (dep or {}).get("error_samples") or {}
    if "bound" not in samples:
        return {}
    bound = np.asarray(samples["bound"], dtype=float)
    out = {}
    for key, name in (("gxo_error", "before"), ("corrected_error", "after")):
        if key in samples:
            err = np.asarray(samples[key], dtype=float)
            n = min(len(err), len(bound))
            e, b = err[:n], bound[:n]
            ok = np.isfinite(e) & np.isfinite(b) & (b > 0)
            out[name] = e[ok] / b[ok]
    return out


def plot_dependency(dep: dict, out_dir: Path) -> list[Path]:
    """Write ``dependency.png`` / ``.svg``; return ``[]`` when no panel has data."""
    ratios = dep.get("ratios")
    change = {k: dep.get(k) for k in ("mlp_change_pct", "heads_change_pct") if dep.get(k)}
    has_change = bool(ratios) and bool(change)
    errors = normalised_errors(dep)
    has_errors = any(len(v) for v in errors.values())
    n_panels = int(has_change) + int(has_errors)
    if not n_panels:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, n_panels, figsize=(6.5 * n_panels, 4.8), squeeze=False)
    axes = list(axes.flat)
    if has_change:
        ax = axes.pop(0)
        style = {"mlp_change_pct": ("MLP neurons", "#1f77b4", "o"),
                 "heads_change_pct": ("attention heads", "#d62728", "s")}
        for key, values in change.items():
            label, color, marker = style[key]
            n = min(len(ratios), len(values))
            ax.plot(ratios[:n], [_num(v) for v in values[:n]], color=color, marker=marker,
                    label=label)
        ax.set_xlabel("activation ratio")
        ax.set_ylabel("attribution score change (%)")
        ax.set_title("Inter-layer dependency: score change after deactivation", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    if has_errors:
        ax = axes.pop(0)
        allv = np.concatenate([v for v in errors.values() if len(v)])
        lo, hi = np.percentile(allv, [1, 99])
        lo, hi = min(lo, -0.6), max(hi, 1.1)
        bins = np.linspace(lo, hi, 50)
        style = {"before": ("GxO: (real - GxO) / bound", "#ff7f0e"),
                 "after": ("corrected: (real - corrected GxO) / bound", "#d62728")}
        for key, values in errors.items():
            label, color = style[key]
            ax.hist(np.clip(values, lo, hi), bins=bins, alpha=0.55, color=color,
                    label=f"{label} (n={len(values)})")
        for x, ls in ((0.0, "-"), (1.0, "-"), (0.5, ":")):
            ax.axvline(x, color="black", linestyle=ls, linewidth=0.8)
        ax.set_xlabel("attribution error / (|x| * ||g||)   (theorem: within [0, 1])")
        ax.set_ylabel("units")
        ax.set_title("First-order attribution error, normalised by the bound", fontsize=11)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out_dir, "dependency")
