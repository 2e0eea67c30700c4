"""Collect the records of the issue-14 compare runs (``runs/channels/*``, each an ``attrsparse
compare`` folder, possibly stopped before its end) into ``docs/results/channels/records.jsonl``
and draw perplexity and accuracy against read ratio per model and rule (``frontier_<model>.png``).

    .venv/bin/python benchmarks/channel_frontier_report.py [--runs runs/channels] [--out docs/results/channels]

A run folder whose name ends in ``-per-consumer`` was made with ``ATTR["per_consumer"] = True``
and is labelled ``attr_channel (per consumer)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from attrsparse.evaluation.tolerance import LOWER_IS_BETTER, TOLERANCE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def collect(runs: Path) -> list[dict]:
    rows = []
    for f in sorted(runs.glob("*/records/*/*/*.json")):
        run = f.relative_to(runs).parts[0]
        d = json.loads(f.read_text().replace("NaN", "null"))
        label = d.get("selector")
        if run.endswith("-per-consumer") and label == "attr_channel":
            label = "attr_channel (per consumer)"
        rows.append({"run": run, "model": d.get("model"), "task": d.get("task"), "rule": label,
                     **{k: d.get(k) for k in ("requested_ratio", "read_ratio", "read_ratio_p10", "read_ratio_p90",
                                              "total_read_ratio", "ppl", "n_tokens", "acc", "acc_stderr", "n")}})
    return rows


def plot(rows: list[dict], out: Path) -> list[Path]:
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        tasks = sorted({r["task"] for r in mine})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            pts = [r for r in mine if r["task"] == task]
            metric = "ppl" if task == "wikitext2" else "acc"
            dense = [r[metric] for r in pts if r["rule"] == "dense"]
            for rule in sorted({r["rule"] for r in pts if r["rule"] != "dense"}):
                line = sorted({(r["read_ratio"], r[metric]) for r in pts if r["rule"] == rule})
                ax.plot([x for x, _ in line], [y for _, y in line], "o-", label=rule)
            if dense:
                ax.axhline(dense[0], color="k", lw=1, label="dense")
                sign = 1 if metric in LOWER_IS_BETTER else -1
                ax.axhline(dense[0] * (1 + sign * TOLERANCE[metric]), color="k", lw=1, ls="--",
                           label=f"tolerance ({TOLERANCE[metric]:.0%} of dense)")
            ax.set_xlabel("read ratio (decoder linears)")
            ax.set_ylabel("WikiText-2 test perplexity" if metric == "ppl" else f"{task} accuracy")
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
    rows = collect(Path(args.runs))
    with open(out / "records.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for path in plot(rows, out):
        print(path)


if __name__ == "__main__":
    main()
