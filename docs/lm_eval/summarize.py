"""Table of docs/lm_eval.md from the runs of run_smollm2.sh: accuracy, executed ratios, agreement
with the dense model (``--model hf``) and the mean change of each choice's log-likelihood."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lm_eval")
NAMES = ["hf", "dense1", "wina05", "teal05", "cats05", "wanda05", "random05", "corrected_gxo05"]


def load(name: str):
    results = sorted((RUNS / name).rglob("results_*.json"))
    samples = sorted((RUNS / name).rglob("samples_*.jsonl"))
    if not results or not samples:
        return None
    lines = samples[-1].read_text().splitlines()
    return json.loads(results[-1].read_text()), {
        s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in map(json.loads, lines)}


def main() -> None:
    dense = load("hf")
    if dense is None:
        raise SystemExit(f"no --model hf run under {RUNS}")
    for name in NAMES:
        run = load(name)
        if run is None:
            continue
        results, lls = run
        acc = results["results"]["arc_easy_local"]
        info = results["config"].get("attrsparse", {})
        same = sum(max(range(len(v)), key=v.__getitem__) == max(range(len(dense[1][d])), key=dense[1][d].__getitem__)
                   for d, v in lls.items()) / len(lls)
        diffs = [abs(a - b) for d, v in lls.items() for a, b in zip(v, dense[1][d])]
        print(f"{name:16s} acc {acc['acc,none']:.2f}±{acc['acc_stderr,none']:.2f} "
              f"acc_norm {acc['acc_norm,none']:.2f}±{acc['acc_norm_stderr,none']:.2f} "
              f"executed {info.get('executed_ratio', 1.0):.3f} mlp {info.get('executed_ratio_mlp', 1.0):.3f} "
              f"heads {info.get('executed_ratio_heads', 1.0):.3f} "
              f"with-decision {info.get('executed_ratio_with_decision_cost', float('nan')):.3f} "
              f"same-choice {same:.2f} |dll| {sum(diffs) / len(diffs):.2f} identical={lls == dense[1]}")


if __name__ == "__main__":
    main()
