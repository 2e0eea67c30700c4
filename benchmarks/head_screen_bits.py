"""Would a screen of fewer bits make an int8 LM head cheaper? Exact screening needs the bound.

For the int8 head of the engine (per-row scales), a screening copy of b bits per weight (per-row
scale, symmetric) and the screen's exact bound (Cauchy-Schwarz: |exact_v - approx_v| <=
||W_v - approx row_v||·||h||, the rounding terms left out, which only makes the count smaller):
how many vocabulary rows each token would still have to read exactly, on the final hidden states
of the first ``--tokens`` tokens of WikiText-2 test.

    .venv/bin/python benchmarks/head_screen_bits.py --tokens 128 --out docs/results/head-screen-bits.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from attrsparse.core.io import atomic_write_json
from attrsparse.core.models import load_model
from attrsparse.data.tasks import load_task
from attrsparse.deploy.engine.pack import quantize


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--bits", default="4,5,6,7")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    head = quantize(model.get_output_embeddings().weight, "int8", dim=0)[2].double()  # the int8 head's values
    text = load_task("wikitext2", None, split="test")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :args.tokens]
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1][0].double()  # after the final norm
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        qmax = 2 ** (bits - 1) - 1
        s = head.abs().amax(1).clamp_min(1e-30) / qmax
        approx = torch.round(head / s[:, None]).clamp(-qmax, qmax) * s[:, None]
        bound = (head - approx).norm(dim=1)[None, :] * h.norm(dim=1)[:, None]
        z = h @ approx.T
        best_lower = (z - bound).max(1).values
        candidates = ((z + bound) >= best_lower[:, None]).sum(1).double()
        rows.append({"bits": bits, "candidates_mean": float(candidates.mean()),
                     "candidates_median": float(candidates.median()), "candidates_max": float(candidates.max()),
                     "vocab": int(head.shape[0]), "screen_mb": head.numel() * bits / 8 / 1e6,
                     "exact_rows_mb_mean": float(candidates.mean()) * head.shape[1] / 1e6,
                     "int8_head_mb": head.numel() / 1e6})
        print(rows[-1], flush=True)
    atomic_write_json(args.out, {"command": shlex.join([sys.executable, *sys.argv]), "model": args.model,
                                 "tokens": int(ids.shape[1]), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
