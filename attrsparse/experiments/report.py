"""Markdown report and CSV for a sweep's ``results.json`` (written by ``attrsparse sweep``).

``results.json`` schema (``schema_version`` 1)::

    {
     "schema_version": 1,
     "config": {"model": str, "dataset": str, "template": "chat"|"paper"|"qa", "metrics": [...],
                "ratios": [...], "scope": str, "limit": int, "offset": int,
                "max_new_tokens": int, "dtype": str, "ig_steps": int, "ig_questions": int|null,
                "mask_prefill": bool, "seed": int, ...},
     "versions": {"attrsparse": str, "torch": str, "transformers": str},
     "model": {"spec": str, "units": {...UnitMap.summary(), incl. "attention_share_of_maskable"}},
     "data": {"path": str, "sha256": str, "n_questions": int},
     "questions": [{"index": int, "question": str, "dense_text": str, "dense_tokens": int, ...}],
     "dense": {"truth_bleu_diff": float, "truth_rougeL_diff": float, "truth_bleu_acc": float,
               "mc1": float, "n_questions": int},
     "aggregates": [{"metric": str, "requested_ratio": float,
                     "executed_ratio": float,        # parameter-weighted
                     "executed_ratio_mlp": float, "executed_ratio_heads": float,
                     "bleu_vs_dense": float, "bleu_vs_dense_stderr": float,
                     "rougeL_vs_dense": float, "rougeL_vs_dense_stderr": float,
                     "truth_bleu_diff": float, "truth_rougeL_diff": float,
                     "truth_bleu_acc": float, "mc1": float|null, "n_questions": int}, ...]
    }

Ratios are activation ratios (fraction kept); the ratio-1.0 rows are the dense reference. The
optional dependency analysis (:func:`attrsparse.experiments.plots.plot_dependency`) is a dict with
``ratios``, ``mlp_change_pct``, ``heads_change_pct`` and ``error_samples`` =
``{"gxo_error", "corrected_error", "bound"}``; any key may be missing.

:func:`write_report` writes ``report.md``, :func:`write_csv` writes ``results.csv``; both
atomically. :func:`ordering_agreement` checks a set of scores against the paper's ordering.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..core.io import atomic_write_text
from .plots import _metric_order, _num, metric_label, normalised_errors

__all__ = ["write_report", "write_csv", "table2", "ordering_agreement", "Agreement",
           "PAPER_TABLE2", "PAPER_RANK"]

#: The paper's Table 2 (Phi-2, TruthfulQA, BLEU vs dense output, official corpus BLEU);
#: paper-notes §7.4. Keys are the paper's reported ARs (its own accounting, §6).
PAPER_AR = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
PAPER_TABLE2 = {
    "gradient": (5.8, 5.4, 5.7, 5.2, 5.0, 5.2, 5.6, 98.0),
    "magnitude": (24.6, 43.9, 50.1, 58.4, 62.2, 67.3, 84.6, 98.0),
    "snip": (18.7, 34.1, 45.1, 51.6, 60.2, 67.7, 82.1, 98.0),
    "ig": (56.0, 66.8, 72.4, 74.6, 74.5, 72.0, 70.7, 98.0),
    "gxo": (58.9, 69.0, 71.9, 74.9, 71.8, 70.0, 72.5, 98.0),
    "corrected_gxo": (85.5, 92.0, 93.6, 94.7, 95.1, 96.3, 98.0, 98.0),
}
#: The paper's claimed ordering "corrected GxO > GxO ≈ IG > magnitude > SNIP >> gradient"
#: (lower rank = better; equal ranks are a tie that agrees either way).
PAPER_RANK = {"corrected_gxo": 0, "gxo": 1, "ig": 1, "magnitude": 2, "snip": 3, "gradient": 4}
PAPER_ORDER_TEXT = "corrected GxO > GxO ≈ IG > magnitude > SNIP >> gradient"

_TEMPLATES = {
    "chat": "`chat`: the tokenizer's chat template, the question as one user turn",
    "paper": "`paper`: the paper's raw prompt `Instruct: {question}\\nOutput:`",
    "qa": "`qa`: `Q: {question}\\nA:`",
}
_DASH = "–"


class Agreement(NamedTuple):
    verdict: str  # "agrees" | "partly agrees (k of n pairs)" | "disagrees" | "not comparable"
    agree: int
    pairs: int


def ordering_agreement(scores: dict[str, float]) -> Agreement:
    """Pairwise agreement of ``{metric: score}`` (higher = better) with :data:`PAPER_RANK`.

    Only the paper's six metrics count; NaN/None scores are ignored. A pair the paper ranks
    differently agrees when the observed scores are strictly in the paper's order (an observed
    tie does not agree); the GxO/IG pair (paper: ≈) agrees either way.
    """
    present = [m for m in PAPER_RANK if m in scores and math.isfinite(_num(scores[m]))]
    agree = pairs = 0
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            pairs += 1
            ra, rb = PAPER_RANK[a], PAPER_RANK[b]
            sa, sb = _num(scores[a]), _num(scores[b])
            agree += (ra == rb) or (sa != sb and (sa > sb) == (ra < rb))
    if pairs == 0:
        return Agreement("not comparable", 0, 0)
    if agree == pairs:
        return Agreement("agrees", agree, pairs)
    if agree == 0:
        return Agreement("disagrees", agree, pairs)
    return Agreement(f"partly agrees ({agree} of {pairs} pairs)", agree, pairs)


def _fmt(value, nd: int = 1) -> str:
    v = _num(value)
    return f"{v:.{nd}f}" if math.isfinite(v) else _DASH


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.4g}%"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _grid(results: dict) -> tuple[list[float], list[str], dict]:
    """Sorted requested ratios, metrics in display order, ``{(metric, ratio): aggregate}``."""
    aggs = results.get("aggregates", [])
    cells = {(a["metric"], round(float(a["requested_ratio"]), 6)): a for a in aggs}
    ratios = sorted({r for _, r in cells})
    return ratios, _metric_order([a["metric"] for a in aggs]), cells


def table2(results: dict, field: str = "bleu_vs_dense", err_field: str | None = None,
           nd: int = 1) -> tuple[list[str], list[list[str]]]:
    """Table in the layout of the paper's Table 2: rows = metrics, columns = requested ratios.

    Returns ``(header, rows)``; header = ``["Metric", "10%", ..., "100%", "n"]``; a cell is the
    aggregate's ``field`` (``± err_field`` when given), ``–`` when missing.
    """
    ratios, metrics, cells = _grid(results)
    header = ["Metric"] + [_pct(r) for r in ratios] + ["n"]
    rows = []
    for m in metrics:
        row = [metric_label(m)]
        for r in ratios:
            a = cells.get((m, r))
            cell = _fmt(a.get(field), nd) if a else _DASH
            if a and err_field and math.isfinite(_num(a.get(err_field))):
                cell += f" ± {_fmt(a.get(err_field), nd)}"
            row.append(cell)
        ns = sorted({str(cells[(m, r)].get("n_questions")) for r in ratios if (m, r) in cells})
        row.append("/".join(ns))
        rows.append(row)
    return header, rows


def _executed_table(results: dict) -> str:
    ratios, metrics, cells = _grid(results)
    rows = []
    for m in metrics:
        row = [metric_label(m)]
        for r in ratios:
            a = cells.get((m, r))
            row.append(_DASH if not a else f"{_fmt(a.get('executed_ratio'), 3)} "
                       f"({_fmt(a.get('executed_ratio_mlp'), 2)} / "
                       f"{_fmt(a.get('executed_ratio_heads'), 2)})")
        rows.append(row)
    return _md_table(["Metric"] + [_pct(r) for r in ratios], rows)


def _paper_table() -> str:
    rows = [[metric_label(m)] + [f"{v:.1f}" for v in vals] for m, vals in PAPER_TABLE2.items()]
    return _md_table(["Metric (paper)"] + [f"AR={_pct(r)}" for r in PAPER_AR], rows)


def _ranking_section(results: dict) -> list[str]:
    ratios, metrics, cells = _grid(results)
    out, agree, pairs = [], 0, 0
    for r in ratios:
        if r >= 1.0:
            continue
        scores = {m: cells[(m, r)].get("bleu_vs_dense") for m in metrics if (m, r) in cells}
        scores = {m: s for m, s in scores.items() if math.isfinite(_num(s))}
        order = sorted(scores, key=lambda m: -_num(scores[m]))
        res = ordering_agreement(scores)
        agree, pairs = agree + res.agree, pairs + res.pairs
        text = " > ".join(f"{metric_label(m)} {_fmt(scores[m])}" for m in order)
        out.append(f"- **{_pct(r)}**: {text} — {res.verdict} with the paper's ordering.")
    if pairs:
        verdict = ("agrees" if agree == pairs else "disagrees" if agree == 0
                   else f"partly agrees ({agree} of {pairs} pairs)")
        out.append(f"\nOver all ratios the observed ordering **{verdict}** with the paper's "
                   f"ordering \"{PAPER_ORDER_TEXT}\".")
    paper = [f"{_pct(r)}: {ordering_agreement(dict(zip(PAPER_TABLE2, col))).verdict}"
             for r, col in zip(PAPER_AR[:-1], list(zip(*PAPER_TABLE2.values()))[:-1])]
    out.append("For reference, the same check on the paper's own Table 2 gives: "
               + "; ".join(paper) + " (magnitude and SNIP overtake GxO/IG at high AR).")
    return out


def _dependency_section(dep: dict) -> list[str]:
    out = ["## Dependency analysis", ""]
    ratios = dep.get("ratios") or []
    mlp, heads = dep.get("mlp_change_pct") or [], dep.get("heads_change_pct") or []
    if ratios and (mlp or heads):
        rows = [[f"{r:g}", _fmt(mlp[i] if i < len(mlp) else None),
                 _fmt(heads[i] if i < len(heads) else None)] for i, r in enumerate(ratios)]
        out += ["Relative attribution-score change of the units that stay active after "
                "deactivation (the paper's Fig. 5, right):", "",
                _md_table(["activation ratio", "MLP change (%)", "heads change (%)"], rows), ""]
    errs = normalised_errors(dep)
    if errs:
        rows = []
        for key, label, lo, hi in (("before", "GxO: real − GxO", 0.0, 1.0),
                                   ("after", "corrected: real − corrected GxO", -0.5, 0.5)):
            v = errs.get(key)
            if v is None or not len(v):
                continue
            inside = float(np.mean((v >= lo) & (v <= hi)))
            rows.append([label, str(len(v)), f"{v.mean():.3f}", f"{v.std():.3f}",
                         f"{np.mean((v >= 0) & (v <= 1)):.1%}", f"[{lo:g}, {hi:g}]: {inside:.1%}"])
        out += ["First-order attribution error (real loss change minus prediction), normalised "
                "by the theorem's bound |x|·‖g‖. The theorem claims 0 ≤ error ≤ bound; the "
                "correction adds half the bound, so after it the claim becomes [−½, ½].", "",
                _md_table(["error", "units", "mean", "std", "within [0, bound]",
                           "within claimed interval"], rows), ""]
    if len(out) == 2:
        out += ["No dependency data.", ""]
    out += ["![dependency](dependency.png)", ""]
    return out


def write_csv(results: dict, out_dir: Path) -> Path:
    """Write ``results.csv``: one row per (metric, ratio) with every aggregate field."""
    aggs = results.get("aggregates", [])
    fields = list(dict.fromkeys(k for a in aggs for k in a))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for a in aggs:
        writer.writerow({k: ("" if a.get(k) is None else a.get(k)) for k in fields})
    return atomic_write_text(Path(out_dir) / "results.csv", buf.getvalue())


def write_report(results: dict, out_dir: Path, dependency: dict | None = None) -> Path:
    """Write ``report.md`` into ``out_dir`` (atomically) and return its path."""
    cfg = results.get("config", {}) or {}
    dense = results.get("dense", {}) or {}
    data = results.get("data", {}) or {}
    units = (results.get("model") or {}).get("units", {}) or {}
    versions = results.get("versions", {}) or {}
    n = dense.get("n_questions") or data.get("n_questions")
    model = cfg.get("model") or (results.get("model") or {}).get("spec", "?")
    template = cfg.get("template", "?")
    ns = {a.get("n_questions") for a in results.get("aggregates", [])}
    L = [f"# Sparse activation report: {model} on {cfg.get('dataset', '?')}", ""]
    L += ["## What was measured", "",
          "- **Fidelity (the paper's measure)**: BLEU and ROUGE-L of the masked model's greedy "
          "output against the *dense model's own greedy output* for the same question. BLEU is "
          "effective-order sentence BLEU, so identical texts score 100 (the official "
          "`corpus_bleu` scores identical answers shorter than 4 words as 0, which is why the "
          "paper's dense column reads 98.0).",
          "- **Truthfulness**: TruthfulQA's generation metric against its reference answers: "
          "truth BLEU diff = max BLEU over correct references − max BLEU over incorrect ones.",
          "- **MC1**: multiple-choice accuracy, choice picked by log-likelihood.", ""]
    ig_q = cfg.get("ig_questions")
    L += ["## Configuration", "",
          f"- Model: `{model}` (spec `{(results.get('model') or {}).get('spec', '?')}`), "
          f"dtype {cfg.get('dtype', '?')}",
          f"- Prompt template: {_TEMPLATES.get(template, f'`{template}`')}",
          f"- Dataset: {cfg.get('dataset', '?')} (`{data.get('path', '?')}`, sha256 "
          f"`{str(data.get('sha256', '?'))[:16]}…`), {n} questions (offset "
          f"{cfg.get('offset', 0)}, limit {cfg.get('limit', '?')})",
          f"- Metrics: {', '.join(cfg.get('metrics', []))}; ratios: "
          f"{', '.join(f'{r:g}' for r in cfg.get('ratios', []))}; selection scope "
          f"`{cfg.get('scope', '?')}`",
          f"- IG steps: {cfg.get('ig_steps', '?')}"
          + (f"; IG on only {ig_q} questions" if ig_q and n and ig_q < n else ""),
          f"- max_new_tokens {cfg.get('max_new_tokens', '?')}, seed {cfg.get('seed', '?')}, "
          f"mask_prefill {cfg.get('mask_prefill', False)}",
          "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    share = _num(units.get("attention_share_of_maskable"))
    prefill = ("the whole prompt is masked with the first row" if cfg.get("mask_prefill")
               else "the prompt runs dense except its last position, which produces the first "
               "generated token and is masked")
    L += ["## Accounting", "",
          "The *executed* activation ratio is the parameter-weighted fraction of attention and "
          "MLP parameters that really ran, averaged over every layer and every generated token "
          "(embeddings and LM head excluded). Attention and MLP are weighted by their real "
          f"parameter counts: attention is {_fmt(100 * share)}% of the maskable parameters, the "
          f"MLP the rest. Prefill: {prefill}. Columns below are the *requested* ratios; the "
          "executed ratios are in their own table and on the x axis of the plots.", ""]
    h, rows = table2(results, "bleu_vs_dense", "bleu_vs_dense_stderr")
    L += ["## Table 2 layout: BLEU vs dense output (± stderr)", "", _md_table(h, rows), "",
          "Executed activation ratio, parameter-weighted (MLP / heads):", "",
          _executed_table(results), "",
          "The paper's own Table 2 (Phi-2 on TruthfulQA, official corpus BLEU, ARs under the "
          "paper's accounting, which overstates sparsity — only 24 of 32 layers and no prefill "
          "masked; so its columns are not the same x as ours):", "", _paper_table(), ""]
    dense_col = [r[-2] for r in rows] if rows and h[-2] == "100%" else []
    if dense_col and any(c.split(" ")[0] != "100.0" for c in dense_col):
        L += [f"**Warning**: the ratio-1.0 column is not 100 for every metric: "
              f"{', '.join(dense_col)}.", ""]
    empty = sum(a.get("empty_vs_empty") or 0 for a in results.get("aggregates", []))
    if empty:
        L += [f"**Note**: {empty} answer pair(s) were empty on both sides (dense and masked); BLEU and "
              "ROUGE-L are undefined for them and left out of the means (`empty_vs_empty` in "
              "results.json).", ""]
    h, rows = table2(results, "rougeL_vs_dense", "rougeL_vs_dense_stderr")
    L += ["## ROUGE-L vs dense output (± stderr)", "", _md_table(h, rows), ""]
    L += ["## Truthfulness", "",
          f"Dense model: truth BLEU diff {_fmt(dense.get('truth_bleu_diff'))}, truth ROUGE-L "
          f"diff {_fmt(dense.get('truth_rougeL_diff'))}, truth BLEU acc "
          f"{_fmt(dense.get('truth_bleu_acc'), 3)}, MC1 {_fmt(dense.get('mc1'), 3)}.", "",
          "Truth BLEU diff (max correct − max incorrect):", "",
          _md_table(*table2(results, "truth_bleu_diff")), "", "MC1 accuracy:", "",
          _md_table(*table2(results, "mc1", nd=3)), ""]
    L += ["## Ranking", "", f"Paper's ordering: {PAPER_ORDER_TEXT}. Pairs among the paper's six "
          "metrics present are compared; GxO ≈ IG agrees either way.", ""]
    L += _ranking_section(results) + [""]
    L += ["## Statistical noise", "",
          "Per-question BLEU against the dense output is nearly bimodal (about 0 or about 100), "
          "so means move in large steps; the stderr is shown next to each value. With fewer "
          "than 100 questions, differences of a few stderr are noise."
          + (f" This run has {n} questions." if n else "")
          + (f" Question counts differ between metrics ({', '.join(map(str, sorted(ns, key=str)))}"
             "), see column n." if len(ns) > 1 else ""), ""]
    if dependency is not None:
        L += _dependency_section(dependency)
    L += ["## Figures", "", "![curves](curves.png)", ""]
    return atomic_write_text(Path(out_dir) / "report.md", "\n".join(L))
