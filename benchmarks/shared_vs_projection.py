"""Native engine: attr_channel with shared decisions per site against per-projection decisions,
same model, precision and requested read ratio, alternating in rounds inside one process (a rough
side-by-side check of what per-projection reads cost the kernel, not `attrsparse bench`).

    .venv/bin/python benchmarks/shared_vs_projection.py 0.6 bf16,int8 > runs/shared_vs_projection.jsonl

Both rules are calibrated here (16 x 128 tokens of WikiText-2 valid); one JSON line per
(precision, variant) with the median decode tokens/s over the rounds, the read ratio and the
dense speed of the same rounds.
"""
import json, statistics, sys
import torch
from attrsparse.core.models import load_model
from attrsparse.data.calibration import calibration_sequences
from attrsparse.deploy.engine import Engine, convert_rules, pack
import attrsparse.selectors.channel_calibration as cc

torch.set_num_threads(2)
ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
precisions = (sys.argv[2] if len(sys.argv) > 2 else "bf16").split(",")
rounds, new = 7, 96
model, tok = load_model("smollm2-135m")
seqs = calibration_sequences(tok, "wikitext2", 16, 128)
rules = {}
for name, pc in (("shared", False), ("per_projection", True)):
    cc.ATTR["per_consumer"] = pc
    rules[name] = cc.calibrate_channels(model, seqs, "attr_channel", [ratio])[ratio]
prompt = tok("Why do veins appear blue? Explain briefly.", return_tensors="pt").input_ids[0].tolist()
for precision in precisions:
    path = pack(model, precision)
    engine_rules = {k: convert_rules(r, model, precision) for k, r in rules.items()}
    speed = {k: [] for k in ("dense", *engine_rules)}
    read = {}
    with Engine(path, threads=2, max_ctx=len(prompt) + new + 16) as eng:
        for i in range(rounds):
            order = list(speed)[i % 3:] + list(speed)[:i % 3]
            for name in order:
                eng.set_rules(engine_rules.get(name))
                out = eng.generate(prompt, new)
                speed[name].append(out.decode_tokens_per_s)
                read[name] = out.read_ratio
    for name, v in speed.items():
        print(json.dumps({"precision": precision, "variant": name, "ratio": ratio, "read_ratio": read[name],
                          "tok_s_median": statistics.median(v), "speedup_vs_dense": statistics.median(
                              [a / b for a, b in zip(v, speed["dense"])]), "rounds": rounds, "new_tokens": new}),
              flush=True)
