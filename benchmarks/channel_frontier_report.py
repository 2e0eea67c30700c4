"""Collect the records of the issue-14 compare runs (``runs/channels/*``, each an ``attrsparse
compare`` folder, possibly stopped before its end) into ``docs/results/channels/records.jsonl``
and draw perplexity and accuracy against read ratio per model and rule (``frontier_<model>.png``).

    .venv/bin/python benchmarks/channel_frontier_report.py [--runs runs/channels] [--out docs/results/channels]

A run folder whose name ends in ``-per-consumer`` was made with ``ATTR["per_consumer"] = True``
and is labelled ``attr_channel (per consumer)``; the runs of :data:`SHARED_RUNS` were made before
per-projection decisions became the default (2026-12-07) and are labelled ``attr_channel (shared)``,
those of :data:`C_RUNS` before X (``x_weight=2``) became the default, ``attr_channel C (x_weight 0)``.
Records of runs no longer under ``--runs`` are kept from the existing ``records.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from attrsparse.evaluation.tolerance import BLEU_VS_DENSE_FLOOR, LOWER_IS_BETTER, TOLERANCE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PPL_TOP = 12.0  # perplexity axes end at this multiple of dense; higher points are drawn at the edge, named in the legend
SHARED_RUNS = {"smollm2", "smollm2-ppl-hi", "smollm2-tasks", "gemma3", "gemma3-hi", "gemma3-arc", "qwen"}
#: runs of per-projection attr_channel before X (x_weight=2) became the default (third session of 2026-12-07)
C_RUNS = {"smollm2-pc", "smollm2-pc-arc", "smollm2-pc-sciq", "smollm2-tqa", "gemma3-pc", "qwen-pc"}
C_LABEL = "attr_channel C (x_weight 0)"
METRIC = {"wikitext2": "ppl", "truthfulqa_gen": "bleu_vs_dense"}


def label(run: str, rule: str | None) -> str | None:
    if rule not in ("attr_channel", C_LABEL):
        return rule
    return ("attr_channel (per consumer)" if run.endswith("-per-consumer") else
            "attr_channel (shared)" if run in SHARED_RUNS else
            C_LABEL if run in C_RUNS else "attr_channel")


def collect(runs: Path) -> list[dict]:
    rows = []
    for f in sorted(runs.glob("*/records/*/*/*.json")):
        run = f.relative_to(runs).parts[0]
        d = json.loads(f.read_text().replace("NaN", "null"))
        rows.append({"run": run, "model": d.get("model"), "task": d.get("task"), "rule": label(run, d.get("selector")),
                     **{k: d.get(k) for k in ("requested_ratio", "read_ratio", "read_ratio_p10", "read_ratio_p90",
                                              "total_read_ratio", "ppl", "n_tokens", "acc", "acc_stderr", "n",
                                              "bleu_vs_dense")}})
    return rows


def merge(new: list[dict], old_file: Path) -> list[dict]:
    """``new`` plus the rows of ``old_file`` from runs that ``new`` does not hold (relabelled)."""
    if not old_file.is_file():
        return new
    have = {r["run"] for r in new}
    old = [json.loads(line) for line in old_file.read_text().splitlines() if line.strip()]
    kept = [{**r, "rule": label(r["run"], r["rule"])} for r in old if r["run"] not in have]
    return sorted(kept + new, key=lambda r: (r["run"], r["task"] or "", r["rule"] or "", r["requested_ratio"] or 0))


def plot(rows: list[dict], out: Path) -> list[Path]:
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        tasks = sorted({r["task"] for r in mine})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            pts = [r for r in mine if r["task"] == task]
            metric = METRIC.get(task, "acc")
            dense = [r[metric] for r in pts if r["rule"] == "dense"]
            top = dense[0] * PPL_TOP if metric == "ppl" and dense else None  # perplexity axis: up to this
            for rule in sorted({r["rule"] for r in pts if r["rule"] != "dense"}):
                line = sorted({(r["read_ratio"], r.get(metric)) for r in pts if r["rule"] == rule and r.get(metric) is not None})
                off = [(x, y) for x, y in line if top is not None and y > top]
                name = rule + "".join(f" ({y:.3g} at {x:.2f}: off the axis)" for x, y in off)
                ax.plot([x for x, _ in line], [min(y, top) if top else y for _, y in line], "o-", label=name)
            if metric == "bleu_vs_dense":
                ax.axhline(BLEU_VS_DENSE_FLOOR, color="k", lw=1, ls="--", label=f"tolerance (BLEU {BLEU_VS_DENSE_FLOOR:g})")
            elif dense:
                ax.axhline(dense[0], color="k", lw=1, label="dense")
                sign = 1 if metric in LOWER_IS_BETTER else -1
                ax.axhline(dense[0] * (1 + sign * TOLERANCE[metric]), color="k", lw=1, ls="--",
                           label=f"tolerance ({TOLERANCE[metric]:.0%} of dense)")
            ax.set_xlabel("read ratio (decoder linears)")
            ax.set_ylabel({"ppl": "WikiText-2 test perplexity", "bleu_vs_dense": "BLEU against dense"}.get(
                metric, f"{task} accuracy"))
            if metric == "ppl":
                ax.set_yscale("log")
            ax.set_title(f"{model}: {task}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"frontier_{model}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/channels")
    ap.add_argument("--out", default="docs/results/channels")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = merge(collect(Path(args.runs)), out / "records.jsonl")
    with open(out / "records.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for path in plot(rows, out):
        print(path)


if __name__ == "__main__":
    main()
