"""Figure and markdown table of ``attrsparse bench`` (schema: :mod:`.bench`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.figures import num as _num
from ..core.figures import pyplot, save_figure
from ..core.io import atomic_write_text

COLORS = {"dense": "#000000", "static": "#1f77b4", "predictor": "#d62728", "oracle": "#2ca02c"}


def plot_bench(results: dict, out_dir: Path) -> list[Path]:
    """``bench.png/.svg``: (a) speed-up and ideal speed-up, (b) quality relative to dense, both
    against the executed parameter-weighted ratio."""
    plt = pyplot()

    records = results["records"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in dict.fromkeys(r["mode"] for r in records):
        if mode == "dense":
            continue
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: _num(r.get("executed_ratio")))
        x = [_num(r.get("executed_ratio")) for r in rows]
        color = COLORS.get(mode, "#7f7f7f")
        if any(math.isfinite(_num(r.get("speedup"))) for r in rows if r["mode"] != "oracle"):
            ax1.plot(x, [_num(r.get("speedup")) for r in rows], "o-", color=color, label=f"{mode} measured")
            ax1.plot(x, [_num(r.get("ideal_speedup")) for r in rows], "x--", color=color, label=f"{mode} ideal")
        for key, style in (("mc1_relative", "o-"), ("task_acc_relative", "s-"), ("wikitext2_ppl_relative", "^:")):
            y = [_num(r.get(key)) for r in rows]
            if key == "wikitext2_ppl_relative":
                y = [1 / v if v and math.isfinite(v) else math.nan for v in y]
            ax2.plot(x, y, style, color=color, ms=4, label=f"{mode} {key.replace('_relative', '')}")
    ax1.axhline(1.0, color="k", lw=0.8, ls=":")
    ax1.set(xlabel="executed parameter-weighted ratio", ylabel="decode speed-up vs dense",
            title="speed (batch %s, %s threads)" % (results["config"]["batch_size"], results["machine"]["threads"]))
    ax2.axhline(0.95, color="k", lw=0.8, ls=":")
    ax2.set(xlabel="executed parameter-weighted ratio", ylabel="relative to dense (ppl: dense/ppl)",
            title="quality (held-out)")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6, ncol=2)
    return save_figure(fig, out_dir, "bench")


def _fmt(v, nd=2) -> str:
    v = _num(v)
    return f"{v:.{nd}f}" if math.isfinite(v) else "–"


def write_bench_markdown(results: dict, out_dir: Path) -> Path:
    cfg = results["config"]
    task = cfg["task"]
    lines = [f"# Deployable sparsity on {cfg['model']}: speed and quality", "",
             f"Decode speed: batch {cfg['batch_size']}, {cfg['new_tokens']} new tokens on "
             f"{cfg['speed_prompts']} prompts, {cfg['dtype']}, {results['machine']['threads']} threads; "
             f"median of {cfg['repeats']} runs after a warm-up, dense timed alternately in the same record "
             "(tok/s across rows depends on the machine's load at the time; the speed-ups are paired). "
             "Ideal = dense multiply-adds per token / the mode's (LM head and predictor included). "
             f"Quality: BLEU vs dense on {cfg['gen_questions']} TruthfulQA questions, MC1 on "
             f"{cfg['mc1_items']}, {task} accuracy on {cfg['task_items']} (ground truth), WikiText-2 "
             f"test perplexity on {cfg['ppl_tokens']} tokens.", "",
             "| mode | ratio | executed | tok/s | speed-up | ideal | achieved/ideal | peak RSS MB | BLEU vs dense | MC1 | "
             f"{task} | ppl |", "|" + "---|" * 12]
    for r in results["records"]:
        lines.append("| " + " | ".join([
            r["mode"], f"{r['requested_ratio']:g}", _fmt(r.get("executed_ratio")),
            _fmt(r.get("decode_tokens_per_s"), 1), _fmt(r.get("speedup")), _fmt(r.get("ideal_speedup")),
            _fmt(r.get("achieved_over_ideal")), _fmt(r.get("peak_rss_mb"), 0), _fmt(r.get("bleu_vs_dense"), 1),
            _fmt(100 * _num(r.get("mc1")), 1), _fmt(100 * _num(r.get("task_acc")), 1),
            _fmt(r.get("wikitext2_ppl"))]) + " |")
    lines += ["", "Quality frontier (lowest requested ratio from which on MC1 and the task stay within "
              "5% and perplexity within 10% of dense):", ""]
    for mode, entry in results["frontier"].items():
        lines.append(f"- {mode}: " + ("none of the measured ratios" if entry is None else
                                      f"{entry['requested_ratio']:g} (executed {_fmt(entry['executed_ratio'])})"))
    return atomic_write_text(Path(out_dir) / "bench.md", "\n".join(lines) + "\n")
