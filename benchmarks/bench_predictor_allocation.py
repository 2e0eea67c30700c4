"""Do a non-uniform layer allocation or another head/MLP split help the predictor path? (issue 4)

The predictor keeps, per token, ``ratio`` of every layer's parameters (heads first, then MLP
units: :class:`attrsparse.deploy.predictor.BudgetRule`). Here the same trained predictor is run
side by side with

* ``uniform``: one ratio in every layer (what ``attrsparse bench`` and ``generate`` run);
* ``greedy``: each layer's budget taken from a static calibration with the greedy allocation
  (``attrsparse calibrate --allocation greedy``: layer sensitivities on calibration KL, see
  :mod:`attrsparse.selectors.allocation`), via
  :func:`attrsparse.deploy.predictor.layer_ratios_from_masks`: the per-layer parameter fraction
  of the static masks, whose mean is the requested ratio;
* ``head power p`` (``--head-powers``): one ratio in every layer, but heads keep
  ``round(H * ratio ** p)`` of a layer's heads instead of the labels' ``p = 0.5`` and the MLP units
  fill the rest of the same parameter budget (``p = 0``: every head; larger ``p``: fewer heads,
  more MLP units).

Quality against the ground truth on held-out data (every position sparse, the predictor choosing
per token): WikiText-2 *test* perplexity on ``--ppl-tokens`` tokens and ``--task`` accuracy on
``--task-items`` items; the calibration uses WikiText-2 *valid*. Executed ratios are measured.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_predictor_allocation.py --predictor runs/predictor32k \\
        --ratios 0.7,0.8 --head-powers 0,1,1.5 --out docs/results/predictor/allocation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from attrsparse.core.errors import UserError  # noqa: E402
from attrsparse.core.io import atomic_write_json  # noqa: E402
from attrsparse.core.models import load_model  # noqa: E402
from attrsparse.core.units import unit_map  # noqa: E402
from attrsparse.deploy.calibrate import run_calibration  # noqa: E402
from attrsparse.evaluation.evaluate import evaluate_task  # noqa: E402
from attrsparse.policies import make_policy  # noqa: E402
from attrsparse.policies.predictor import load_predictor_policy  # noqa: E402
from attrsparse.policies.static import load_static_policy
from attrsparse.selectors.budget import BudgetRule
from attrsparse.selectors.predictor import layer_ratios_from_masks


def greedy_allocation(model, tok, ratios, static_dir: Path, n_sequences: int, spec: str) -> None:
    """Calibrate ``static_dir`` with the greedy allocation unless it already holds ``ratios``
    from a greedy search (its entries then record the search's loss)."""
    try:
        if all("greedy_loss" in load_static_policy(static_dir, r).entry for r in ratios):
            return
    except UserError:  # no calibration there yet, or not at these ratios
        pass
    run_calibration(model, tok, static_dir, ratios=ratios, allocation="greedy", n_sequences=n_sequences,
                    spec=spec)


def evaluate(model, tok, policy, args) -> dict:
    ppl = evaluate_task(model, tok, "wikitext2", policy, max_tokens=args.ppl_tokens)
    task = evaluate_task(model, tok, args.task, policy, limit=args.task_items)
    return {"wikitext2_ppl": ppl["ppl"], f"{args.task}_acc": task["acc"],
            "executed_ratio": ppl["executed_ratio"], "executed_ratio_task": task["executed_ratio"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--predictor", required=True, help="a train-predictor directory")
    p.add_argument("--ratios", default="0.7,0.8")
    p.add_argument("--head-powers", default="0,1,1.5", help="head/MLP splits to run besides the labels' "
                                                            "0.5 ('' for none)")
    p.add_argument("--static-dir", default=str(REPO / "runs" / "predictor_allocation" / "greedy"),
                   help="greedy calibration (reused when it holds the ratios)")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--task-items", type=int, default=50)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "predictor" / "allocation.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ratios = [float(r) for r in args.ratios.split(",")]
    model, tok = load_model(args.model, dtype="float32")
    units = unit_map(model)
    t0 = time.perf_counter()
    greedy_allocation(model, tok, ratios, Path(args.static_dir), args.calib_seqs, args.model)
    rows = [{"allocation": "dense", "ratio": 1.0, **evaluate(model, tok, make_policy("dense", 1.0), args)}]
    for ratio in ratios:
        static = load_static_policy(args.static_dir, ratio)
        layer_ratios = layer_ratios_from_masks(static.masks, units)
        for allocation in ("uniform", "greedy"):
            policy = load_predictor_policy(args.predictor, ratio,
                                           layer_ratios=layer_ratios if allocation == "greedy" else None)
            row = {"allocation": allocation, "ratio": ratio, **evaluate(model, tok, policy, args)}
            if allocation == "greedy":
                row["layer_ratios"] = [round(r, 4) for r in layer_ratios]
                row["static_allocation"] = static.entry.get("allocation")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layer_ratios"}), flush=True)
        for power in [float(x) for x in args.head_powers.split(",") if x.strip()]:
            policy = load_predictor_policy(args.predictor, ratio, head_power=power)
            row = {"allocation": f"head power {power:g}", "ratio": ratio, "head_power": power,
                   "heads_kept": BudgetRule(units, ratio, power).head_keep,
                   **evaluate(model, tok, policy, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"command": "OMP_NUM_THREADS=1 python benchmarks/bench_predictor_allocation.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "predictor": args.predictor, "task": args.task,
              "task_items": args.task_items, "ppl_tokens": args.ppl_tokens,
              "note": "ground truth, held-out (WikiText-2 test, task items from 0); calibration on WikiText-2 valid",
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
