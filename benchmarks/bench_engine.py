"""Native engine against HF transformers and llama.cpp on the same weights (issue 15).

Protocol: batch 1, ``--threads`` threads, ``--new-tokens`` greedy tokens after the same prompt
token ids (SmolLM2's chat template on "Why do veins appear blue?") for every contender; each
contender a fresh process (attrsparse/deploy/engine/worker.py) with a ``--warmup``-token warm-up;
decode speed = (n - 1) / time from the first to the last generated token (prompt processing
excluded); contenders alternate in ``--rounds`` rounds (order rotated); medians with min/max;
peak RSS of each process. Contenders:

* native fp32 / bf16 / int8 dense (screened head), native fp32 with the full head, native
  fp32 / bf16 / int8 with crude thresholds (per (layer, site) quantile ``--sparse-quantile`` of
  |x| over a few WikiText-2 lines: only to show that the kernel path pays);
* HF transformers fp32 (``--skip-hf`` leaves it out);
* llama.cpp F32 / F16 (dequantised from the packaged GGUF) and the packaged Q4_1, when
  ``llama_cpp`` is importable.

Also: memory bandwidth (1 and 2 threads) and the floor per contender, the kernel's sparse
speed-up against its ideal, the head's cost (bytes and time), and greedy tokens of the screened
head against the full head on ``--head-questions`` TruthfulQA answers. Writes one JSON file.

    nice .venv/bin/python benchmarks/bench_engine.py --out runs/bench_engine/bench_engine.json
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from attrsparse.core.models import load_model
from attrsparse.deploy.engine import ChannelRules, Engine, pack
from attrsparse.deploy.engine.bandwidth import floor_tokens_per_s, measure_bandwidth
from attrsparse.deploy.engine.bench import (
    first_difference,
    head_timing,
    kernel_speedup,
    print_progress,
    run_rounds,
    summarize,
    wait_for_idle,
)
from attrsparse.deploy.engine.gguf_convert import dequantise_gguf, packaged_smollm2_gguf
from attrsparse.deploy.engine.sites import rules_to_json

DATA = Path("/work/shared/data")
PROMPT = "Why do veins appear blue?"
SITE_INPUTS = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
               "mlp_out": "mlp.down_proj"}


def note(msg: str) -> None:
    print(f"bench_engine: {msg}", file=sys.stderr, flush=True)


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def crude_thresholds(model, tok, quantile: float, lines: int = 8, max_tokens: int = 128) -> ChannelRules:
    """One threshold per (layer, site): the ``quantile`` of |x| at that site over ``lines``
    WikiText-2 validation lines (a crude TEAL without its allocation; for speed only)."""
    text = [line.strip() for line in (DATA / "wikitext-2" / "valid.txt").read_text().splitlines()
            if len(line.strip()) > 200][:lines]
    values: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for site, path in SITE_INPUTS.items():
            module = layer.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, key=(i, site): values.setdefault(key, []).append(args[0].detach().abs().flatten())))
    try:
        with torch.no_grad():
            for line in text:
                model(torch.tensor([tok(line)["input_ids"][:max_tokens]]))
    finally:
        for h in handles:
            h.remove()
    thresholds = {}
    for key, chunks in values.items():
        x = torch.cat(chunks)
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20]]
        thresholds[key] = float(torch.quantile(x, quantile))
    return ChannelRules.from_thresholds(thresholds)


def truthfulqa_head_check(path: Path, tok, n_questions: int, max_new: int, threads: int) -> dict:
    """Greedy answers through the screened head in check mode: at every token the full head's
    argmax is computed too, on the same hidden state; identical at every token?"""
    with open(DATA / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as fh:
        questions = [row["Question"] for row in csv.DictReader(fh)][:n_questions]
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    identical, tokens, mismatched, head_cost, cands = 0, 0, [], [], []
    with Engine(path, threads=threads, max_ctx=512) as eng:
        for qi, q in enumerate(questions):
            g = eng.generate(chat_ids(tok, q), max_new, mode="check", stop_ids=stop)
            tokens += len(g.tokens)
            head_cost.append(g.head_cost)
            cands.extend(g.candidates)
            if g.tokens == g.checks:
                identical += 1
            else:
                mismatched.append(qi)
    return {"questions": len(questions), "answers_identical_at_every_token": identical, "mismatched": mismatched,
            "tokens": tokens, "max_new_tokens": max_new, "screened_head_bytes_ratio": statistics.mean(head_cost),
            "candidates_mean": statistics.mean(cands), "candidates_max": max(cands)}


def records(report: dict, quantile: float) -> list[dict]:
    """One record per (engine, precision, selector) in the shape issue 15 asks of ``attrsparse bench``
    (quality columns are not measured here: null)."""
    contenders = report["contenders"]
    out = []
    for name, entry in contenders.items():
        s = entry.get("summary", {})
        if "decode_tokens_per_s" not in s or name.endswith("fullhead"):
            continue
        engine, precision = name.split("-")[:2]
        sparse = name.endswith("-sparse")
        dense_name = name.removesuffix("-sparse")
        llama = {"fp32": "llamacpp-F32", "bf16": "llamacpp-F16", "int8": "llamacpp-Q4_1"}.get(precision)
        dense_speed = contenders.get(dense_name, {}).get("summary", {}).get("decode_tokens_per_s")
        llama_speed = contenders.get(llama, {}).get("summary", {}).get("decode_tokens_per_s") if engine == "native" else None
        dense_bytes = contenders.get(dense_name, {}).get("bytes_read_per_token")
        out.append({"engine": engine, "precision": precision, "selector": "crude_threshold" if sparse else "dense",
                    "requested_ratio": 1 - quantile if sparse else 1.0,
                    "read_ratio": entry.get("read_ratio", {}).get("mean"),
                    "total_read_ratio": entry.get("total_read_ratio", {}).get("mean"),
                    "decode_tokens_per_s": s["decode_tokens_per_s"], "decode_tokens_per_s_min": s["decode_tokens_per_s_min"],
                    "decode_tokens_per_s_max": s["decode_tokens_per_s_max"],
                    "speedup_vs_dense": s["decode_tokens_per_s"] / dense_speed if dense_speed else None,
                    "speedup_vs_llamacpp": s["decode_tokens_per_s"] / llama_speed if llama_speed else None,
                    "llamacpp_reference": llama if llama_speed else None,
                    "ideal_speedup": dense_bytes / entry["bytes_read_per_token"]
                    if dense_bytes and entry.get("bytes_read_per_token") else None,
                    "peak_rss_mb": s["peak_rss_mb"], "wikitext2_perplexity": None, "task_accuracy": None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--sparse-quantile", type=float, default=0.5)
    ap.add_argument("--head-questions", type=int, default=100)
    ap.add_argument("--head-max-new", type=int, default=64)
    ap.add_argument("--head-check-only", action="store_true",
                    help="only the TruthfulQA check of the screened head (fp32 and bf16), with --head-threads")
    ap.add_argument("--head-threads", type=int, default=None, help="threads of the TruthfulQA check")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--load", default="mmap", choices=["mmap", "copy"])
    ap.add_argument("--nice", type=int, default=0, help="niceness of the contender processes")
    ap.add_argument("--idle-busy", type=float, default=None,
                    help="before each run wait until other work keeps at most this fraction of the CPUs busy")
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--out", default="runs/bench_engine/bench_engine.json")
    args = ap.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": shlex.join([sys.executable, *sys.argv]), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "loadavg_before": os.getloadavg()},
                    "protocol": {"rounds": args.rounds, "new_tokens": args.new_tokens, "warmup": args.warmup,
                                 "threads": args.threads, "prompt": PROMPT, "load": args.load,
                                 "idle_busy": args.idle_busy, "nice": args.nice}, "notes": []}
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prompt = chat_ids(tok, PROMPT)
    report["protocol"]["prompt_ids"] = prompt
    precisions = args.precisions.split(",")
    paths = {p: pack(model, p) for p in precisions}
    note(f"packed {', '.join(str(p) for p in paths.values())}")
    head_threads = args.head_threads or args.threads
    if args.head_check_only:
        report["head_check"] = {}
        for p in (p for p in precisions if p != "int8"):
            t0 = time.time()
            report["head_check"][p] = truthfulqa_head_check(paths[p], tok, args.head_questions, args.head_max_new,
                                                            head_threads)
            report["head_check"][p]["seconds"] = time.time() - t0
            note(f"{p}: {report['head_check'][p]}")
        out_path.write_text(json.dumps(report, indent=1) + "\n")
        note(f"wrote {out_path}")
        return 0
    rules = crude_thresholds(model, tok, args.sparse_quantile)
    rules_path = out_path.with_name(out_path.stem + ".rules.json")
    rules_path.write_text(json.dumps(rules_to_json(rules)))
    del model

    common = {"prompt_ids": prompt, "new_tokens": args.new_tokens, "warmup": args.warmup, "threads": args.threads}
    contenders: dict[str, dict] = {}
    for p in precisions:
        contenders[f"native-{p}"] = {**common, "engine": "native", "path": str(paths[p]), "load": args.load}
    if "fp32" in paths:
        contenders["native-fp32-fullhead"] = {**contenders["native-fp32"], "mode": "full"}
    for p in precisions:
        contenders[f"native-{p}-sparse"] = {**contenders[f"native-{p}"], "rules": str(rules_path)}
    if not args.skip_hf:
        contenders["hf-fp32"] = {**common, "engine": "hf", "model": args.model, "dtype": "fp32"}
    if args.skip_llamacpp:
        report["notes"].append("llama.cpp skipped (--skip-llamacpp)")
    elif importlib.util.find_spec("llama_cpp") is None:
        msg = "llama.cpp skipped: llama_cpp is not importable (pip install llama-cpp-python==0.3.36)"
        note(msg)
        report["notes"].append(msg)
    elif args.model != "smollm2-135m":
        report["notes"].append("llama.cpp skipped: GGUF conversion is set up for smollm2-135m only")
    else:
        src = packaged_smollm2_gguf()
        for name, gguf in (("F32", dequantise_gguf(src, "F32")), ("F16", dequantise_gguf(src, "F16")), ("Q4_1", src)):
            contenders[f"llamacpp-{name}"] = {**common, "engine": "llamacpp", "gguf": str(gguf), "n_ctx": 512}
    report["contenders"] = {n: {"spec": {k: v for k, v in s.items() if k != "prompt_ids"}} for n, s in contenders.items()}

    note("memory bandwidth")
    if args.idle_busy is not None:
        report["bandwidth_background_busy"] = wait_for_idle(args.idle_busy, args.idle_timeout)[0]
    report["bandwidth"] = measure_bandwidth((1, args.threads))
    report["kernels"] = []
    for p in precisions:
        if args.idle_busy is not None:
            wait_for_idle(args.idle_busy, args.idle_timeout)
        report["kernels"].append(kernel_speedup(p, threads=args.threads))
    note(f"{len(contenders)} contenders x {args.rounds} rounds")
    runs = run_rounds(contenders, args.rounds, nice=args.nice, idle_busy=args.idle_busy,
                      idle_timeout=args.idle_timeout, progress=print_progress)

    reference = next((r["tokens"] for r in runs.get("hf-fp32", []) if "tokens" in r), None)
    read_gbs = report["bandwidth"]["read"][args.threads]
    for name, rs in runs.items():
        entry = report["contenders"][name]
        entry["summary"] = summarize(rs)
        ok = [r for r in rs if "error" not in r]
        if ok:
            last = ok[-1]
            entry["tokens"] = last["tokens"]
            if reference is not None:
                entry["first_token_differing_from_hf_fp32"] = first_difference(last["tokens"], reference)
            for key in ("read_ratio", "total_read_ratio", "head_cost", "head_candidates", "weight_bytes", "file_bytes",
                        "bytes_read_per_token", "torch_imported"):
                if key in last:
                    entry[key] = last[key]
            if "bytes_read_per_token" not in last and "gguf" in contenders[name]:
                # llama.cpp reads every tensor per token (the tied embedding is the head): the file size
                last["bytes_read_per_token"] = Path(contenders[name]["gguf"]).stat().st_size
                entry["bytes_read_per_token_note"] = "GGUF file size"
            if "bytes_read_per_token" in last:
                entry["bytes_read_per_token"] = last["bytes_read_per_token"]
                entry["floor_tokens_per_s"] = floor_tokens_per_s(last["bytes_read_per_token"], read_gbs)
            if "weight_bytes" in last:
                entry["peak_rss_over_weight_bytes"] = entry["summary"]["peak_rss_mb"] * 1e6 / last["weight_bytes"]
        entry["runs"] = [{k: v for k, v in r.items() if k != "tokens"} for r in rs]

    def speed(name: str) -> float | None:
        return report["contenders"].get(name, {}).get("summary", {}).get("decode_tokens_per_s")

    def per_round(a: str, b: str) -> float | None:
        ra = {r["round"]: r for r in runs.get(a, []) if "error" not in r}
        rb = {r["round"]: r for r in runs.get(b, []) if "error" not in r}
        xs = [ra[k]["decode_tokens_per_s"] / rb[k]["decode_tokens_per_s"] for k in ra if k in rb]
        return statistics.median(xs) if xs else None

    pairs = {"native-fp32/llamacpp-F32": ("native-fp32", "llamacpp-F32"),
             "native-bf16/llamacpp-F16": ("native-bf16", "llamacpp-F16"),
             "native-int8/llamacpp-Q4_1": ("native-int8", "llamacpp-Q4_1"),
             "native-int8-sparse/llamacpp-Q4_1": ("native-int8-sparse", "llamacpp-Q4_1"),
             "native-fp32-sparse/llamacpp-F32": ("native-fp32-sparse", "llamacpp-F32"),
             "native-bf16-sparse/llamacpp-F16": ("native-bf16-sparse", "llamacpp-F16"),
             "native-fp32/hf-fp32": ("native-fp32", "hf-fp32"),
             "native-fp32/native-fp32-fullhead": ("native-fp32", "native-fp32-fullhead")}
    for p in precisions:
        pairs[f"native-{p}-sparse/native-{p}"] = (f"native-{p}-sparse", f"native-{p}")
    report["ratios"] = {}
    for label, (a, b) in pairs.items():
        if speed(a) and speed(b):
            report["ratios"][label] = {"ratio_of_medians": speed(a) / speed(b), "median_of_round_ratios": per_round(a, b)}
    for p in precisions:
        sparse = report["contenders"].get(f"native-{p}-sparse", {})
        dense = report["contenders"].get(f"native-{p}", {})
        if sparse.get("bytes_read_per_token") and dense.get("bytes_read_per_token"):
            ideal = dense["bytes_read_per_token"] / sparse["bytes_read_per_token"]
            got = report["ratios"].get(f"native-{p}-sparse/native-{p}", {}).get("ratio_of_medians")
            report["ratios"][f"native-{p}-sparse ideal"] = {"ideal_speedup": ideal,
                                                            "of_ideal": got / ideal if got else None}

    report["records"] = records(report, args.sparse_quantile)
    note("head: timing and TruthfulQA check")
    report["head"] = {"timing": {}}
    for p in precisions:
        with Engine(paths[p], threads=args.threads, max_ctx=len(prompt) + args.new_tokens) as eng:
            gen = eng.generate(prompt, args.new_tokens)
            report["head"]["timing"][p] = {**head_timing(eng, prompt, gen.tokens), "bytes_ratio": gen.head_cost,
                                           "candidates_mean": statistics.mean(gen.candidates)}
    report["head"]["precision_checked"] = precisions[0]
    if args.head_questions:
        report["head"]["truthfulqa"] = truthfulqa_head_check(paths[precisions[0]], tok, args.head_questions,
                                                             args.head_max_new, head_threads)
    report["machine"]["loadavg_after"] = os.getloadavg()
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    note(f"wrote {out_path}")
    for name, entry in report["contenders"].items():
        s = entry.get("summary", {})
        if "decode_tokens_per_s" in s:
            print(f"{name:28s} {s['decode_tokens_per_s']:7.1f} tok/s [{s['decode_tokens_per_s_min']:.1f}-"
                  f"{s['decode_tokens_per_s_max']:.1f}]  peak RSS {s['peak_rss_mb']:.0f} MB")
        else:
            print(f"{name:28s} failed: {s.get('errors')}")
    for label, r in report["ratios"].items():
        print(f"{label:40s} {json.dumps(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
