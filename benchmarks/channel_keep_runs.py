"""Would a channel order that clusters often-kept channels give the engine's kernels contiguous runs?

For one calibrated channel rule (a ``calibrate`` folder and one ratio), the decisions of every
projection of every layer on WikiText-2 text: each channel's keep frequency on the *valid* split,
then on the *test* split the kept rows per token counted as runs of consecutive rows, in the
stored order and with the rows sorted by that frequency (what a permutation of the weight rows
would give the engine). Decisions are taken on the dense model's activations (each site's input
as the dense forward computes it) by the rule's own test (``ChannelRuleSet.keep``, which the
native engine is tested to reproduce).

    .venv/bin/python benchmarks/channel_keep_runs.py --channels runs/chan-x --ratio 0.6 \\
        --tokens 512 --out docs/results/channel-keep-runs/keep_runs.json

Writes one JSON file (``command``, per ``(layer, projection)`` rows and the means per projection)
and prints the means.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from attrsparse.core.io import atomic_write_json
from attrsparse.core.models import load_model
from attrsparse.core.sites import site_map
from attrsparse.data.tasks import load_task
from attrsparse.deploy.engine.sites import SITE_PROJECTIONS
from attrsparse.policies.channel import load_channel_policy

LONG = 16  # kept runs this long reach the ideal speed-up one row per pass (docs/engine.md, Kernel)


def run_stats(mask: np.ndarray) -> tuple[float, float]:
    """Mean runs of kept rows per token, and the fraction of kept rows in runs of >= LONG rows."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    runs, long_rows = 0, 0
    for row in edges:
        length = np.flatnonzero(row == -1) - np.flatnonzero(row == 1)
        runs += len(length)
        long_rows += int(length[length >= LONG].sum())
    return runs / len(mask), long_rows / max(1, int(mask.sum()))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--channels", type=Path, required=True, help="an `attrsparse calibrate` folder")
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    rules = load_channel_policy(args.channels, args.ratio).rule.bind(model)
    sites = site_map(model).layers
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    for l, layer in enumerate(sites):
        for name, site in layer.items():
            site.modules[0].register_forward_pre_hook(
                lambda m, a, key=(l, name): inputs.__setitem__(key, a[0][0].detach()))

    def decisions(split: str) -> dict[tuple[int, str], np.ndarray]:
        text = load_task("wikitext2", None, split=split)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :args.tokens]
        with torch.no_grad():
            model(ids)
        out = {}
        for (l, name), x in inputs.items():
            for consumer, proj in enumerate(SITE_PROJECTIONS[name]):
                keep = rules.keep(l, name, consumer, x)
                out[(l, proj)] = (torch.ones_like(x, dtype=torch.bool) if keep is None else keep).numpy()
        return out

    calib, test = decisions("validation"), decisions("test")
    rows = []
    for (l, proj), mask in sorted(test.items()):
        freq = calib[(l, proj)].mean(0)
        order = np.argsort(-freq, kind="stable")
        runs, long_frac = run_stats(mask)
        sorted_runs, sorted_long = run_stats(mask[:, order])
        rows.append({"layer": l, "projection": proj, "channels": int(mask.shape[1]), "kept": float(mask.mean()),
                     "runs": runs, "runs_sorted": sorted_runs, "long_fraction": long_frac,
                     "long_fraction_sorted": sorted_long, "always": float((freq > 0.95).mean()),
                     "never": float((freq < 0.05).mean())})
    keys = ("kept", "runs", "runs_sorted", "long_fraction", "long_fraction_sorted", "always", "never")
    means = {}
    for proj in dict.fromkeys(r["projection"] for r in rows):
        sel = [r for r in rows if r["projection"] == proj]
        means[proj] = {k: float(np.mean([r[k] for r in sel])) for k in keys}
        print(proj, " ".join(f"{k} {v:.3g}" for k, v in means[proj].items()), flush=True)
    atomic_write_json(args.out, {"command": shlex.join([sys.executable, *sys.argv]),
                                 "config": {k: str(v) for k, v in vars(args).items()},
                                 "long_run_rows": LONG, "means": means, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
