"""WikiText-2 test perplexity on the logits of the engines themselves: the native engine at each
precision (its default KV cache: fp32 for fp32 weights, bf16 otherwise), dense and under the
engine rules an ``attrsparse bench`` run converted (``OUT/engine_rules/<selector>@<ratio>.<precision>.json``),
and llama.cpp on the F32 / F16 conversions and the packaged Q4_1 GGUF (when llama-cpp-python is
installed). The same strided windows as ``attrsparse evaluate`` (512 tokens, 256 scored per window).

    .venv/bin/python benchmarks/engine_perplexity.py --rules runs/bench-x2/engine_rules --ratios 0.6,0.65 \
        --max-tokens 2048 --out docs/results/bench-engines-x2/perplexity.json

or, instead of a bench run's rules, an ``attrsparse calibrate`` folder (``--channels DIR``), whose rule
at each ratio is converted for each precision as the bench converts it (``convert_rules``).

SmolLM2-135M only (the model whose GGUF the engine bench converts). Writes one JSON file
(``command``, ``config``, ``records``: engine, weights, selector, ratio, ppl, nll, n_tokens,
read_ratio, seconds) and prints one line per record; a record already in ``--out`` for the same
configuration is kept, not measured again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

from attrsparse.core.io import atomic_write_json
from attrsparse.core.models import load_model
from attrsparse.data.tasks import load_task
from attrsparse.deploy.engine import Engine, pack
from attrsparse.deploy.engine.convert import convert_rules
from attrsparse.deploy.engine.gguf_convert import packaged_smollm2_gguf
from attrsparse.deploy.engine.sites import rules_from_json
from attrsparse.evaluation.engine_bench import llamacpp_gguf, llamacpp_problem
from attrsparse.evaluation.engine_quality import llamacpp_perplexity, native_perplexity
from attrsparse.policies.channel import load_channel_policy


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", type=Path, help="engine_rules folder of an `attrsparse bench` run")
    ap.add_argument("--channels", type=Path, help="an `attrsparse calibrate` folder (instead of --rules)")
    ap.add_argument("--selector", default="attr_channel")
    ap.add_argument("--ratios", default="0.6")
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    config = {k: getattr(args, k) for k in ("selector", "ratios", "precisions", "max_tokens", "window", "stride")}
    if args.rules and args.channels:
        print("give --rules or --channels, not both", file=sys.stderr)
        return 2
    config["rules"] = str(args.rules) if args.rules else None
    if args.channels:
        config["channels"] = str(args.channels)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if doc and doc.get("config") != config:
        print(f"{args.out} holds another configuration's results; choose another --out", file=sys.stderr)
        return 2
    records = doc.get("records", [])
    have = {(r["engine"], r["weights"], r["selector"], r["ratio"]) for r in records}

    def save() -> None:
        atomic_write_json(args.out, {"command": shlex.join([sys.executable, *sys.argv]), "config": config,
                                     "records": records})

    def record(key: tuple, run) -> None:
        if key in have:
            return
        t0 = time.perf_counter()
        result = run()
        rec = dict(zip(("engine", "weights", "selector", "ratio"), key), **result,
                   seconds=time.perf_counter() - t0)
        records.append(rec)
        save()
        print(json.dumps(rec), flush=True)

    model, tok = load_model("smollm2-135m")
    text = load_task("wikitext2", None, split="test")  # as `attrsparse evaluate` reads and encodes it
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:args.max_tokens].tolist()
    ratios = [float(r) for r in args.ratios.split(",")] if args.rules or args.channels else []
    for precision in args.precisions.split(","):
        path = pack(model, precision)
        with Engine(path, threads=args.threads, max_ctx=args.window) as eng:
            def measure() -> dict:
                return {**native_perplexity(eng, ids, args.window, args.stride), "kv_cache": eng.kv_cache}

            record(("native", precision, "dense", 1.0), measure)
            for ratio in ratios:
                if args.channels:
                    rules = convert_rules(load_channel_policy(args.channels, ratio).rule, model, precision)
                else:
                    rules = rules_from_json(json.loads((args.rules / f"{args.selector}@{ratio:g}.{precision}.json").read_text()))
                eng.set_rules(rules)
                record(("native", precision, args.selector, ratio), measure)
                eng.set_rules(None)
    problem = "--no-llamacpp" if args.no_llamacpp else llamacpp_problem()
    if problem is None:
        llama_cpp = importlib.import_module("llama_cpp")  # the optional extra, present (llamacpp_problem)
        source = packaged_smollm2_gguf()
        for precision in args.precisions.split(","):
            gguf, label = llamacpp_gguf(source, precision)
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=args.window, n_threads=args.threads,
                                  n_threads_batch=args.threads, logits_all=True, verbose=False)
            record(("llamacpp", label, "dense", 1.0), lambda: llamacpp_perplexity(llm, ids, args.window, args.stride))
            del llm
    else:
        print(f"llama.cpp skipped: {problem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
