"""Time the sweep's stages on a real model.

Runs :class:`attrsparse.experiments.sweep.Sweep` into a temporary directory (fresh: no records, no trace
cache) and reports, per question and in total, the seconds of each stage recorded in the
question's ``timings`` (labels = dense greedy label, scoring = trace + scores + masks, masked
decoding = all variants in one batch, mc1 = masked log-likelihoods of the MC1 candidates), plus
the time of a plain dense greedy decode of the same number of tokens for reference.

Usage::

    python benchmarks/bench_sweep.py --questions 3 --out bench_sweep.json

Prints a table on stdout (and the JSON when ``--out`` is not given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("labels", "scoring", "masked_decoding", "mc1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    p.add_argument("--questions", type=int, default=3, help="number of TruthfulQA questions")
    p.add_argument("--offset", type=int, default=0, help="first question index")
    p.add_argument("--metrics", default="magnitude,gxo,corrected_gxo")
    p.add_argument("--ratios", default="0.3,0.5,0.7,1.0")
    p.add_argument("--data", default=None, help="TruthfulQA CSV (default: the bundled copy)")
    p.add_argument("--template", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--no-mc1", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dense-repeats", type=int, default=1,
                   help="dense reference decodes per question (the minimum is reported)")
    p.add_argument("--keep", default=None, help="write the sweep here instead of a temp dir")
    p.add_argument("--out", default=None, help="write the JSON report to this path")
    return p.parse_args(argv)


def _dense_reference(sweep, item, tokens: int, repeats: int) -> dict:
    """Seconds of a dense greedy decode of ``tokens`` tokens (single row, KV cache), the way the
    labels are made and the way the batch decoder runs one row."""
    from attrsparse.core.decoding import masked_greedy_decode
    from attrsparse.data.prompts import encode_prompt, greedy_continuation

    prompt = encode_prompt(sweep.tok, item.question, sweep.template)
    greedy, batched = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        greedy_continuation(sweep.model, prompt, tokens, sweep.stop_ids)
        greedy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        masked_greedy_decode(sweep.model, [prompt], None, tokens, sweep.stop_ids, sweep.pad_id)
        batched.append(time.perf_counter() - t0)
    return {"dense_decode": min(greedy), "dense_decode_batch1": min(batched)}


def run(args) -> dict:
    import torch
    import transformers

    from attrsparse.cli.experiments import _metric_names, comma_floats
    from attrsparse.core.models import load_model
    from attrsparse.experiments.sweep import Sweep, SweepConfig

    config = SweepConfig(model=args.model, data=args.data, metrics=_metric_names(args.metrics),
                         ratios=comma_floats(args.ratios, "--ratios"), template=args.template,
                         limit=args.questions, offset=args.offset,
                         max_new_tokens=args.max_new_tokens, ig_steps=args.ig_steps,
                         mc1=not args.no_mc1).validate()  # bad input fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench_sweep-") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        sweep = Sweep(config, out, model=model, tokenizer=tok)
        t0 = time.perf_counter()
        results = sweep.run(progress=False)
        sweep_s = time.perf_counter() - t0

        questions = []
        for item, record in zip(sweep.items, results["questions"]):
            n_variants = len(record["variants"])
            entry = {"index": record["index"], "prompt_tokens": record["prompt_tokens"],
                     "dense_tokens": record["dense_tokens"], "rows_decoded": n_variants,
                     # dense MC1 runs even with --no-mc1 (which skips MC1 under the masks)
                     "mc1_choices": 1 + sum(1 for a in item.incorrect_answers if a.strip()),
                     **{s: record["timings"][s] for s in STAGES}}
            entry["total"] = sum(entry[s] for s in STAGES)
            entry.update(_dense_reference(sweep, item, record["dense_tokens"], args.dense_repeats))
            entry["masked_decoding_vs_dense"] = entry["masked_decoding"] / entry["dense_decode"]
            questions.append(entry)

    totals = {s: sum(q[s] for q in questions) for s in STAGES + ("total", "dense_decode",
                                                                  "dense_decode_batch1")}
    n = len(questions)
    return {
        "benchmark": "bench_sweep",
        "settings": {"model": args.model, "questions": n, "offset": args.offset,
                     "metrics": config.metrics, "ratios": config.ratios,
                     "template": sweep.template, "max_new_tokens": args.max_new_tokens,
                     "mc1": config.mc1, "ig_steps": args.ig_steps},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
                        "machine": platform.machine()},
        "seconds": {"model_load": load_s, "sweep_wall": sweep_s,
                    "outside_stages": sweep_s - totals["total"],  # results, CSV, plots, report
                    "totals": totals,
                    "per_question_mean": {k: v / n for k, v in totals.items()}},
        "questions": questions,
        "dense_reproduced": results["dense"]["dense_reproduced"],
    }


def table(report: dict) -> str:
    cols = ("labels", "scoring", "masked_decoding", "mc1", "total", "dense_decode")
    head = (f"{'question':>8} {'P':>4} {'T':>3} {'rows':>4} {'mc':>3} "
            + " ".join(f"{c:>15}" for c in cols))
    lines = ["seconds per stage (P prompt tokens, T label tokens, rows decoded in one batch, "
             "mc MC1 candidates)", head, "-" * len(head)]
    for q in report["questions"]:
        lines.append(f"{q['index']:>8} {q['prompt_tokens']:>4} {q['dense_tokens']:>3} "
                     f"{q['rows_decoded']:>4} {q['mc1_choices']:>3} "
                     + " ".join(f"{q[c]:>15.2f}" for c in cols))
    secs = report["seconds"]
    for name, values in (("total", secs["totals"]), ("mean", secs["per_question_mean"])):
        lines.append(f"{name:>8} {'':>4} {'':>3} {'':>4} {'':>3} "
                     + " ".join(f"{values[c]:>15.2f}" for c in cols))
    lines.append(f"model load {secs['model_load']:.1f} s; sweep wall {secs['sweep_wall']:.1f} s "
                 f"(outside the stages: {secs['outside_stages']:.1f} s); "
                 f"torch threads {report['environment']['torch_threads']}; "
                 f"dense reproduced {report['dense_reproduced']}/{len(report['questions'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from attrsparse.core.errors import UserError

    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as err:
        print(f"bench_sweep: error: {err}", file=sys.stderr)
        return 2
    print(table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
