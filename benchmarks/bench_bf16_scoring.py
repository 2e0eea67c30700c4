"""Accuracy (and time) of bf16 corrected-GxO scoring against fp32 on the default model.

For each of a few TruthfulQA questions (chat template): the fp32 model's dense greedy label;
then corrected-GxO scores along that same label from the model loaded in fp32 and in bf16
(``--dtype bfloat16`` of ``attrsparse sweep``; one forward and one backward each). Reported, MLP
and heads separately, pooled over the questions' tokens and layers:

* ``rel_error``: ``||s_bf16 - s_fp32||_2 / ||s_fp32||_2``;
* ``topk_agreement``: for per-layer top-k masks at ``--ratio`` (the paper's rule), the fraction of
  the units kept by the fp32 scores that the bf16 scores keep as well (kept sets have equal size);
* ``exact_mask_rows``: fraction of (token, layer) rows whose bf16 mask equals the fp32 one;
* ``spearman``: mean over (token, layer) rows of the rank correlation of the two score vectors;
* scoring seconds per question of each dtype (min of ``--repeats``).

Usage (about a minute on 2 cores)::

    python benchmarks/bench_bf16_scoring.py --questions 5 --out docs/results/bench_bf16_scoring.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2, help="timed scoring runs per dtype (min kept)")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation of matching rows of ``[..., K]`` tensors (ties broken by position)."""
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def compare(fp32: torch.Tensor, bf16: torch.Tensor, ratio: float) -> dict:
    """Statistics of bf16 vs fp32 scores ``[T, L, K]`` (module docstring)."""
    from attrsparse.selectors.topk import keep_count, top_k

    ref, low = fp32.double(), bf16.double()
    k = keep_count(ratio, ref.shape[-1])
    keep_ref, keep_low = top_k(ref, k), top_k(low, k)
    return {"rel_error": float((low - ref).norm() / ref.norm()),
            "topk_agreement": float((keep_ref & keep_low).sum() / keep_ref.sum()),
            "exact_mask_rows": float((keep_ref == keep_low).all(-1).double().mean()),
            "spearman": float(_spearman_rows(ref, low).mean()),
            "elements": ref.numel()}


def main(argv=None) -> int:
    import transformers

    from attrsparse import score
    from attrsparse.core.io import atomic_write_json
    from attrsparse.core.models import load_model
    from attrsparse.core.trace import trace_gradients
    from attrsparse.data.prompts import encode_prompt, greedy_continuation, resolve_template, stop_token_ids
    from attrsparse.data.tasks import load_truthfulqa

    args = parse_args(argv)
    items = load_truthfulqa(args.data, limit=args.questions, offset=args.offset)
    model32, tok = load_model(args.model, dtype="float32")
    model16, _ = load_model(args.model, dtype="bfloat16")
    template = resolve_template(tok, "auto")
    stops = stop_token_ids(tok, model32)
    per_question, pooled = [], {"fp32": {"mlp": [], "heads": []}, "bf16": {"mlp": [], "heads": []}}
    seconds = {"fp32": [], "bf16": []}
    for item in items:
        prompt = encode_prompt(tok, item.question, template)
        label = greedy_continuation(model32, prompt, args.max_new_tokens, stops)  # fp32 label for both
        row = {"index": item.index, "tokens": int(label.numel())}
        for name, model in (("fp32", model32), ("bf16", model16)):
            times = []
            for _ in range(max(1, args.repeats)):
                t0 = time.perf_counter()
                trace = trace_gradients(model, prompt, label).row(0)
                scores = score(model, prompt, label, metrics=["corrected_gxo"], trace=trace)["corrected_gxo"]
                times.append(time.perf_counter() - t0)
            seconds[name].append(min(times))
            row[f"{name}_seconds"] = min(times)
            pooled[name]["mlp"].append(scores.mlp.float())
            pooled[name]["heads"].append(scores.heads.float())
        for part in ("mlp", "heads"):
            row[part] = compare(pooled["fp32"][part][-1], pooled["bf16"][part][-1], args.ratio)
        per_question.append(row)
        print(f"q{item.index}: {row['tokens']} tokens, MLP rel err {row['mlp']['rel_error']:.4f}, "
              f"top-k agreement {row['mlp']['topk_agreement']:.4f}; heads {row['heads']['rel_error']:.4f}, "
              f"{row['heads']['topk_agreement']:.4f}", flush=True)

    summary = {part: compare(torch.cat(pooled["fp32"][part]), torch.cat(pooled["bf16"][part]), args.ratio)
               for part in ("mlp", "heads")}
    summary["seconds_per_question"] = {k: sum(v) / len(v) for k, v in seconds.items()}
    summary["bf16_time_vs_fp32"] = summary["seconds_per_question"]["bf16"] / summary["seconds_per_question"]["fp32"]
    print(f"\n{'units':<6} {'rel error':>10} {'top-k agree':>12} {'same rows':>10} {'spearman':>9}")
    for part in ("mlp", "heads"):
        s = summary[part]
        print(f"{part:<6} {s['rel_error']:>10.4f} {s['topk_agreement']:>12.4f} {s['exact_mask_rows']:>10.4f} "
              f"{s['spearman']:>9.4f}")
    print(f"scoring s/question: fp32 {summary['seconds_per_question']['fp32']:.2f}, "
          f"bf16 {summary['seconds_per_question']['bf16']:.2f} ({summary['bf16_time_vs_fp32']:.2f}x)")
    report = {"benchmark": "bench_bf16_scoring",
              "command": "python benchmarks/bench_bf16_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {"model": args.model, "questions": args.questions, "offset": args.offset,
                           "max_new_tokens": args.max_new_tokens, "ratio": args.ratio, "template": template,
                           "metric": "corrected_gxo", "selection": "per_layer top-k"},
              "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version(), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(),
                              "loadavg_1m_at_end": os.getloadavg()[0]},
              "summary": summary, "questions": per_question}
    if args.out:
        atomic_write_json(Path(args.out), report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
