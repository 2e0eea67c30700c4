"""Which channel score for the input-sparse LM head? Variants on calibration and held-out text.

The head's input h (the final normed hidden state) and the attribution g = dL/dh of the text's
next-token loss on ``--calib-sequences`` windows of WikiText-2 valid (128 tokens each, as
``attrsparse calibrate``), through :func:`attrsparse.deploy.engine.head_rule.head_statistics`; then, on
``--tokens`` held-out tokens (``--eval valid``: the windows of WikiText-2 valid that follow the
calibration windows, for choosing the rule on the calibration side; ``test``: the first tokens of
WikiText-2 test; windows of 128; the valid ones predict 127 tokens each), for each score and head ratio:
the threshold keeping that fraction of the calibration scores, and the perplexity and top-1
agreement with the full head of the logits with the dropped channels at zero (or, centred, at
their calibration mean, the mean's share added back as a bias). Scores: ``magnitude`` |h_j|,
``wina`` |h_j|·‖W[:, j]‖, ``attr`` |h_j|·a_j (the engine's rule, ``head_scale``). In torch, fp32.

    .venv/bin/python benchmarks/head_rule_variants.py --model smollm2-135m --out docs/results/sparse-head/variants-smollm2.json
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from attrsparse.core.io import atomic_write_json
from attrsparse.core.models import load_model
from attrsparse.data.calibration import calibration_sequences
from attrsparse.data.tasks import load_task
from attrsparse.deploy.engine.head_rule import apply_rule, fit_thresholds, head_scale, head_statistics


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ratios", default="0.3,0.5,0.7,0.85")
    ap.add_argument("--eval", default="valid", choices=["valid", "test"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    model, tok = load_model(args.model)
    W = model.get_output_embeddings().weight.detach().float()
    n_eval = args.tokens // 128
    if args.eval == "valid":  # the same windows as calibration_sequences, then the next n_eval ones
        windows = calibration_sequences(tok, n_sequences=args.calib_sequences + n_eval)
        calib, test = windows[:args.calib_sequences], windows[args.calib_sequences:]
    else:
        calib = calibration_sequences(tok, n_sequences=args.calib_sequences)
        text = load_task("wikitext2", None, split="test")
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:n_eval * 128 + 1]
        test = [ids[i:i + 129] for i in range(0, len(ids) - 1, 128)]
    hc, gc, _ = head_statistics(model, calib)
    ht, _, _ = head_statistics(model, test)
    targets = torch.cat([s[1:] for s in test])
    ht, hc = ht.float(), hc.float()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        top, nll = [], 0.0
        for s in range(0, len(x), 256):
            z = x[s:s + 256] @ W.T
            top.append(z.argmax(-1))
            nll += torch.nn.functional.cross_entropy(z, targets[s:s + 256], reduction="sum").item()
        return torch.cat(top), nll / len(x)

    dense_top, dense_nll = run(ht)
    rows = [{"score": "dense", "centred": False, "ratio": 1.0, "ppl": math.exp(dense_nll), "top1_agreement": 1.0}]
    print(rows[-1], flush=True)
    scales = {"magnitude": torch.ones(W.shape[1]), "wina": W.norm(dim=0), "attr": head_scale(hc.double(), gc).float()}
    for name, a in scales.items():
        for centred in (False, True):
            fits = fit_thresholds(hc, a, ratios, centred)
            for r in ratios:
                x, kept = apply_rule(ht, fits[r][0], a, fits[r][1])
                top, nll = run(x)
                rows.append({"score": name, "centred": centred, "ratio": r, "read": float(kept.float().mean()),
                             "ppl": math.exp(nll), "ppl_vs_dense": math.exp(nll - dense_nll) - 1,
                             "top1_agreement": float((top == dense_top).float().mean())})
                print(rows[-1], flush=True)
    atomic_write_json(args.out, {"command": shlex.join([sys.executable, *sys.argv]), "model": args.model,
                                 "eval": args.eval,
                                 "calibration_tokens": int(hc.shape[0]), "test_tokens": int(ht.shape[0]),
                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
