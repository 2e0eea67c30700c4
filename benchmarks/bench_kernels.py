"""Decode speed of sparse execution against dense, and against the ideal from counted multiply-adds.

Batch 1, greedy decoding with a KV cache of exactly ``--new-tokens`` tokens after one chat prompt
(no early stop), per thread count and ratio:

* ``dense``: the stock model;
* ``export``: the static export (``attrsparse export``: sliced stock checkpoint saved with
  ``save_pretrained`` and loaded back with plain ``AutoModelForCausalLM.from_pretrained``);
* ``runtime_static``: the gathered runtime (per-token chooser, C kernels) fed the same static masks
  (decisions cost nothing: the kernels' own efficiency);
* ``runtime_predictor``: the gathered runtime with a predictor (``--predictor PATH``, else an
  untrained predictor of the default size: same cost, meaningless masks), chosen inside the C
  kernel calls for one-token steps.

Multiply-adds per generated token (what the ideal counts): the attention and MLP weights really
multiplied (the runtime computes keys/values of every key/value head, so its cache stays complete,
and adds the predictor's weights), the attention scores and weighted values
(``2 * context * heads * head_dim`` per layer, context averaged over the decode steps), and the
LM head (``vocab * hidden``, 28M for SmolLM2 against 106M for the layers: it caps the speed-up).
``ideal = dense MACs / variant MACs``; ``achieved = variant tokens/s / dense tokens/s``;
``efficiency = achieved / ideal``. Timings: one warm-up run of every variant, then the median of
``--repeats`` runs, interleaved (one run of each variant per round) so load changes on a shared
machine hit all of them alike; prefill excluded (tokens/s over the decode steps).

Usage::

    python benchmarks/bench_kernels.py --threads 1 --repeats 9 --predictor runs/predictor \
        --out docs/results/bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_scoring.py

import torch  # noqa: E402
from bench_scoring import cpu_name  # noqa: E402  (same folder: run as a script)


def decode_seconds(model, prompt, n, runtime=None) -> tuple[float, int]:
    from attrsparse.deploy.runtime import greedy_decode

    res = greedy_decode(model, [prompt], n, set(), 0, runtime)
    return res["decode_s"], res["decode_tokens"]


def layer_macs(units, attn_heads: float, kv_heads: float, mlp_units: float, context: float) -> float:
    """Weights multiplied in one layer for one token, plus the attention core."""
    return (mlp_units * units.mlp_unit_params + units.mlp_fixed_params + attn_heads * units.head_params
            + kv_heads * units.kv_group_params + units.attn_fixed_params
            + 2 * context * attn_heads * units.head_dim)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity-from", default=None, help="calibrated sparsity directory "
                                                              "(default: calibrate 8 x 128 WikiText tokens)")
    parser.add_argument("--predictor", default=None, help="trained predictor (default: untrained, same cost)")
    parser.add_argument("--prompt", default="Why do veins appear blue?")
    parser.add_argument("--out", default="docs/results/bench_kernels.json")
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM

    import attrsparse
    from attrsparse import unit_map
    from attrsparse.data.prompts import encode_prompt, resolve_template
    from attrsparse.deploy.calibrate import run_calibration
    from attrsparse.deploy.export import export_model, maskable_params
    from attrsparse.deploy.kernels import gather_backend
    from attrsparse.deploy.runtime import SparseRuntime
    from attrsparse.policies.predictor import load_predictor
    from attrsparse.policies.static import load_static_policy
    from attrsparse.selectors.chooser import StaticChooser
    from attrsparse.selectors.predictor import Predictor

    ratios = [float(r) for r in args.ratios.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    model, tok = attrsparse.load_model(args.model, dtype="float32")
    units = unit_map(model)
    prompt = encode_prompt(tok, args.prompt, resolve_template(tok, "auto"))
    context = prompt.numel() + args.new_tokens / 2
    hidden = model.config.hidden_size
    lm_head = model.get_output_embeddings().weight.numel()
    dense_macs = lm_head + units.num_layers * layer_macs(units, units.num_heads, units.num_kv_heads,
                                                         units.mlp_size, context)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "kernel_backend": gather_backend().name,
           "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    tmp = tempfile.TemporaryDirectory()
    sparsity = args.sparsity_from
    if sparsity is None:
        sparsity = os.path.join(tmp.name, "sparsity")
        print("calibrating static masks (8 x 128 WikiText-2 valid tokens)...", file=sys.stderr)
        run_calibration(model, tok, sparsity, ratios=ratios, n_sequences=8, seq_len=128, progress=False)
    predictor = load_predictor(args.predictor) if args.predictor else Predictor.for_units(units, hidden)
    variants = {"dense": {"model": model, "ratio": 1.0, "macs": dense_macs, "computed": 1.0}}
    for ratio in ratios:
        policy = load_static_policy(sparsity, ratio)
        out = os.path.join(tmp.name, f"export-{ratio:g}")
        info = export_model(model, tok, policy.masks, out)
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        heads = exported.config.num_attention_heads
        stored = maskable_params(exported) / units.maskable_params
        macs = (lm_head + stored * units.maskable_params
                + units.num_layers * 2 * context * heads * units.head_dim)
        variants[f"export@{ratio:g}"] = {"model": exported, "ratio": ratio, "macs": macs, "computed": stored,
                                         "executed_ratio": info["executed_ratio"],
                                         "size_on_disk_bytes": info["size_on_disk_bytes"]}
        variants[f"runtime_static@{ratio:g}"] = {"model": model, "ratio": ratio,
                                                 "chooser": StaticChooser(policy.masks),
                                                 "executed_ratio": info["executed_ratio"]}
        variants[f"runtime_predictor@{ratio:g}"] = {"model": model, "ratio": ratio,
                                                    "chooser": predictor.chooser(ratio, units),
                                                    "predictor_macs": sum(m.macs() for m in predictor.mlp)
                                                    + sum(m.macs() for m in predictor.heads)}
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        runtimes = {}
        for name, v in variants.items():  # accounting runs: computed fraction, executed ratio
            if "chooser" in v:
                rt = SparseRuntime(model, v["chooser"], break_even="auto")
                with rt:
                    decode_seconds(model, prompt, args.new_tokens, rt)
                runtimes[name] = rt
                v["computed"] = rt.computed_fraction
                v["executed_ratio"] = rt.executed.param
                v["break_even"] = rt.break_even
                v["macs"] = (lm_head + rt.computed_fraction * units.maskable_params
                             + v.get("predictor_macs", 0)
                             + units.num_layers * 2 * context * units.num_heads * units.head_dim)

        def timed(name):
            v = variants[name]
            if "chooser" not in v:
                return decode_seconds(v["model"], prompt, args.new_tokens)
            rt = SparseRuntime(model, v["chooser"], break_even=runtimes[name].break_even)
            with rt:
                return decode_seconds(model, prompt, args.new_tokens, rt)

        times = {name: [] for name in variants}
        for name in variants:
            timed(name)  # warm-up
        for _ in range(args.repeats):
            for name in variants:
                seconds, steps = timed(name)
                times[name].append(steps / seconds)
        dense_tps = statistics.median(times["dense"])
        for name, v in variants.items():
            tps = statistics.median(times[name])
            ideal = dense_macs / v["macs"]
            achieved = tps / dense_tps
            rows.append({"threads": n_threads, "variant": name.split("@")[0], "ratio": v["ratio"],
                         "executed_ratio": v.get("executed_ratio", 1.0), "computed_fraction": v["computed"],
                         "macs_per_token": v["macs"], "tokens_per_s": tps, "tokens_per_s_runs": times[name],
                         "achieved_speedup": achieved, "ideal_speedup": ideal, "efficiency": achieved / ideal,
                         **({"break_even": v["break_even"]} if "break_even" in v else {}),
                         **({"size_on_disk_bytes": v["size_on_disk_bytes"]} if "size_on_disk_bytes" in v else {})})
        print(f"\n{n_threads} thread(s): dense {dense_tps:.1f} tokens/s", file=sys.stderr)
        print(f"{'variant':<24}{'executed':>9}{'computed':>9}{'tok/s':>8}{'speedup':>9}{'ideal':>7}{'eff.':>6}",
              file=sys.stderr)
        for r in rows[-len(variants):]:
            label = r["variant"] + ("" if r["variant"] == "dense" else f"@{r['ratio']:g}")
            print(f"{label:<24}{r['executed_ratio']:9.3f}{r['computed_fraction']:9.3f}{r['tokens_per_s']:8.1f}"
                  f"{r['achieved_speedup']:9.2f}{r['ideal_speedup']:7.2f}{r['efficiency']:6.2f}", file=sys.stderr)
    report = {"benchmark": "bench_kernels", "model": args.model, "dtype": "float32", "batch": 1,
              "prompt_tokens": int(prompt.numel()), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "dense_macs_per_token": dense_macs, "lm_head_macs": lm_head,
              "layer_weight_macs": units.maskable_params, "predictor": args.predictor or "untrained (cost only)",
              "sparsity": args.sparsity_from or "calibrated in the run (8 x 128 WikiText-2 valid tokens)",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env, "results": rows}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
