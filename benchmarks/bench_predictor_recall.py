"""Recall-vs-cost of MLP unit predictors against the oracle (issue 4): how close can a cheap
predictor get to the units ``budget_gxo`` keeps?

Data: WikiText-2 *valid* windows of ``--seq-len`` tokens (:func:`attrsparse.data.calibration.calibration_sequences`);
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

from attrsparse.core.fingerprint import model_fingerprint  # noqa: E402
from attrsparse.core.io import atomic_save_tensors, atomic_write_json, atomic_write_text, stable_hash  # noqa: E402
from attrsparse.core.models import load_model  # noqa: E402
from attrsparse.core.units import unit_map  # noqa: E402
from attrsparse.data.calibration import calibration_sequences  # noqa: E402
from attrsparse.deploy.predictor import PredictorConfig, TrainingData, collect_training_data, train_predictor
from attrsparse.selectors.budget import BudgetRule
from attrsparse.selectors.topk import unit_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predictor_recall_report import markdown, row_order, summarise, table  # noqa: E402

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
    key = {"format": CACHE_FORMAT, "model": args.model, "fingerprint": model_fingerprint(model),
           "calib": "wikitext2", "seq_len": args.seq_len, "dtype": "torch.float32"}
    cache = Path(args.cache)
    t0 = time.perf_counter()
    held = ensure_chunks(model, sequences, cache, key, args.chunk, [(0, args.heldout_seq)])
    train = ensure_chunks(model, sequences, cache, key, args.chunk, [(args.heldout_seq, total)])
    collected = sum(json.loads(_chunk_paths(cache, *c)[1].read_text()).get("seconds", 0) for c in held + train)
    return model, units, held, train, key, {"this_run": round(time.perf_counter() - t0, 1),
                                            "when_collected": round(collected, 1)}


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (for the report)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


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
        "command": command.strip(), "model": args.model, "cache": _relative(args.cache), "fingerprint": key["fingerprint"],
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


if __name__ == "__main__":
    raise SystemExit(main())
