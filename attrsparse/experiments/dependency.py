"""Attribution error caused by dependency between layers (paper §3.2, Figs. 4-5; notes §4).

Per question, the label is the dense greedy continuation of the templated question and one dense
trace (unit outputs ``x`` and exact per-token gradients ``g``) is taken along it. Two measurements:

1. **Score change vs activation ratio** (the paper's Fig. 5, right). For every ratio r the earlier
   half of the layers (``l < L // 2``) is masked with the per-layer top-k of dense GxO at r (per
   token, the oracle protocol of :mod:`attrsparse.experiments.sweep`, as per-position multipliers of the
   teacher-forced pass); the later half stays dense. The GxO scores ``s = -x g`` (heads:
   ``-o_h . g_h``) of the later layers are recomputed under those masks and compared with the
   dense ones: ``100 * mean_{q,t,l} ||s_after - s_before||_1 / ||s_before||_1``, the L1 norm over
   all units of the layer (MLP neurons or heads), separately for MLP and heads. All ratios and a
   dense row run as batch rows of one forward+backward per question. The ``*_kept`` variants
   restrict the norm to the units that per-layer top-k at r would keep in the later layer.

2. **First-order error vs the theorem's bound**. Seeded random single-unit removals (token t,
   MLP neuron or head, any layer): with the dense keys and values recorded
   (:class:`~attrsparse.core.attention.KVRecorder`), zeroing a unit at position t reaches only position
   t's own loss, which is exactly incremental decoding with a dense cache. One batch row therefore
   holds T removals, a different random unit at each target token (per-position multipliers).
   For each removal: ``dL`` = real loss change,
   GxO prediction ``-x g`` (heads ``-o_h . g_h``), bound ``|x| ||g_layer||_2`` (heads
   ``||o_h|| ||g of the layer's o_proj input||``), ``error_gxo = dL - GxO`` (the theorem claims
   ``0 <= error_gxo <= bound``) and ``error_corrected = dL - corrected GxO = error_gxo - bound/2``.

:func:`run_dependency` writes ``dependency.json`` (keys read by :mod:`attrsparse.experiments.report` and
:func:`attrsparse.experiments.plots.plot_dependency`) and ``dependency.png``/``.svg``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import __version__
from ..core.architectures import model_device
from ..core.attention import KVRecorder
from ..core.errors import UserError, check_ratio
from ..core.io import atomic_write_json
from ..core.models import load_model
from ..core.trace import (
    GradientTrace,
    forward_units,
    position_multipliers,
    record_dense_kv,
    to_ids,
    trace_gradients,
)
from ..core.units import unit_map
from ..data.prompts import encode_prompt, greedy_continuation, resolve_template, stop_token_ids
from ..data.tasks import load_truthfulqa
from ..scores import get_score
from ..selectors.topk import keep_count, select, top_k
from .plots import plot_dependency

__all__ = ["DependencyConfig", "run_dependency", "split_layer", "score_change", "sample_ablations",
           "ablation_deltas", "ablation_errors", "error_stats", "PAPER_FIG5",
           "CHANGE_FORMULA", "DEFINITION", "VARIANTS"]

#: The paper's Fig. 5 (right), read off the figure (notes §4.2); model and data set not stated.
PAPER_FIG5 = {
    "ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "mlp_change_pct": [42, 40, 37, 35, 62, 82, 135, 220, 525],
    "heads_change_pct": [9, 7, 6, 5, 8, 10, 22, 25, 61],
    "source": "paper Fig. 5 (right), values read off the plot (paper-notes §4.2); approximate. "
              "The paper's exact formula, model and data set are not stated (presumably Phi-2 "
              "on TruthfulQA).",
}

CHANGE_FORMULA = ("change_pct(r) = 100 * sum over (question q, target token t, later layer l >= "
                  "L//2) of sum_i |s_r[q,t,l,i] - s_dense[q,t,l,i]| / the same sum of |s_dense[q,t,l,i]|; "
                  "s = GxO = -x*dL/dx (head: -o_h . dL/do_h); i over all MLP neurons (or all "
                  "heads) of layer l; s_r = scores with layers l < L//2 masked by per-layer "
                  "top-k(ceil(r*C)) of dense GxO at each token, layers >= L//2 dense")

DEFINITION = {
    "score_change": (
        "Paper Fig. 5 (right), inter-layer dependency. Per question and ratio r, the earlier half "
        "of the layers (l < L//2) keeps, at every generated token, the per-layer top ceil(r*C) "
        "units by dense GxO (MLP neurons and heads separately, C = units per layer), applied as "
        "per-position multipliers of the teacher-forced pass along the dense label (prompt "
        "positions before the last dense, as in masked decoding; earlier label positions carry "
        "their own step's masks). The later half (l >= L//2) stays dense, so all of its units "
        "remain; their GxO scores s = -x*g (heads: -o_h.g_h, summed over head dims) are "
        "recomputed under the masks (new x and new g). Reported: " + CHANGE_FORMULA + ". "
        "mlp_change_pct_kept / heads_change_pct_kept restrict both sums to the units of layer l "
        "that per-layer top-k of dense GxO at r would keep (the units that would remain if the "
        "same ratio were applied to the later layers too)."),
    "error": (
        "Theorem of paper §3.2. A random unit u (MLP neuron or head, in any layer l) is zeroed at "
        "one target token t, with the dense keys/values of every other position (exactly "
        "incremental decoding with a dense cache). dL = loss_t(u removed) - loss_t(dense). "
        "GxO prediction = -x*g (heads: -o_h.g_h), from the dense trace. bound = |x|*||g_l||_2 "
        "with g_l the gradient of loss_t w.r.t. all MLP neurons of layer l at token t (heads: "
        "||o_h||_2 * ||g of the whole o_proj input of layer l||_2). error_gxo = dL - GxO "
        "(theorem: 0 <= error_gxo <= bound); error_corrected = dL - corrected GxO = error_gxo - "
        "bound/2 (claimed within [-bound/2, bound/2]). Per question, ceil(ablations/T)*T removals "
        "are drawn with a seeded generator: at every target token of each batch row one unit, a "
        "head with probability head_fraction, else an MLP neuron; layer uniform, then unit "
        "uniform. error_stats are over all samples with bound > 0; error_samples is a seeded "
        "random subset of at most max_samples of them."),
}


@dataclass
class DependencyConfig:
    model: str = "smollm2-135m"
    data: str | None = None
    limit: int | None = 3
    offset: int = 0
    ratios: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    template: str = "auto"
    max_new_tokens: int = 24
    ablations: int = 64  # single-unit removals (unit, token) per question, rounded up to rows of T
    head_fraction: float = 0.25  # share of the removals that are heads
    chunk: int = 8  # ablation rows per forward pass
    max_samples: int = 2000  # error samples kept in the JSON (stats use all)
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"  # cuda when available, else cpu

    def validate(self) -> "DependencyConfig":
        if not self.ratios:
            raise UserError("no ratios given")
        self.ratios = sorted({round(check_ratio(r), 6) for r in self.ratios})
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.ablations < 0:
            raise UserError("--ablations must be at least 0")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise UserError("head_fraction must lie in [0, 1]")
        self.chunk = max(1, int(self.chunk))
        return self


def split_layer(num_layers: int) -> int:
    """First layer of the later (dense, measured) half: ``max(1, L // 2)``."""
    return max(1, num_layers // 2)


# -- 1. score change vs activation ratio --------------------------------------------------------

def _rel_change(after: torch.Tensor, before: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``||after - before||_1 / ||before||_1`` over the last dim (optionally only ``keep``)."""
    diff, ref = (after - before).abs(), before.abs()
    if keep is not None:
        diff, ref = diff * keep, ref * keep
    return diff.sum(-1) / ref.sum(-1).clamp_min(1e-30)


def score_change(model, prompt_ids, target_ids, ratios, trace: GradientTrace | None = None,
                 head_reduction: str = "sum") -> dict[str, torch.Tensor]:
    """Relative GxO change of the later layers when the earlier ones are masked at each ratio.

    Returns ``{"mlp", "heads", "mlp_kept", "heads_kept"}``, each ``[R, T, L - L//2]`` (fractions,
    not percent): per ratio, target token and later layer; ``{"mlp_l1", "heads_l1"}``
    ``[1 + R, T, L - L//2]``, the L1 norms of the later layers' scores (row 0 dense), and
    ``"losses"`` ``[1 + R, T]``, the label's per-token loss (row 0 dense). ``trace`` is the dense
    trace row (computed when not given). One forward+backward with ``1 + R`` rows (row 0 dense).
    """
    units = unit_map(model)
    gxo = get_score("gxo")
    if trace is None:
        trace = trace_gradients(model, prompt_ids, target_ids).row(0)
    dense = gxo.from_trace(trace, head_reduction)  # mlp [T, L, N], heads [T, L, H]
    split = split_layer(units.num_layers)
    masks = [select(dense, r) for r in ratios]
    mlp_steps = torch.stack([torch.ones_like(dense.mlp[:, :split], dtype=torch.bool)]
                            + [m.mlp[:, :split] for m in masks])  # [1+R, T, split, N]
    head_steps = torch.stack([torch.ones_like(dense.heads[:, :split], dtype=torch.bool)]
                             + [m.heads[:, :split] for m in masks])
    p = to_ids(prompt_ids).numel()
    mlp_pos, head_pos = position_multipliers(mlp_steps, p), position_multipliers(head_steps, p)
    none = [None] * (units.num_layers - split)
    mlp_mult = [mlp_pos[:, :, l] for l in range(split)] + none
    head_mult = [head_pos[:, :, l] for l in range(split)] + none
    rows = trace_gradients(model, prompt_ids, target_ids, rows=1 + len(ratios),
                           mlp_mult=mlp_mult, head_mult=head_mult)
    after = [gxo.from_trace(rows.row(b), head_reduction) for b in range(1 + len(ratios))]
    before = after[0]  # the dense row of the same batch: identical numerics at ratio 1.0
    out = {k: [] for k in ("mlp", "heads", "mlp_kept", "heads_kept", "mlp_l1", "heads_l1")}
    for i, r in enumerate(ratios):
        a = after[1 + i]
        for kind in ("mlp", "heads"):
            s_after = getattr(a, kind)[:, split:]
            s_before = getattr(before, kind)[:, split:]
            keep = top_k(getattr(dense, kind)[:, split:], keep_count(r, s_before.shape[-1]))
            out[kind].append(_rel_change(s_after, s_before))
            out[kind + "_kept"].append(_rel_change(s_after, s_before, keep))
    for a in after:
        out["mlp_l1"].append(a.mlp[:, split:].abs().sum(-1))
        out["heads_l1"].append(a.heads[:, split:].abs().sum(-1))
    return {**{k: torch.stack(v).cpu() for k, v in out.items()}, "losses": rows.losses.cpu()}


# -- 2. single-unit ablations vs the first-order prediction and the bound ------------------------

def sample_ablations(units, num_tokens: int, n: int, head_fraction: float,
                     generator: torch.Generator) -> list[tuple]:
    """Random single-unit removals ``(kind, layer, index, token)``, distinct, packed in rows.

    ``n`` is rounded up to whole rows of ``num_tokens``: row r removes one unit at every target
    token, so ``ceil(n / T) * T`` removals are drawn (in row-major order: ablation ``a`` sits in
    row ``a // T`` at token ``a % T``). About ``head_fraction`` of them are heads (kind "heads"),
    the rest MLP neurons ("mlp"); layer uniform, then unit uniform within the layer.
    """
    if n <= 0:
        return []
    rows = math.ceil(n / num_tokens)
    total = rows * num_tokens
    n_heads = int(round(total * head_fraction))
    is_head = torch.zeros(total, dtype=torch.bool, device="cpu")  # a CPU generator's draws
    is_head[torch.randperm(total, generator=generator, device="cpu")[:n_heads]] = True
    out, seen = [], set()
    for a in range(total):
        t = a % num_tokens
        kind, size = ("heads", units.num_heads) if is_head[a] else ("mlp", units.mlp_size)
        while True:
            layer = int(torch.randint(units.num_layers, (1,), generator=generator, device="cpu"))
            idx = int(torch.randint(size, (1,), generator=generator, device="cpu"))
            if (kind, layer, idx, t) not in seen:
                break
        seen.add((kind, layer, idx, t))
        out.append((kind, layer, idx, t))
    return out


def _pack(ablations: list[tuple]) -> list[list[int]]:
    """Indices of ``ablations`` grouped into rows with at most one removal per token (first fit)."""
    rows: list[list[int]] = []
    used: list[set] = []
    for i, a in enumerate(ablations):
        for row, tokens in zip(rows, used):
            if a[3] not in tokens:
                row.append(i)
                tokens.add(a[3])
                break
        else:
            rows.append([i])
            used.append({a[3]})
    return rows


@torch.no_grad()
def ablation_deltas(model, prompt_ids, target_ids, ablations: list[tuple], chunk: int = 8,
                    recorder: KVRecorder | None = None) -> torch.Tensor:
    """Real loss change ``[A]`` of each ablation ``(kind, layer, index, token)``: the unit zeroed
    at that target token only, every other position's keys/values dense.

    Removals at different tokens share a batch row (position t's loss sees only position t's
    removal); each pass runs one dense row (row 0) and up to ``chunk`` ablation rows, and ``dL``
    is taken against the dense row of the same batch.
    """
    units = unit_map(model)
    p = to_ids(prompt_ids).numel()
    t_len = to_ids(target_ids).numel()
    if recorder is None:
        recorder = record_dense_kv(model, prompt_ids, target_ids)
    s = p + t_len - 1
    device = model_device(model)
    delta = torch.full((len(ablations),), math.nan, dtype=torch.float64, device="cpu")
    rows = _pack(ablations)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        b = 1 + len(part)
        mlp = torch.ones(b, s, units.num_layers, units.mlp_size, device=device)
        heads = torch.ones(b, s, units.num_layers, units.num_heads, device=device)
        for r, row in enumerate(part, start=1):
            for i in row:
                kind, layer, idx, t = ablations[i]
                (mlp if kind == "mlp" else heads)[r, p - 1 + t, layer, idx] = 0.0
        _, losses, _, _, _ = forward_units(model, prompt_ids, target_ids, rows=b, mlp_mult=mlp,
                                           head_mult=heads, recorder=recorder, want_grad=False)
        d = (losses[1:].double() - losses[:1].double()).cpu()  # [b-1, T]
        for r, row in enumerate(part):
            for i in row:
                delta[i] = d[r, ablations[i][3]]
    return delta


def ablation_errors(model, prompt_ids, target_ids, trace: GradientTrace, ablations: list[tuple],
                    chunk: int = 8, recorder: KVRecorder | None = None) -> dict[str, np.ndarray]:
    """Per-ablation arrays: delta_loss, gxo_pred, bound, gxo_error, corrected_error,
    kind (0 = MLP, 1 = head), layer, unit, token."""
    delta = ablation_deltas(model, prompt_ids, target_ids, ablations, chunk, recorder)  # [A]
    pred, bound = torch.zeros_like(delta), torch.zeros_like(delta)
    for a, (kind, layer, idx, t) in enumerate(ablations):
        if kind == "mlp":
            x, g = trace.mlp_x[t, layer, idx].double(), trace.mlp_g[t, layer, idx].double()
            pred[a] = -x * g
            bound[a] = x.abs() * trace.mlp_g[t, layer].double().norm()
        else:
            o, g = trace.head_x[t, layer, idx].double(), trace.head_g[t, layer, idx].double()
            pred[a] = -(o * g).sum()
            bound[a] = o.norm() * trace.head_g[t, layer].double().norm()
    err = delta - pred
    meta = np.array([(kind == "heads", layer, idx, t) for kind, layer, idx, t in ablations],
                    dtype=np.int64).reshape(-1, 4)
    return {"delta_loss": delta.numpy(), "gxo_pred": pred.numpy(), "bound": bound.numpy(),
            "gxo_error": err.numpy(), "corrected_error": (err - 0.5 * bound).numpy(),
            "kind": meta[:, 0], "layer": meta[:, 1], "unit": meta[:, 2], "token": meta[:, 3]}


def _moments(z: np.ndarray) -> tuple[float, float]:
    """(skewness, excess kurtosis) of ``z``; NaN when undefined."""
    if len(z) < 3 or z.std() == 0:
        return math.nan, math.nan
    c = (z - z.mean()) / z.std()
    return float(np.mean(c ** 3)), float(np.mean(c ** 4) - 3.0)


def _finite(v: float):
    return float(v) if math.isfinite(float(v)) else None


def error_stats(samples: dict[str, np.ndarray]) -> dict:
    """Statistics of the normalised errors, for all units and per kind (samples with bound > 0)."""
    out = {}
    for group, sel in (("all", None), ("mlp", 0), ("heads", 1)):
        ok = np.isfinite(samples["gxo_error"]) & np.isfinite(samples["bound"]) & (samples["bound"] > 0)
        if sel is not None:
            ok &= samples["kind"] == sel
        n = int(ok.sum())
        if n == 0:
            out[group] = {"n": 0}
            continue
        e, c, b, d = (samples[k][ok] for k in ("gxo_error", "corrected_error", "bound", "delta_loss"))
        p = samples["gxo_pred"][ok]
        z, zc = e / b, c / b
        skew, kurt = _moments(z)
        mae, mae_c = float(np.abs(e).mean()), float(np.abs(c).mean())
        outside = float(np.mean((z < 0) | (z > 1)))
        corr = lambda a, b_: _finite(np.corrcoef(a, b_)[0, 1]) if a.std() > 0 and b_.std() > 0 else None  # noqa: E731
        out[group] = {
            "n": n,
            "within_bound": float(np.mean((z >= 0) & (z <= 1))),
            "below_zero": float(np.mean(z < 0)),
            "above_bound": float(np.mean(z > 1)),
            "error_over_bound_mean": float(z.mean()),
            "error_over_bound_std": float(z.std()),
            "error_over_bound_median": float(np.median(z)),
            "error_over_bound_p05_p95": [float(np.percentile(z, 5)), float(np.percentile(z, 95))],
            "error_over_bound_skewness": _finite(skew),
            "error_over_bound_excess_kurtosis": _finite(kurt),
            "corrected_within_half_bound": float(np.mean(np.abs(zc) <= 0.5)),
            "corrected_over_bound_mean": float(zc.mean()),
            "mae_gxo": mae,
            "mae_corrected": mae_c,
            "mae_removed_by_correction_pct": _finite(100.0 * (1.0 - mae_c / mae)) if mae > 0 else None,
            "mae_ratio_corrected_over_gxo": _finite(mae_c / mae) if mae > 0 else None,
            "mean_abs_delta_loss": float(np.abs(d).mean()),
            "corr_delta_loss_vs_gxo": corr(d, p),
            "corr_delta_loss_vs_corrected": corr(d, p + 0.5 * b),
            "truncated_normal_on_0_bound": (
                "consistent (errors within [0, bound])" if outside < 0.05 else
                f"not consistent: {outside:.1%} of errors lie outside [0, bound] "
                f"({np.mean(z < 0):.1%} below 0)"),
        }
    return out


VARIANTS = (
    "mlp/heads_change_pct (the headline, plotted) = *_pooled: sum over (question, token, later "
    "layer) of ||s_r - s_dense||_1 divided by the sum of ||s_dense||_1. *_mean: the mean of the "
    "per-(q, t, l) ratio (heavy-tailed, because tokens the dense model predicts confidently have "
    "near-zero gradients, hence a tiny denominator). *_median: the median of the same ratios. *_kept: the "
    "mean with both L1 norms restricted to the units kept by per-layer top-k at r. "
    "label_loss_dense / label_loss_masked: mean per-token cross-entropy of the dense label, dense "
    "and with the earlier half masked at each ratio.")


# -- the whole analysis --------------------------------------------------------------------------

def _subsample(samples: dict[str, np.ndarray], cap: int, seed: int) -> dict[str, list]:
    ok = np.isfinite(samples["gxo_error"]) & np.isfinite(samples["bound"]) & (samples["bound"] > 0)
    idx = np.flatnonzero(ok)
    if len(idx) > cap:
        idx = np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))

    def fmt(key):
        v = samples[key][idx]
        if v.dtype.kind in "iu":
            return [int(x) for x in v]
        return [float(f"{x:.6g}") for x in v]

    out = {k: fmt(k) for k in ("gxo_error", "corrected_error", "bound", "delta_loss", "gxo_pred",
                               "layer", "token")}
    out["kind"] = ["heads" if k else "mlp" for k in samples["kind"][idx]]
    return out


def _cat(parts: list[dict]) -> dict[str, np.ndarray]:
    keys = ("delta_loss", "gxo_pred", "bound", "gxo_error", "corrected_error", "kind", "layer",
            "unit", "token")
    if not parts:
        return {k: np.zeros(0) for k in keys}
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _pct_list(values: torch.Tensor) -> list[float]:
    return [round(100.0 * float(v), 4) for v in values]


def run_dependency(config: DependencyConfig, out_dir: Path, model=None, tokenizer=None,
                   progress: bool = True) -> dict:
    """Run the analysis (see module docstring); write ``dependency.json`` and the figure."""
    from tqdm.auto import tqdm

    config = config.validate()
    out_dir = Path(out_dir)
    timings = {k: 0.0 for k in ("load", "labels", "dense_trace", "score_change", "ablations")}
    t_all = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    timings["load"] = time.perf_counter() - t_all
    units = unit_map(model)
    split = split_layer(units.num_layers)
    template = resolve_template(tokenizer, config.template)
    stop_ids = stop_token_ids(tokenizer, model)
    items = load_truthfulqa(config.data, limit=config.limit, offset=config.offset)
    if not items:
        raise UserError("the dataset selection is empty")

    rel = {k: [] for k in ("mlp", "heads", "mlp_kept", "heads_kept")}
    l1 = {k: [] for k in ("mlp", "heads")}
    losses, error_parts, questions = [], [], []
    stages = ("label", "trace", "score change", "ablations")
    bar = tqdm(total=len(items) * len(stages), desc="dependency", unit="step", disable=not progress)

    def stage(item, name, key, fn):
        bar.set_postfix_str(f"q{item.index} {name}")
        t0 = time.perf_counter()
        value = fn()
        timings[key] += time.perf_counter() - t0
        bar.update()
        return value

    for item in items:
        prompt = encode_prompt(tokenizer, item.question, template)
        label = stage(item, "label", "labels",
                      lambda: greedy_continuation(model, prompt, config.max_new_tokens, stop_ids))
        trace = stage(item, "trace", "dense_trace",
                      lambda: trace_gradients(model, prompt, label).row(0))
        ch = stage(item, "score change", "score_change",
                   lambda: score_change(model, prompt, label, config.ratios, trace))
        for k in rel:
            rel[k].append(ch[k].flatten(1))  # [R, T * later layers]
        for k in l1:
            l1[k].append(ch[k + "_l1"].flatten(1))  # [1 + R, T * later layers]
        losses.append(ch["losses"])

        def ablate():
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + item.index)
            abl = sample_ablations(units, label.numel(), config.ablations, config.head_fraction, gen)
            return ablation_errors(model, prompt, label, trace, abl, config.chunk)

        q_errors = stage(item, "ablations", "ablations", ablate)
        error_parts.append(q_errors)
        questions.append({"index": item.index, "question": item.question,
                          "prompt_tokens": int(prompt.numel()), "label_tokens": int(label.numel()),
                          "dense_text": tokenizer.decode(label, skip_special_tokens=True).strip(),
                          "mlp_change_pct": _pct_list(ch["mlp"].flatten(1).mean(1)),
                          "heads_change_pct": _pct_list(ch["heads"].flatten(1).mean(1)),
                          "label_loss_dense": round(float(ch["losses"][0].mean()), 5),
                          "label_loss_masked": [round(float(v), 5) for v in ch["losses"][1:].mean(1)],
                          "error_samples": int(len(q_errors["bound"]))})
    bar.close()

    rel_all = {k: torch.cat(v, dim=1) for k, v in rel.items()}  # [R, n]
    l1_all = {k: torch.cat(v, dim=1) for k, v in l1.items()}  # [1 + R, n]
    pooled = {k: (rel_all[k] * l1_all[k][:1]).sum(1) / l1_all[k][0].sum() for k in l1}
    loss_all = torch.cat(losses, dim=1)  # [1 + R, total tokens]
    samples = _cat(error_parts)
    timings["total"] = time.perf_counter() - t_all
    import transformers

    result = {
        "schema_version": 1,
        "model": config.model,
        "template": template,
        "n_questions": len(items),
        "ratios": list(config.ratios),
        "mlp_change_pct": _pct_list(pooled["mlp"]),
        "heads_change_pct": _pct_list(pooled["heads"]),
        "mlp_change_pct_mean": _pct_list(rel_all["mlp"].mean(1)),
        "heads_change_pct_mean": _pct_list(rel_all["heads"].mean(1)),
        "mlp_change_pct_kept": _pct_list(rel_all["mlp_kept"].mean(1)),
        "heads_change_pct_kept": _pct_list(rel_all["heads_kept"].mean(1)),
        "mlp_change_pct_median": _pct_list(rel_all["mlp"].median(1).values),
        "heads_change_pct_median": _pct_list(rel_all["heads"].median(1).values),
        "mlp_change_pct_pooled": _pct_list(pooled["mlp"]),
        "heads_change_pct_pooled": _pct_list(pooled["heads"]),
        "label_loss_dense": round(float(loss_all[0].mean()), 5),
        "label_loss_masked": [round(float(v), 5) for v in loss_all[1:].mean(1)],
        "change_formula": CHANGE_FORMULA,
        "definition": {**DEFINITION, "variants": VARIANTS},
        "masked_layers": list(range(split)),
        "measured_layers": list(range(split, units.num_layers)),
        "error_samples": _subsample(samples, config.max_samples, config.seed),
        "error_stats": {"n_samples_total": int(len(samples["bound"])),
                        "n_samples_zero_bound": int(np.sum(~(samples["bound"] > 0))),
                        **error_stats(samples)},
        "paper_fig5": PAPER_FIG5,
        "paper_theorem": "0 <= error <= |x_i| * ||grad_X F||_2 (paper §3.2, notes §4.3); "
                         "correction C(i) = bound/2 (notes §4.4)",
        "config": asdict(config),
        "units": units.summary(),
        "questions": questions,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": {"attrsparse": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    atomic_write_json(out_dir / "dependency.json", result)
    plot_dependency(result, out_dir)
    return result
