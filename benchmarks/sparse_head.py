"""The input-sparse LM head on the native engine: quality and speed against the head stored by rows.

For each ``--head-ratios`` entry the head's rule is calibrated (``attrsparse/deploy/engine/head_rule.py``:
attr_channel's score on the final normed hidden state; ``--head-center``: centred with its
compensation bias or not, by default chosen per ratio on the calibration text) on WikiText-2 valid (``--calib-sequences``
windows of 128 tokens, as ``attrsparse calibrate``), and the engine file with the head stored
input-major runs under it. The decoder linears run under the same rules in every contender: dense,
or ``--channels DIR`` (an ``attrsparse calibrate`` folder) at ``--ratio``, converted as the bench
converts it. Measured per contender:

* quality on the engine's own logits: WikiText-2 test perplexity over ``--max-tokens`` tokens
  (512-token windows, 256 scored each, as ``attrsparse evaluate``), the head's read ratio and the
  top-1 agreement with the head with every channel kept, at the scored positions;
* decode speed: batch 1, ``--threads`` threads, ``--new-tokens`` greedy tokens after the bench's
  prompt, one fresh worker process per run (``attrsparse/deploy/engine/worker.py``), the contenders
  alternating in ``--rounds`` rounds; medians, min and max, and the median over rounds of each
  contender's speed over the rows head's in the same round.

The baseline ("rows") is the file the bench runs: the head by vocabulary rows (screened greedy for
fp32 and bf16, the full int8 head for int8). Writes one JSON file (``command``, ``config``,
``records``); the quality of a contender already in ``--out`` for the same configuration is kept.

    .venv/bin/python benchmarks/sparse_head.py --model smollm2-135m --precision int8 \\
        --channels runs/chan-x-hi --ratio 0.6 --head-ratios 0.85,0.7,0.5 --out docs/results/sparse-head/smollm2-int8.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from attrsparse.core.io import atomic_write_json
from attrsparse.core.models import load_model
from attrsparse.data.calibration import calibration_sequences
from attrsparse.data.prompts import encode_prompt, resolve_template
from attrsparse.data.tasks import load_task
from attrsparse.deploy.engine import ChannelRules, Engine, pack
from attrsparse.deploy.engine.bench import print_progress, run_rounds, summarize
from attrsparse.deploy.engine.convert import convert_rules
from attrsparse.deploy.engine.head_rule import calibrate_head
from attrsparse.deploy.engine.sites import rules_to_json
from attrsparse.evaluation.engine_bench import PROMPT
from attrsparse.evaluation.engine_quality import native_perplexity
from attrsparse.policies.channel import load_channel_policy


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precision", default="int8", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--channels", type=Path, help="an `attrsparse calibrate` folder for the decoder linears")
    ap.add_argument("--ratio", type=float, default=None, help="its read ratio (with --channels)")
    ap.add_argument("--head-ratios", default="0.85,0.7,0.5")
    ap.add_argument("--head-center", default="auto", choices=["auto", "on", "off"],
                    help="the head rule's centring: chosen per ratio on the calibration text (auto), or fixed")
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if (args.channels is None) != (args.ratio is None):
        print("give --channels and --ratio together (or neither: dense linears)", file=sys.stderr)
        return 2
    head_ratios = [float(r) for r in args.head_ratios.split(",")]
    config = {k: getattr(args, k) for k in ("model", "precision", "ratio", "calib_sequences", "max_tokens")}
    config["channels"] = str(args.channels) if args.channels else None
    config["head_center"] = args.head_center
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if doc and doc.get("config") != config:
        print(f"{args.out} holds another configuration's results; choose another --out", file=sys.stderr)
        return 2
    quality = {r["contender"]: r for r in doc.get("records", [])}

    model, tok = load_model(args.model)
    linears = (convert_rules(load_channel_policy(args.channels, args.ratio).rule, model, args.precision)
               if args.channels else ChannelRules())
    heads = calibrate_head(model, calibration_sequences(tok, n_sequences=args.calib_sequences), head_ratios,
                           center={"auto": None, "on": True, "off": False}[args.head_center], precision=args.precision)
    rows_path, input_path = pack(model, args.precision), pack(model, args.precision, head_layout="input")
    contenders = {"rows": (rows_path, linears)}
    for r in head_ratios:
        contenders[f"head@{r:g}"] = (input_path, ChannelRules(linears.sites, head=heads[r]))

    def save(records: list[dict]) -> None:
        atomic_write_json(args.out, {"command": shlex.join([sys.executable, *sys.argv]), "config": config,
                                     "records": records})

    text = load_task("wikitext2", None, split="test")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:args.max_tokens].tolist()
    for name, (path, rules) in contenders.items():
        if name in quality:
            continue
        with Engine(path, threads=args.threads, max_ctx=512, rules=rules) as eng:
            q = native_perplexity(eng, ids, 512, 256)
        quality[name] = {"contender": name, "head_ratio": None if name == "rows" else float(name[5:]),
                         "head_centred": None if name == "rows" else rules.head.center is not None, **q}
        print(json.dumps(quality[name]), flush=True)
        save(list(quality.values()))
    if args.skip_speed:
        return 0
    prompt = encode_prompt(tok, PROMPT, resolve_template(tok, "auto")).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        specs = {}
        for name, (path, rules) in contenders.items():
            rules_file = Path(tmp) / f"{name}.json"
            rules_file.write_text(json.dumps(rules_to_json(rules)))
            specs[name] = {"engine": "native", "path": str(path), "rules": str(rules_file), "prompt_ids": prompt,
                           "new_tokens": args.new_tokens, "warmup": args.warmup, "threads": args.threads}
        runs = run_rounds(specs, args.rounds, progress=print_progress)
    base = {r["round"]: r for r in runs["rows"] if "error" not in r}
    records = []
    for name, q in quality.items():
        if name not in runs:
            continue
        ok = [r for r in runs[name] if "error" not in r]
        paired = [r["decode_tokens_per_s"] / base[r["round"]]["decode_tokens_per_s"] for r in ok if r["round"] in base]
        records.append({**q, **summarize(runs[name]),
                        "speedup_vs_rows": statistics.median(paired) if paired else None,
                        "total_read_ratio": ok[0]["total_read_ratio"]["mean"] if ok else None,
                        "generated_read_ratio": ok[0]["read_ratio"]["mean"] if ok else None,
                        "head_cost": ok[0]["head_cost"] if ok else None})
        print(json.dumps({k: records[-1][k] for k in ("contender", "ppl", "top1_agreement", "decode_tokens_per_s",
                                                        "speedup_vs_rows", "total_read_ratio") if k in records[-1]}),
              flush=True)
    save(records)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
