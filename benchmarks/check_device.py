"""Check the engine on an accelerator against the CPU: the same runs, side by side, one JSON.

On the default model (or ``--model``), with ``--device cuda`` (or ``cuda:N``):

* ``sweep``: 2 TruthfulQA questions, corrected GxO and magnitude at 0.5 (MC1 included), on the
  device and on the CPU: dense reproduced on both, the share of variants whose text is the same,
  the largest gap in executed ratio and BLEU against dense;
* ``evaluate``: ARC-Easy (``--items``) dense and TEAL at 0.5: accuracy on both, executed ratios;
* ``calibrate``: uniform static masks at 0.5 from 4 WikiText-2 windows: the share of units both
  runs keep;
* ``torchrun``: with 2+ GPUs, the sweep under ``torchrun --nproc-per-node 2`` (nccl) against the
  one-process device run (records equal up to timings).

Numbers on the device are not bitwise the CPU's (other kernels); the point is that every stage
runs there and agrees to rounding. Usage::

    python benchmarks/check_device.py --device cuda --out docs/results/check_device.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _sweep(model, tok, out: Path) -> dict:
    from attrsparse.experiments.sweep import Sweep, SweepConfig

    cfg = SweepConfig(metrics=["corrected_gxo", "magnitude"], ratios=[0.5, 1.0], limit=2, max_new_tokens=24)
    return Sweep(cfg, out, model=model, tokenizer=tok).run(progress=False)


def _variants(results: dict) -> dict:
    return {(q["index"], v["metric"], v["requested_ratio"]): v for q in results["questions"] for v in q["variants"]}


def compare_sweeps(device_run: dict, cpu_run: dict) -> dict:
    a, b = _variants(device_run), _variants(cpu_run)
    return {"dense_reproduced": [q["dense_reproduced"] for q in device_run["questions"]],
            "same_text": sum(a[k]["text"] == b[k]["text"] for k in a) / len(a),
            "max_executed_ratio_gap": max(abs(a[k]["executed_ratio"] - b[k]["executed_ratio"]) for k in a),
            "max_bleu_gap": max(abs(a[k]["bleu_vs_dense"] - b[k]["bleu_vs_dense"]) for k in a)}


def _evaluate(model, tok, items: int) -> dict:
    from attrsparse.data.calibration import calibration_sequences
    from attrsparse.evaluation.evaluate import evaluate_task
    from attrsparse.policies import make_policy

    out = {}
    for name, ratio in (("dense", 1.0), ("teal_units", 0.5)):
        policy = make_policy(name, ratio)
        if policy.mode in ("online", "static"):
            policy.prepare(model, calibration_sequences(tok, "wikitext2", 4, 128))
        r = evaluate_task(model, tok, "arc_easy", policy, limit=items)
        out[name] = {"acc": r["acc"], "executed_ratio": r["executed_ratio"]}
    return out


def _calibrate(model, tok, out: Path) -> torch.Tensor:
    from attrsparse.core.io import load_tensors
    from attrsparse.deploy.calibrate import run_calibration

    run_calibration(model, tok, out, ratios=[0.5], n_sequences=4, seq_len=128, progress=False)
    return load_tensors(out / "static.safetensors")


def _torchrun_sweep(model_spec: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "attrsparse", "sweep", "--model", model_spec, "--metrics", "corrected_gxo,magnitude", "--ratios",
           "0.5,1.0", "--limit", "2", "--max-new-tokens", "24", "--device", "cuda", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--items", type=int, default=20, help="ARC-Easy items")
    p.add_argument("--out", default="docs/results/check_device.json")
    args = p.parse_args(argv)
    from attrsparse.core.distributed import resolve_device
    from attrsparse.core.models import load_model

    device = resolve_device(args.device)
    report = {"benchmark": "check_device", "model": args.model, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for where in dict.fromkeys((device, torch.device("cpu"))):
            t0 = time.perf_counter()
            model, tok = load_model(args.model, device=where)
            runs[where.type] = {"sweep": _sweep(model, tok, Path(tmp) / f"sweep-{where.type}"),
                                "evaluate": _evaluate(model, tok, args.items),
                                "masks": _calibrate(model, tok, Path(tmp) / f"calib-{where.type}")}
            report[f"seconds_{where.type}"] = round(time.perf_counter() - t0, 1)
            del model
        dev, cpu = runs[device.type], runs["cpu"]
        report["sweep"] = compare_sweeps(dev["sweep"], cpu["sweep"])
        report["evaluate"] = {"device": dev["evaluate"], "cpu": cpu["evaluate"]}
        report["calibrate_same_units"] = {k: float((dev["masks"][k] == cpu["masks"][k]).float().mean())
                                          for k in dev["masks"] if dev["masks"][k].dtype == torch.bool}
        if device.type == "cuda" and torch.cuda.device_count() >= 2:
            proc = _torchrun_sweep(args.model, Path(tmp) / "torchrun")
            report["torchrun_returncode"] = proc.returncode
            if proc.returncode == 0:
                merged = json.loads((Path(tmp) / "torchrun" / "results.json").read_text())
                report["torchrun_vs_one_process"] = compare_sweeps(merged, dev["sweep"])
            else:
                report["torchrun_stderr"] = proc.stderr[-3000:]
        else:
            report["torchrun"] = "skipped: needs 2 or more GPUs"
    print(json.dumps(report, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
