"""Tables, frontier and figures of ``attrsparse compare`` (schema: :mod:`.compare`).

``frontier`` entries, one per (model, task, selector)::

    {"model", "task", "selector", "mode", "lowest_ok_ratio", "lowest_ok_executed",
     "highest_failing_ratio", "rank"}

``lowest_ok_ratio`` is the lowest requested ratio from which on (it and every higher ratio) the
selector stays within tolerance of dense; None if it never does. ``rank`` orders the selectors of
a (model, task) by it (1 = sparsest within tolerance; ties share a rank).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..core.figures import metric_colors, pyplot, save_figure
from ..core.io import atomic_write_text
from .tolerance import within_tolerance

CSV_FIELDS = ["model", "task", "selector", "mode", "deployable", "requested_ratio", "read_ratio",
              "read_ratio_p10", "read_ratio_p90", "total_read_ratio", "executed_ratio",
              "executed_ratio_with_decision_cost",
              "executed_ratio_mlp", "executed_ratio_heads", "executed_ratio_kv_heads",
              "primary_metric", "value", "dense_value", "relative_to_dense", "within_tolerance",
              "acc", "acc_norm", "acc_stderr", "mc2", "ppl", "bleu_vs_dense", "n", "n_tokens"]


def _groups(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        out.setdefault((r["model"], r["task"]), {}).setdefault(r["selector"], []).append(r)
    return out


def frontier(records: list[dict], config) -> list[dict]:
    out = []
    for (model, task), by_selector in _groups(records).items():
        entries = []
        for selector, rows in by_selector.items():
            if selector == "dense":
                continue
            rows = sorted(rows, key=lambda r: r["requested_ratio"])
            ok = [within_tolerance(r) for r in rows]
            lowest = None
            for i in range(len(rows) - 1, -1, -1):
                if ok[i]:
                    lowest = rows[i]
                else:
                    break
            failing = [r["requested_ratio"] for r, good in zip(rows, ok) if good is False]
            entries.append({"model": model, "task": task, "selector": selector,
                            "mode": rows[0].get("mode"),
                            "lowest_ok_ratio": lowest["requested_ratio"] if lowest else None,
                            "lowest_ok_read": read_of(lowest) if lowest else None,
                            "lowest_ok_executed": lowest.get("executed_ratio") if lowest else None,
                            "highest_failing_ratio": max(failing) if failing else None})
        keys = sorted({_rank_key(e) for e in entries})
        for e in entries:
            e["rank"] = keys.index(_rank_key(e)) + 1
        out += sorted(entries, key=lambda e: e["rank"])
    return out


def read_of(record: dict) -> float | None:
    """The read ratio of a record (older records without one: the executed ratio, with an online
    rule's decision cost when known)."""
    for key in ("read_ratio", "executed_ratio_with_decision_cost", "executed_ratio"):
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def combined_frontier(records: list[dict]) -> list[dict]:
    """Per (model, selector): the lowest requested ratio from which on every accuracy and perplexity
    task of the model is within tolerance (generation, judged by BLEU against dense, is reported
    beside it, not in it), with its read ratio (the mean over the tasks)."""
    records = [r for r in records if r.get("primary_metric") != "bleu_vs_dense"]
    by_model: dict = {}
    for r in records:
        if r["selector"] != "dense":
            by_model.setdefault((r["model"], r["selector"]), {}).setdefault(r["requested_ratio"], []).append(r)
    tasks = {m: {r["task"] for r in records if r["model"] == m} for m in {r["model"] for r in records}}
    out = []
    for (model, selector), by_ratio in by_model.items():
        lowest = None
        for ratio in sorted(by_ratio, reverse=True):
            rows = by_ratio[ratio]
            if {r["task"] for r in rows} != tasks[model] or not all(within_tolerance(r) for r in rows):
                break
            lowest = ratio
        reads = [read_of(r) for r in by_ratio.get(lowest, []) if read_of(r) is not None]
        out.append({"model": model, "selector": selector, "lowest_ok_ratio": lowest,
                    "lowest_ok_read": sum(reads) / len(reads) if reads else None})
    return sorted(out, key=lambda e: (e["model"], math.inf if e["lowest_ok_read"] is None else e["lowest_ok_read"]))


def _rank_key(entry: dict) -> float:
    return entry["lowest_ok_read"] if entry["lowest_ok_read"] is not None else math.inf


def write_csv(results: dict, out_dir: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in results["records"]:
        writer.writerow({**r, "within_tolerance": within_tolerance(r) if r["selector"] != "dense" else ""})
    return atomic_write_text(Path(out_dir) / "compare.csv", buf.getvalue())


def _fmt(value, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric in ("acc", "mc2"):
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if metric == "ppl" else f"{value:.1f}"


def write_markdown(results: dict, out_dir: Path) -> Path:
    cfg = results["config"]
    lines = ["# Selectors compared side by side", "",
             f"Models: {', '.join(cfg['models'])}. Tasks: {', '.join(cfg['tasks'])}. "
             f"Requested ratios: {', '.join(f'{r:g}' for r in cfg['ratios'])}. "
             f"Items per task: {cfg['limit']} (perplexity: {cfg['max_tokens']} tokens of the test split).",
             "",
             "Each cell is `value (read ratio)`: the fraction of the decoder linears' weights read per "
             "token, mean over every evaluated position (for unit masks: the executed parameters plus "
             "what an online rule computed before skipping a unit; channel rules count the columns "
             "they read). Columns are the requested ratios (the target read ratio of channel rules). "
             "Accuracy in %, measured against "
             "the ground truth; perplexity on WikiText-2 test; **bold** = within tolerance of dense "
             "(accuracy and MC2: 5% relative, perplexity: 10% relative). Every position of every "
             "sequence runs sparse (context included). Modes: `oracle` needs the dense pass and a "
             "backward pass per sequence (the paper's protocol, a bound, not deployable); `online`, "
             "`static` and `predictor` decide masks before the skipped work. Deployable selectors are "
             f"calibrated on {cfg['calib']} ({cfg['calib_sequences']} x {cfg['calib_len']} tokens), "
             "disjoint from the evaluated data.", ""]
    groups = _groups(results["records"])
    for (model, task), by_selector in groups.items():
        dense = by_selector.get("dense", [{}])[0]
        metric = dense.get("primary_metric") or next(iter(by_selector.values()))[0]["primary_metric"]
        lines += [f"## {task} — {model}", "",
                  f"Dense {metric}: {_fmt(dense.get('value'), metric)}"
                  + (f" ± {100 * dense['acc_stderr']:.1f}" if metric == "acc" and dense.get("acc_stderr") else "")
                  + f" (n = {dense.get('n', dense.get('n_tokens', '–'))}).", ""]
        ratios = sorted({r["requested_ratio"] for rows in by_selector.values() for r in rows
                         if r["selector"] != "dense"})
        if not ratios:  # a dense-only run
            continue
        header = ["selector", "mode"] + [f"{r:g}" for r in ratios]
        rows_md = []
        for selector, rows in by_selector.items():
            if selector == "dense":
                continue
            cells = {r["requested_ratio"]: r for r in rows}
            row = [selector, rows[0].get("mode", "")]
            for ratio in ratios:
                r = cells.get(ratio)
                if r is None:
                    row.append("–")
                    continue
                read = read_of(r)
                text = f"{_fmt(r['value'], metric)} ({'–' if read is None else f'{read:.2f}'})"
                row.append(f"**{text}**" if within_tolerance(r) else text)
            rows_md.append(row)
        lines += _table(header, rows_md) + [""]
    if not results["frontier"]:
        return atomic_write_text(Path(out_dir) / "compare.md", "\n".join(lines))
    lines += ["## Frontier: the lowest ratio within tolerance", "",
              "`lowest ok` = the lowest requested ratio from which on the selector stays within "
              "tolerance (read ratio in brackets); `fails at` = the highest ratio where it loses "
              "more than the tolerance. Rank 1 = sparsest read.", ""]
    header = ["model", "task", "selector", "mode", "lowest ok", "fails at", "rank"]
    rows_md = [[f["model"], f["task"], f["selector"], f["mode"] or "",
                "never" if f["lowest_ok_ratio"] is None
                else f"{f['lowest_ok_ratio']:g} ({f['lowest_ok_read']:.2f})",
                "–" if f["highest_failing_ratio"] is None else f"{f['highest_failing_ratio']:g}",
                str(f["rank"])] for f in results["frontier"]]
    lines += _table(header, rows_md) + [""]
    combined = combined_frontier(results["records"])
    if len(results["config"]["tasks"]) > 1 and combined:
        lines += ["## Frontier over every task of a model", "",
                  "The lowest requested ratio from which on *every* accuracy and perplexity task of the "
                  "model stays within tolerance (read ratio: mean over its tasks; generation, judged by "
                  "BLEU against dense, is in its own table above).", ""]
        lines += _table(["model", "selector", "lowest ok", "read"],
                        [[c["model"], c["selector"], "never" if c["lowest_ok_ratio"] is None else f"{c['lowest_ok_ratio']:g}",
                          "–" if c["lowest_ok_read"] is None else f"{c['lowest_ok_read']:.3f}"] for c in combined]) + [""]
    standing = [f for f in results["frontier"] if f["selector"] == "corrected_gxo"]
    if standing:
        n_sel = {(f["model"], f["task"]): 0 for f in results["frontier"]}
        for f in results["frontier"]:
            n_sel[(f["model"], f["task"])] += 1
        lines += ["corrected_gxo's standing: " + "; ".join(
            f"{f['model']}/{f['task']}: rank {f['rank']} of {n_sel[(f['model'], f['task'])]}"
            for f in standing) + ".", ""]
    return atomic_write_text(Path(out_dir) / "compare.md", "\n".join(lines))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _plot(panels: list[tuple[str, list[dict]]], stem: str, title: str, out_dir: Path) -> list[Path]:
    """One panel per ``(name, records)``: each record's primary metric against its read ratio, one
    line per selector (oracle dashed), dense dotted."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    selectors = list(dict.fromkeys(r["selector"] for _, rows in panels for r in rows if r["selector"] != "dense"))
    colors = metric_colors(selectors)
    for ax, (name, rows) in zip(axes[0], panels):
        metric = rows[0]["primary_metric"]
        dense = next((r for r in rows if r["selector"] == "dense"), None)
        for selector in selectors:
            pts = sorted((read_of(r), r["value"]) for r in rows
                         if r["selector"] == selector and r["value"] is not None and read_of(r) is not None)
            if pts:
                mode = next(r.get("mode") for r in rows if r["selector"] == selector)
                ax.plot(*zip(*pts), marker="o", ms=3, color=colors[selector],
                        ls="--" if mode == "oracle" else "-", label=f"{selector} ({mode})")
        if dense is not None and dense["value"] is not None:
            ax.axhline(dense["value"], color="k", lw=0.8, ls=":", label="dense")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("read ratio (decoder linears)")
        ax.set_ylabel(metric)
        if metric == "ppl":
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_dir, stem)


def plot_task(results: dict, task: str, out_dir: Path) -> list[Path]:
    """``<task>.png/.svg``: the task's primary metric against the read ratio, one panel per model."""
    records = [r for r in results["records"] if r["task"] == task]
    models = list(dict.fromkeys(r["model"] for r in records))
    panels = [(m, [r for r in records if r["model"] == m]) for m in models]
    return _plot(panels, task, task, out_dir) if records else []


def plot_model(results: dict, model: str, out_dir: Path) -> list[Path]:
    """``model-<name>.png/.svg``: every task of the model against the read ratio, one panel per task."""
    records = [r for r in results["records"] if r["model"] == model]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    panels = [(t, [r for r in records if r["task"] == t]) for t in tasks]
    stem = "model-" + "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
    return _plot(panels, stem, model, out_dir) if records else []
