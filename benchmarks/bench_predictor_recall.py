"""Recall-vs-cost of MLP unit predictors against the oracle (issue 4): how close can a cheap
predictor get to the units ``budget_gxo`` keeps?

Data: WikiText-2 *valid* windows of ``--seq-len`` tokens (:func:`attrsparse.calibration.calibration_sequences`);
the first ``--heldout-seq`` windows are held out (all recall numbers are on them), the next
``--train-seq`` windows train / calibrate the predictors (disjoint sequences). Dense block inputs
and the oracle's per-token corrected-GxO ranks come from
:func:`attrsparse.deploy.predictor.collect_training_data` (one trace per sequence, ~2 s each on
SmolLM2-135M), cached in chunks of ``--chunk`` sequences under ``--cache`` (default
``runs/bench_predictor_recall``, gitignored) so re-runs only pay for the analysis.

Recall: MLP units only, at ``--ratio`` (0.5), under the labels' own budget rule
(:class:`attrsparse.deploy.predictor.BudgetRule`): per token the predictor keeps exactly as many
MLP units as the oracle does (the oracle's ``k``, which depends on the heads the oracle kept), and
recall = |predicted & oracle| / |oracle|, summed over tokens and layers (recall = precision here).

Cost: multiply-adds per token and layer against the dense MLP (``3 d N`` = 2,654,208 for SmolLM2:
gate, up, down). Top-k selection, elementwise activations and bit operations are not counted
(bit operations are reported separately where a method uses them).

Predictors (each ranks the units of a token by a score; top-``k`` kept):

* ``random``: chance level (the kept fraction);
* ``static``: the units the oracle keeps most often on the training tokens (cost 0);
* ``trained r=R, T tok``: :func:`attrsparse.deploy.predictor.train_predictor` (Linear(d,R) -> ReLU
  -> Linear(R,N), soft labels of ``--train-ratios``) on the first T training tokens;
  cost ``dR + RN``;
* ``svd r=R``: activation-aware truncated SVD of the gate and of the up projection (rank R each,
  whitened by the training tokens' input covariance ``C``: ``W ~ trunc(W C^1/2) C^-1/2``),
  score ``|silu(g~) u~|``; cost ``2 (dR + RN)``;
* ``svd-joint r=R``: one activation-aware rank-R basis shared by gate and up (SVD of
  ``[W_gate; W_up] C^1/2``); cost ``dR + 2RN``;
* ``exact |silu(g)u|``: the exact activation magnitude (ceiling of magnitude predictors;
  cost ``2dN`` = 2/3 of the MLP); ``exact |silu(g)u|*||w_down||`` weighs it by the unit's
  down-projection column norm (same cost);
* ``exact |u|``, ``exact |silu(g)|``, ``exact sign(g) first, then |u|``: what each factor and the
  gate's sign carry (exact, so not cheap: they bound what a predictor of that feature can do);
* sign / low-bit features, no multiply-adds: ``ternary W_gate, W_up times h`` (ternary weights,
  2dN additions) and ``sign(W) . sign(h)`` (XNOR-popcount, 2dN bit operations), each scaled per
  unit (the cost column lists the additions / bit operations);
* ``top-m input channels``: per token the m hidden channels with the largest
  ``|h_j| (||w_gate,j|| + ||w_up,j||)`` (TEAL-style input sparsity), score ``|silu(g~) u~|`` from
  those channels only; cost ``2mN + d``;
* ``exact + noise eps``: exact gate/up plus Gaussian noise of relative size eps per unit: the
  recall a predictor with that estimation error would get (no cost).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_predictor_recall.py            # full study
    OMP_NUM_THREADS=1 python benchmarks/bench_predictor_recall.py --train-seq 64 --layers 2,15,29
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from attrsparse.architectures import unit_map  # noqa: E402
from attrsparse.calibration import calibration_sequences  # noqa: E402
from attrsparse.deploy.calibrate import weights_fingerprint  # noqa: E402
from attrsparse.deploy.predictor import (  # noqa: E402
    BudgetRule, PredictorConfig, TrainingData, collect_training_data, train_predictor, unit_ranks)
from attrsparse.io import atomic_save_tensors, atomic_write_json, atomic_write_text, stable_hash  # noqa: E402
from attrsparse.models import load_model  # noqa: E402

CACHE_FORMAT = 1
TENSORS = ("mlp_in", "mlp_rank", "head_rank")  # attn_in is not needed for MLP recall


# -- cached oracle data ----------------------------------------------------------------------------

def _chunk_paths(cache: Path, start: int, end: int) -> tuple[Path, Path]:
    stem = cache / f"seq{start:05d}-{end:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def ensure_chunks(model, sequences, cache: Path, key: dict, chunk: int, ranges) -> list[tuple[int, int]]:
    """Collect (or find cached) oracle data for the sequence ``ranges`` in chunks of ``chunk``;
    returns the chunk ranges covering them in order."""
    out = []
    for lo, hi in ranges:
        for start in range(lo, hi, chunk):
            end = min(start + chunk, hi)
            path, key_path = _chunk_paths(cache, start, end)
            digest = stable_hash({**key, "sequences": [start, end]})
            try:
                ok = path.exists() and json.loads(key_path.read_text()).get("key") == digest
            except (OSError, ValueError, AttributeError):
                ok = False
            if not ok:
                t0 = time.perf_counter()
                data = collect_training_data(model, sequences[start:end])
                atomic_save_tensors(path, {k: getattr(data, k) for k in TENSORS})
                atomic_write_json(key_path, {"key": digest, **key, "sequences": [start, end],
                                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"  oracle data for sequences {start}-{end}: {time.perf_counter() - t0:.0f} s", flush=True)
            out.append((start, end))
    return out


def load_layer(cache: Path, chunks, layer: int) -> TrainingData:
    """One layer of the cached chunks as a :class:`TrainingData` with a single layer (``attn_in``
    empty)."""
    from safetensors import safe_open

    parts = {k: [] for k in TENSORS}
    for start, end in chunks:
        with safe_open(str(_chunk_paths(cache, start, end)[0]), framework="pt") as fh:
            for k in TENSORS:
                parts[k].append(fh.get_slice(k)[layer:layer + 1])
    t = {k: torch.cat(v, dim=1) for k, v in parts.items()}
    return TrainingData(attn_in=t["mlp_in"][:, :, :0], **t)



# -- recall ----------------------------------------------------------------------------------------

def oracle_mask(data: TrainingData, units, ratio: float) -> torch.Tensor:
    """The oracle's MLP keep mask ``[T, N]`` of the single layer in ``data``: ``data.labels(0, ratio,
    units).mlp`` computed from the stored ranks without sorting them again (the top ``k`` of
    ``-rank`` are the ranks below ``k``)."""
    rule = BudgetRule(units, ratio)
    heads = data.head_rank[0].long() < rule.head_keep
    return data.mlp_rank[0].long() < rule.mlp_count(heads, heads.shape[:-1]).unsqueeze(-1)


def recall_counts(scores: torch.Tensor, truth: torch.Tensor) -> tuple[int, int]:
    """(hits, oracle units) of keeping, per row, the oracle's number of units ``k`` by ``scores``
    (the same choice as ``unit_ranks(scores) < k``; the ``k``-th largest value per row is found
    with ``kthvalue``, and rows with ties at it fall back to :func:`unit_ranks`)."""
    k = truth.sum(-1)
    n = scores.shape[-1]
    hits = 0
    for kv in k.unique().tolist():
        rows = (k == kv).nonzero().squeeze(-1)
        s, t = scores[rows], truth[rows]
        thr = torch.kthvalue(s, n - kv + 1, dim=-1, keepdim=True).values
        keep = s >= thr
        tied = keep.sum(-1) != kv
        if tied.any():
            keep[tied] = unit_ranks(s[tied]) < kv
        hits += int((keep & t).sum())
    return hits, int(truth.sum())


# -- closed-form predictors ------------------------------------------------------------------------

def mlp_weights(model, layer: int):
    mlp = model.model.layers[layer].mlp
    return (mlp.gate_proj.weight.detach().double(), mlp.up_proj.weight.detach().double(),
            mlp.down_proj.weight.detach().double())


def whitening(x: torch.Tensor, eps: float = 1e-6):
    """``C^1/2``, ``C^-1/2`` of the second moment ``C = E[x x^T]`` of ``x [T, d]`` (float64)."""
    x = x.double()
    c = x.T @ x / len(x)
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(eps * float(vals.max()))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def whitened_svd(w: torch.Tensor, sqrt_c: torch.Tensor):
    """SVD of ``W C^1/2``: ``(U, S, Vh)`` (float64)."""
    return torch.linalg.svd(w @ sqrt_c, full_matrices=False)


def svd_factors(svd, isqrt_c: torch.Tensor, rank: int):
    """Activation-aware rank-``rank`` factors ``(A [N, r], B [r, d])`` with ``W ~ A B``
    minimising ``E||W h - A B h||^2`` over the calibration inputs (``svd``: :func:`whitened_svd`)."""
    u, s, vh = svd
    return (u[:, :rank] * s[:rank]).float(), (vh[:rank] @ isqrt_c).float()


def joint_factors(wg, wu, sqrt_c, isqrt_c, vh, rank: int):
    """One activation-aware basis ``B [r, d]`` for gate and up (``vh``: right singular vectors of
    ``[W_gate; W_up] C^1/2``): ``(A_gate, A_up, B)``."""
    v = vh[:rank]  # [r, d], rows orthonormal in the whitened space
    return (wg @ sqrt_c @ v.T).float(), (wu @ sqrt_c @ v.T).float(), (v @ isqrt_c).float()


def magnitude(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (F.silu(g) * u).abs()


def rel_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    """``||est - exact|| / ||exact||`` over all tokens and units."""
    return float((est - exact).double().norm() / exact.double().norm())


def ternary(w: torch.Tensor):
    """Ternary weights ``sign(w) * [|w| > 0.7 mean|w|]`` per row with the row scale minimising
    the L2 error on the kept entries (Li & Liu, Ternary Weight Networks)."""
    t = 0.7 * w.abs().mean(1, keepdim=True)
    m = (w.abs() > t).float()
    return w.sign() * m, (w.abs() * m).sum(1) / m.sum(1).clamp_min(1)


# -- the study -------------------------------------------------------------------------------------

class Study:
    """Accumulates hits per (method, layer) and each method's cost and notes."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def add(self, name: str, family: str, layer: int, hits_total, macs: int | None = None,
            err: float | None = None, **info):
        row = self.rows.setdefault(name, {"method": name, "family": family, "macs": macs, "layers": {}, **info})
        row["layers"][layer] = {"hits": hits_total[0], "oracle": hits_total[1],
                                **({"rel_error": round(err, 4)} if err is not None else {})}


def closed_form_layer(study: Study, model, layer: int, held: TrainingData, train: TrainingData, units,
                      ratio: float, svd_ranks, joint_ranks, channels, noise_levels) -> None:
    """Every predictor that needs no training except calibration statistics, on one layer."""
    n, d = units.mlp_size, held.mlp_in.shape[-1]
    truth = oracle_mask(held, units, ratio)
    x, xt = held.mlp_in[0], train.mlp_in[0]
    wg, wu, wd = mlp_weights(model, layer)
    g, u = x @ wg.float().T, x @ wu.float().T
    a = magnitude(g, u)

    def run(name, family, scores, macs, err=None, **info):
        study.add(name, family, layer, recall_counts(scores, truth), macs, err, **info)

    kept = truth.sum(-1, keepdim=True).float() / n
    gen = torch.Generator().manual_seed(1000 + layer)
    run("random", "baseline", torch.rand(truth.shape, generator=gen), 0)
    freq = oracle_mask(train, units, ratio).float().mean(0) - 1e-9 * torch.arange(n)  # ties -> lower index
    run("static (oracle frequency on the training tokens)", "baseline", freq.expand_as(a).contiguous(), 0)
    run("exact |silu(g) u|", "exact", a, 2 * d * n, 0.0)
    run("exact |silu(g) u| * ||w_down||", "exact", a * wd.norm(dim=0).float(), 2 * d * n, 0.0)
    run("exact |u|", "exact", u.abs(), d * n)
    run("exact |silu(g)|", "exact", F.silu(g).abs(), d * n)
    run("exact sign(g) first, then |u|", "sign", (g > 0).float() * (u.abs().max() + 1) + u.abs(), 2 * d * n,
        note="units with g > 0 ranked first; the fraction of oracle units with g > 0 is in 'g_pos_oracle'")
    study.rows["exact sign(g) first, then |u|"]["layers"][layer]["g_pos_oracle"] = round(
        float((g > 0)[truth].float().mean()), 4)
    study.rows["exact sign(g) first, then |u|"]["layers"][layer]["g_pos_all"] = round(float((g > 0).float().mean()), 4)
    # sign / low-bit features: no multiplies
    tg, sg = ternary(wg.float())
    tu, su = ternary(wu.float())
    ge, ue = sg * (x @ tg.T), su * (x @ tu.T)
    run("ternary W_gate, W_up times h (additions only)", "sign", magnitude(ge, ue), 0,
        0.5 * (rel_error(ge, g) + rel_error(ue, u)), additions=2 * d * n)
    hb = x.sign() * x.abs().mean(1, keepdim=True)
    bg, bu = wg.float().abs().mean(1), wu.float().abs().mean(1)
    ge, ue = bg * (hb @ wg.float().sign().T), bu * (hb @ wu.float().sign().T)
    run("sign(W) . sign(h) (XNOR-popcount)", "sign", magnitude(ge, ue), 0,
        0.5 * (rel_error(ge, g) + rel_error(ue, u)), bit_ops=2 * d * n)
    # activation-aware SVD
    sq, isq = whitening(xt)
    svd_g, svd_u = whitened_svd(wg, sq), whitened_svd(wu, sq)
    for r in svd_ranks:
        ag, bgf = svd_factors(svd_g, isq, r)
        au, buf = svd_factors(svd_u, isq, r)
        ge, ue = (x @ bgf.T) @ ag.T, (x @ buf.T) @ au.T
        run(f"svd r={r}", "svd", magnitude(ge, ue), 2 * (d * r + r * n),
            0.5 * (rel_error(ge, g) + rel_error(ue, u)), rank=r)
    vh_joint = whitened_svd(torch.cat([wg, wu]), sq)[2]
    for r in joint_ranks:
        ag, au, bj = joint_factors(wg, wu, sq, isq, vh_joint, r)
        z = x @ bj.T
        ge, ue = z @ ag.T, z @ au.T
        run(f"svd-joint r={r}", "svd-joint", magnitude(ge, ue), d * r + 2 * r * n,
            0.5 * (rel_error(ge, g) + rel_error(ue, u)), rank=r)
    # input-channel sparsity: per token the m channels with the largest |h_j| (||w_gate,j|| + ||w_up,j||)
    colw = (wg.norm(dim=0) + wu.norm(dim=0)).float()
    for m in channels:
        xs = x * (unit_ranks(x.abs() * colw) < m)
        ge, ue = xs @ wg.float().T, xs @ wu.float().T
        run(f"top-{m} input channels", "channels", magnitude(ge, ue), 2 * m * n + d,
            0.5 * (rel_error(ge, g) + rel_error(ue, u)), channels=m)
    # tolerance: exact gate/up plus Gaussian noise of relative size eps per unit
    rms_g, rms_u = g.pow(2).mean(0).sqrt(), u.pow(2).mean(0).sqrt()
    for eps in noise_levels:
        ge = g + eps * rms_g * torch.randn(g.shape, generator=gen)
        ue = u + eps * rms_u * torch.randn(u.shape, generator=gen)
        run(f"exact + noise {eps:g}", "noise", magnitude(ge, ue), None,
            0.5 * (rel_error(ge, g) + rel_error(ue, u)), noise=eps)
    study.rows["random"]["layers"][layer]["kept_fraction"] = round(float(kept.mean()), 4)


def trained_layer(study: Study, layer: int, held: TrainingData, train: TrainingData, units, ratio: float,
                  ranks, token_counts, train_ratios, epochs: int, seed: int) -> dict:
    """:func:`train_predictor` on one layer (its MLP part) at every rank and training size."""
    import dataclasses

    one = dataclasses.replace(units, num_layers=1)
    truth = oracle_mask(held, units, ratio)
    seconds = {}
    for tokens in token_counts:
        t = min(tokens, train.tokens)
        sub = TrainingData(attn_in=train.mlp_in[:, :t], mlp_in=train.mlp_in[:, :t],
                           mlp_rank=train.mlp_rank[:, :t], head_rank=train.head_rank[:, :t])
        for r in ranks:
            t0 = time.perf_counter()
            # head_rank=1: train_predictor also fits a head classifier (here on the MLP input), unused
            config = PredictorConfig(rank=r, head_rank=1, epochs=epochs, seed=seed)
            predictor = train_predictor(sub, one, train_ratios, config)
            with torch.no_grad():
                logits = predictor.mlp_logits(0, held.mlp_in[0])
            name = f"trained r={r}, {t} tokens"
            study.add(name, "trained", layer, recall_counts(logits, truth), predictor.mlp[0].macs(),
                      rank=r, training_tokens=t)
            seconds[name] = round(time.perf_counter() - t0, 1)
            cell = study.rows[name]["layers"][layer]
            print(f"    layer {layer}: {name}: recall {cell['hits'] / cell['oracle']:.3f} ({seconds[name]:.0f} s)",
                  flush=True)
    return seconds


# -- report ----------------------------------------------------------------------------------------

def summarise(study: Study, dense_macs: int, subset, all_layers) -> list[dict]:
    rows = []
    for row in study.rows.values():
        layers = row["layers"]
        out = {k: v for k, v in row.items() if k != "layers"}
        out["cost_ratio"] = None if row["macs"] is None else row["macs"] / dense_macs
        for label, which in (("recall_subset", subset), ("recall_all", all_layers)):
            have = [l for l in which if l in layers]
            out[label] = (sum(layers[l]["hits"] for l in have) / sum(layers[l]["oracle"] for l in have)
                          if have and len(have) == len(which) else None)
        errs = [layers[l]["rel_error"] for l in layers if "rel_error" in layers[l]]
        out["rel_error"] = sum(errs) / len(errs) if errs else None
        out["recall_per_layer"] = {str(l): round(v["hits"] / v["oracle"], 4) for l, v in sorted(layers.items())}
        extra = {}
        for key in ("kept_fraction", "g_pos_oracle", "g_pos_all"):
            vals = [v[key] for v in layers.values() if key in v]
            if vals:
                extra[key] = round(sum(vals) / len(vals), 4)
        out.update(extra)
        rows.append(out)
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, subset, all_layers) -> str:
    head = (f"| method | cost (MACs/token/layer) | cost / dense MLP | rel. error of g, u | "
            f"recall, layers {','.join(map(str, subset))} | recall, {len(all_layers)} layers |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cost = "-" if r["macs"] is None else f"{r['macs']:,}"
        if r.get("additions"):
            cost += f" (+{r['additions']:,} additions)"
        if r.get("bit_ops"):
            cost += f" (+{r['bit_ops']:,} bit ops)"
        method = r["method"].replace("|", "\\|")  # a literal | inside a markdown cell
        lines.append(f"| {method} | {cost} | {_fmt(r['cost_ratio'], '.3f')} | {_fmt(r['rel_error'], '.3f')} | "
                     f"{_fmt(r['recall_subset'], '.3f')} | {_fmt(r['recall_all'], '.3f')} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]
def prepare(args):
    """Model, units and the cached chunks: (model, units, held-out chunks, training chunks, key)."""
    model, tokenizer = load_model(args.model, dtype="float32")
    units = unit_map(model)
    total = args.heldout_seq + args.train_seq
    sequences = calibration_sequences(tokenizer, "wikitext2", total, args.seq_len)
    if len(sequences) < total:
        raise SystemExit(f"WikiText-2 valid gave {len(sequences)} windows, fewer than {total}")
    key = {"format": CACHE_FORMAT, "model": args.model, "fingerprint": weights_fingerprint(model),
           "calib": "wikitext2", "seq_len": args.seq_len, "dtype": "torch.float32"}
    cache = Path(args.cache)
    t0 = time.perf_counter()
    held = ensure_chunks(model, sequences, cache, key, args.chunk, [(0, args.heldout_seq)])
    train = ensure_chunks(model, sequences, cache, key, args.chunk, [(args.heldout_seq, total)])
    collected = sum(json.loads(_chunk_paths(cache, *c)[1].read_text()).get("seconds", 0) for c in held + train)
    return model, units, held, train, key, {"this_run": round(time.perf_counter() - t0, 1),
                                            "when_collected": round(collected, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heldout-seq", type=int, default=16, help="held-out windows (the first ones)")
    p.add_argument("--train-seq", type=int, default=256, help="training windows (after the held-out ones)")
    p.add_argument("--chunk", type=int, default=16, help="sequences per cache file")
    p.add_argument("--cache", default=str(REPO / "runs" / "bench_predictor_recall"))
    p.add_argument("--layers", default="all", help="layers for the closed-form predictors ('all' or a list)")
    p.add_argument("--trained-layers", default="2,15,29", help="layers for the trained predictors")
    p.add_argument("--ranks", default="32,64,128", help="trained predictor bottlenecks")
    p.add_argument("--train-tokens", default="8192,32768", help="training set sizes (first T training tokens)")
    p.add_argument("--train-ratios", default="0.3,0.5,0.7", help="soft-label ratios (as train-predictor)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--svd-ranks", default="16,32,64,128,256,384")
    p.add_argument("--joint-ranks", default="16,32,64,128,256,384")
    p.add_argument("--channels", default="32,64,96,144,288")
    p.add_argument("--noise", default="0.05,0.1,0.2,0.3,0.5")
    p.add_argument("--collect-only", action="store_true", help="only fill the oracle-data cache")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "predictor" / "recall_ceiling.json"))
    p.add_argument("--md", default=None, help="markdown report (default: --out with .md)")
    return p.parse_args(argv)


FAMILY_ORDER = ("baseline", "trained", "svd", "svd-joint", "channels", "sign", "exact", "noise")


def row_order(r: dict):
    cost = r["cost_ratio"] if r["cost_ratio"] is not None else r.get("noise", 0)
    return FAMILY_ORDER.index(r["family"]), cost, r.get("training_tokens", 0), r["method"]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, units, held_chunks, train_chunks, key, t_data = prepare(args)
    print(f"oracle data ready ({t_data['this_run']:.0f} s; cache {args.cache})", flush=True)
    if args.collect_only:
        return 0
    all_layers = list(range(units.num_layers)) if args.layers == "all" else _ints(args.layers)
    subset = _ints(args.trained_layers)
    d = model.config.hidden_size
    dense = units.mlp_unit_params * units.mlp_size  # gate + up + down, per token and layer
    study, train_seconds = Study(), {}
    t0 = time.perf_counter()
    for layer in sorted(set(all_layers) | set(subset)):
        held = load_layer(Path(args.cache), held_chunks, layer)
        train = load_layer(Path(args.cache), train_chunks, layer)
        closed_form_layer(study, model, layer, held, train, units, args.ratio, _ints(args.svd_ranks),
                          _ints(args.joint_ranks), _ints(args.channels), _floats(args.noise))
        if layer in subset:
            train_seconds[layer] = trained_layer(study, layer, held, train, units, args.ratio, _ints(args.ranks),
                                                 _ints(args.train_tokens), _floats(args.train_ratios),
                                                 args.epochs, args.seed)
        print(f"  layer {layer} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarise(study, dense, subset, all_layers)
    rows.sort(key=row_order)
    md_table = table(rows, subset, all_layers)
    print(md_table)
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_predictor_recall.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "command": command.strip(), "model": args.model, "fingerprint": key["fingerprint"],
        "ratio": args.ratio, "label_selector": "budget_gxo",
        "data": {"source": "wikitext2 valid", "seq_len": args.seq_len,
                 "heldout_sequences": [0, args.heldout_seq],
                 "train_sequences": [args.heldout_seq, args.heldout_seq + args.train_seq],
                 "heldout_tokens": args.heldout_seq * args.seq_len, "train_tokens": args.train_seq * args.seq_len},
        "layers_all": all_layers, "layers_trained": subset,
        "dense_mlp_macs": dense, "hidden": d, "mlp_size": units.mlp_size,
        "cost_note": ("multiply-adds per token and layer against the dense MLP (gate, up, down); "
                      "top-k, activations and bit operations not counted (bit ops / additions listed)"),
        "recall_note": ("MLP units only; per token the oracle's own number of kept units (budget rule "
                        "with the oracle's heads); recall = hits / oracle units over tokens and layers"),
        "trained": {"ranks": _ints(args.ranks), "train_tokens": _ints(args.train_tokens),
                    "train_ratios": _floats(args.train_ratios), "epochs": args.epochs, "seed": args.seed},
        "timing_s": {"oracle_data": t_data, "analysis": round(time.perf_counter() - t0, 1),
                     "training": train_seconds, "threads": torch.get_num_threads()},
        "rows": rows,
    }
    atomic_write_json(Path(args.out), report)
    md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
    atomic_write_text(md, markdown(report, md_table))
    print(f"wrote {args.out} and {md}")
    return 0


def _row(rows, method):
    return next((r for r in rows if r["method"] == method), None)


def conclusions(report: dict) -> list[str]:
    """Plain statements computed from the rows (the markdown's conclusion)."""
    rows, goal, budget = report["rows"], 0.9, 0.10
    sub = ",".join(map(str, report["layers_trained"]))
    priced = [r for r in rows if r["cost_ratio"] is not None and not r.get("additions") and not r.get("bit_ops")
              and r["family"] not in ("baseline",)]
    out = []
    for col, where in (("recall_all", f"all {len(report['layers_all'])} layers"), ("recall_subset", f"layers {sub}")):
        cheap = [r for r in priced if r["cost_ratio"] < budget and r[col] is not None]
        if not cheap:
            continue
        best = max(cheap, key=lambda r: r[col])
        reach = sorted((r for r in priced if r[col] is not None and r[col] >= goal), key=lambda r: r["cost_ratio"])
        text = (f"On {where}, the best predictor under {budget:.0%} of the MLP's multiply-adds is "
                f"**{best['method']}**: recall {best[col]:.3f} at {best['cost_ratio']:.1%}. ")
        text += (f"Recall {goal} is first reached by {reach[0]['method']} at {reach[0]['cost_ratio']:.1%} of the "
                 f"MLP (recall {reach[0][col]:.3f})." if reach
                 else f"No predictor reaches recall {goal} at any cost measured.")
        out.append(text)
    goal_met = any(r["cost_ratio"] < budget and (r["recall_all"] or 0) >= goal for r in priced)
    out.insert(0, f"**Goal (MLP recall >= {goal} at ratio {report['ratio']:g}, cost < {budget:.0%}): "
                  f"{'met' if goal_met else 'not met'}.**")
    noise = [r for r in rows if r["family"] == "noise" and r["recall_all"] is not None]
    ok = [r for r in noise if r["recall_all"] >= goal]
    if noise:
        out.append("Tolerance: the exact magnitude with Gaussian errors of relative size eps on g and u keeps "
                   + ", ".join(f"{r['recall_all']:.3f} at eps {r['noise']:g}" for r in noise)
                   + (f"; recall {goal} needs eps <= {max(r['noise'] for r in ok):g} or so." if ok else "."))
    trained = [r for r in rows if r["family"] == "trained"]
    by_rank: dict = {}
    for r in trained:
        by_rank.setdefault(r["rank"], []).append(r)
    if by_rank:
        parts = []
        for rank, rs in sorted(by_rank.items()):
            rs.sort(key=lambda r: r["training_tokens"])
            parts.append(f"rank {rank} ({rs[0]['cost_ratio']:.1%}): "
                         + " -> ".join(f"{r['recall_subset']:.3f}" for r in rs))
        sizes = " -> ".join(f"{t:,}" for t in sorted({r["training_tokens"] for r in trained}))
        out.append(f"Trained predictor (layers {sub}), recall with {sizes} training tokens: " + "; ".join(parts) + ".")
    out.extend(interpretation(report))
    return out


def interpretation(report: dict) -> list[str]:
    """What the curve says, from the rows (skipped when a row it quotes was not run)."""
    rows = report["rows"]
    exact, u_only = _row(rows, "exact |silu(g) u|"), _row(rows, "exact |u|")
    svd = sorted((r for r in rows if r["family"] == "svd"), key=lambda r: r["rank"])
    noise = sorted((r for r in rows if r["family"] == "noise"), key=lambda r: r["noise"])
    tern = _row(rows, "ternary W_gate, W_up times h (additions only)")
    sign = _row(rows, "exact sign(g) first, then |u|")
    even = report["hidden"] * report["mlp_size"] // (report["hidden"] + report["mlp_size"])
    out = []
    if exact and u_only:
        out.append(f"The oracle's choice is the activation magnitude: exact |silu(g) u| recovers "
                   f"{exact['recall_all']:.3f} of it (cost {exact['cost_ratio']:.1%}), while either factor alone "
                   f"does not (|u| {u_only['recall_all']:.3f}). So a predictor has to estimate a product of two "
                   "full-rank projections of the hidden state.")
    if svd and noise:
        out.append("Recall is governed by how accurately g and u are estimated, whatever the method: the SVD "
                   "rows' relative errors and recalls ("
                   + ", ".join(f"{r['rel_error']:.2f} -> {r['recall_all']:.3f}" for r in svd)
                   + ") track the Gaussian noise-tolerance curve ("
                   + ", ".join(f"{r['noise']:g} -> {r['recall_all']:.3f}" for r in noise)
                   + f"; close at small errors, the low-rank errors cost somewhat more at large ones). Recall 0.9 "
                   f"needs a relative error of about 0.1-0.15; the activation-whitened gate/up weights have so flat "
                   f"a spectrum that rank {svd[-1]['rank']} ({svd[-1]['cost_ratio']:.0%} of the MLP) still leaves "
                   f"{svd[-1]['rel_error']:.2f}, and a rank-r estimate of both stops being cheaper than the exact "
                   f"product at r = dN/(d+N) = {even}.")
    trained = [r for r in rows if r["family"] == "trained"]
    if trained:
        most = max(r["training_tokens"] for r in trained)
        pairs = []
        for r in sorted((r for r in trained if r["training_tokens"] == most), key=lambda r: r["macs"]):
            same = [c for c in rows if c["family"] in ("svd", "svd-joint", "channels") and c["macs"] <= r["macs"]
                    and c["recall_subset"] is not None]
            if same:
                best = max(same, key=lambda c: c["recall_subset"])
                pairs.append(f"{r['cost_ratio']:.1%}: trained r={r['rank']} {r['recall_subset']:.3f} vs "
                             f"{best['method']} {best['recall_subset']:.3f}")
        if pairs:
            out.append(f"At equal or lower cost (layers {','.join(map(str, report['layers_trained']))}; trained on "
                       f"{most:,} tokens against the best closed form that costs no more): " + "; ".join(pairs)
                       + ". Training helps most where the bottleneck is narrow; more data helps every rank.")
    if tern:
        out.append(f"Low-bit weights do not escape this: ternary gate/up weights applied to the exact hidden "
                   f"state (no multiplies, but {tern['additions']:,} additions) err by {tern['rel_error']:.2f} and "
                   f"reach {tern['recall_all']:.3f}; 1-bit sign(W).sign(h) features are near the static baseline.")
    if sign:
        out.append(f"The gate's sign carries little: only {sign.get('g_pos_all', float('nan')):.0%} of the "
                   f"pre-activations are positive, {sign.get('g_pos_oracle', float('nan')):.0%} of the oracle's "
                   f"units have g > 0 (silu's negative lobe times a large |u| is often kept), and ranking g > 0 "
                   f"first gives {sign['recall_all']:.3f}.")
    return out


def markdown(report: dict, md_table: str) -> str:
    d = report["data"]
    lines = [
        "# MLP recall against the oracle vs predictor cost (SmolLM2-135M, issue 4)" if report["model"] == "smollm2-135m"
        else f"# MLP recall against the oracle vs predictor cost ({report['model']})",
        "",
        "Reproduce (the oracle data is cached under `runs/bench_predictor_recall/`, gitignored):",
        "",
        f"```bash\n{report['command']}\n```",
        "",
        f"Held-out: the first {d['heldout_sequences'][1]} WikiText-2 *valid* windows of {d['seq_len']} tokens "
        f"({d['heldout_tokens']:,} tokens); training / calibration: the next "
        f"{d['train_sequences'][1] - d['train_sequences'][0]} windows ({d['train_tokens']:,} tokens). "
        f"Recall: {report['recall_note']}. Cost: {report['cost_note']}; dense MLP = "
        f"{report['dense_mlp_macs']:,} multiply-adds per token and layer. Ratio {report['ratio']:g}, labels "
        f"`{report['label_selector']}`. The 'rel. error' column is ||estimate - exact|| / ||exact|| of the gate "
        "and up pre-activations (mean of the two) on the held-out tokens.",
        "",
        md_table,
        "",
        f"Trained rows: `train_predictor` per layer on layers {','.join(map(str, report['layers_trained']))} "
        f"only (compute), with the soft labels of ratios {', '.join(map(str, report['trained']['train_ratios']))}, "
        f"{report['trained']['epochs']} epochs, seed {report['trained']['seed']}; the other rows also on every layer. "
        f"Time: oracle data {report['timing_s']['oracle_data']['when_collected']:.0f} s when collected "
        f"({(report['data']['heldout_tokens'] + report['data']['train_tokens']) // report['data']['seq_len']} "
        f"sequences), analysis {report['timing_s']['analysis']:.0f} s, {report['timing_s']['threads']} thread(s). "
        "Per-layer recalls are in the JSON.",
        "",
        "## Conclusion",
        "",
        *[f"- {c}" for c in conclusions(report)],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
