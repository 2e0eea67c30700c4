"""Figures and markdown tables of ``attrsparse bench``: the unit modes (schema: :mod:`.bench`) and the
engine bench (schema: :mod:`.engine_bench`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.figures import num as _num
from ..core.figures import metric_colors, pyplot, save_figure
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


# -- the engine bench (attrsparse.evaluation.engine_bench) -------------------------------------------

ENGINE_STYLES = {"native": "-", "hf": "--", "llamacpp": ":"}
SELECTOR_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def plot_engine_bench(results: dict, out_dir: Path) -> list[Path]:
    """``bench.png/.svg``: decode tokens/s against the read ratio of the decoder linears, one line per
    engine, precision and selector (through that engine's dense point); points outside the quality
    tolerance hollow, each selector's quality frontier a vertical dotted line."""
    plt = pyplot()
    records = [r for r in results["records"] if math.isfinite(_num(r.get("decode_tokens_per_s")))]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pairs = list(dict.fromkeys((r["engine"], r["precision"]) for r in records))
    colors = metric_colors([f"{e}-{p}" for e, p in pairs])
    selectors = list(dict.fromkeys(r["selector"] for r in results["records"]))
    markers = {s: SELECTOR_MARKERS[i % len(SELECTOR_MARKERS)] for i, s in enumerate(selectors)}
    for engine, precision in pairs:
        rows = [r for r in records if (r["engine"], r["precision"]) == (engine, precision)]
        dense = [r for r in rows if r["selector"] == "dense"]
        color = colors[f"{engine}-{precision}"]
        weights = rows[0].get("weights") or precision
        for selector in dict.fromkeys(r["selector"] for r in rows):
            line = sorted(dense + [r for r in rows if r["selector"] == selector and selector != "dense"],
                          key=lambda r: _num(r.get("read_ratio")))
            if selector == "dense" and len(dict.fromkeys(r["selector"] for r in rows)) > 1:
                continue  # dense is drawn with every selector's line
            label = f"{engine} {weights}" + ("" if selector == "dense" else f", {selector}")
            ax.plot([_num(r.get("read_ratio")) for r in line], [_num(r["decode_tokens_per_s"]) for r in line],
                    ENGINE_STYLES.get(engine, "-"), color=color, lw=1.2, label=label)
            for r in line:
                hollow = r.get("within_tolerance") is False
                ax.errorbar(_num(r.get("read_ratio")), _num(r["decode_tokens_per_s"]),
                            yerr=[[_num(r["decode_tokens_per_s"]) - _num(r.get("decode_tokens_per_s_min"))],
                                  [_num(r.get("decode_tokens_per_s_max")) - _num(r["decode_tokens_per_s"])]],
                            marker=markers[r["selector"]], color=color, mfc="white" if hollow else color, ms=6,
                            capsize=2, lw=0.8)
    for selector, entry in (results.get("frontier") or {}).items():
        if entry is None:
            continue
        xs = [_num(r.get("read_ratio")) for r in records
              if r["selector"] == selector and r["requested_ratio"] == entry["requested_ratio"]]
        x = min((v for v in xs if math.isfinite(v)), default=entry["requested_ratio"])
        ax.axvline(x, color="#7f7f7f", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], f" {selector} quality frontier", rotation=90, va="top", fontsize=7)
    proto = results["protocol"]
    ax.set(xlabel="read ratio (weights of the decoder linears read per token / dense)",
           ylabel="decode tokens/s (median, min-max)",
           title=f"{Path(str(results['config']['model'])).name}: batch 1, {proto['threads']} threads, {proto['new_tokens']} tokens, "
                 f"{proto['rounds']} rounds")
    ax.legend(fontsize=7)
    ax.text(0.99, 0.01, "hollow: outside the quality tolerance", transform=ax.transAxes, ha="right", fontsize=6)
    return save_figure(fig, out_dir, "bench")


def write_engine_bench_markdown(results: dict, out_dir: Path) -> Path:
    cfg, proto = results["config"], results["protocol"]
    task = cfg["task"]
    lines = [f"# Decode speed on {cfg['model']}: engines, precisions, channel selectors", "",
             f"Command: `{results.get('command')}`", "",
             f"Batch 1, {proto['threads']} threads, {proto['new_tokens']} greedy tokens after a {proto['warmup']}-token "
             f"warm-up, the same {len(proto['prompt_ids'])} prompt tokens for all (prompt processing excluded); every "
             f"contender a fresh process, {proto['rounds']} rounds with the order rotated; medians [min-max]. "
             "Speed-ups: median over rounds of the ratio within each round. Ideal: dense bytes of weights read "
             "per token / this contender's (same engine and precision). The native engine keeps its KV cache in "
             "fp32 with fp32 weights and in bf16 with bf16 and int8 weights (`kv_cache` in bench.json). "
             "Floor: read bandwidth "
             f"({_fmt(results['bandwidth_read_gbs'], 1)} GB/s at {proto['threads']} threads) / bytes read per token. "
             f"Quality ({task} accuracy on {cfg['task_items']} items, WikiText-2 perplexity on {cfg['ppl_tokens']} "
             "tokens): " + (results.get("quality_source") or "not measured") + ".", "",
             "| engine | weights | selector | ratio | read | total read | tok/s | vs dense | ideal | vs llama.cpp | "
             f"floor tok/s | peak RSS MB | ppl | {task} | note |", "|" + "---|" * 15]
    for r in results["records"]:
        speed = "–" if r.get("decode_tokens_per_s") is None else (
            f"{_fmt(r['decode_tokens_per_s'], 1)} [{_fmt(r.get('decode_tokens_per_s_min'), 1)}-"
            f"{_fmt(r.get('decode_tokens_per_s_max'), 1)}]")
        note = r.get("skipped") or ("; ".join(r.get("errors") or []))
        lines.append("| " + " | ".join([
            r["engine"], r.get("weights") or r["precision"], r["selector"], f"{r['requested_ratio']:g}",
            _fmt(r.get("read_ratio"), 3), _fmt(r.get("total_read_ratio"), 3), speed, _fmt(r.get("speedup_vs_dense")),
            _fmt(r.get("ideal_speedup")), _fmt(r.get("speedup_vs_llamacpp")), _fmt(r.get("floor_tokens_per_s"), 1),
            _fmt(r.get("peak_rss_mb"), 0), _fmt(r.get("wikitext2_ppl")), _fmt(100 * _num(r.get("task_acc")), 1),
            note.replace("|", "/")]) + " |")
    lines += ["", "Quality frontier (lowest requested ratio from which on the task accuracy stays within 5% and "
              "perplexity within 10% of dense):", ""]
    for selector, entry in (results.get("frontier") or {}).items():
        lines.append(f"- {selector}: " + ("none of the measured ratios" if entry is None else
                                          f"{entry['requested_ratio']:g} (read ratio {_fmt(entry['quality_read_ratio'], 3)})"))
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return atomic_write_text(Path(out_dir) / "bench.md", "\n".join(lines) + "\n")
