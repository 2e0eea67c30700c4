"""attr_channel variant selection on calibration-side data only: calibrate on the first 2048
tokens of WikiText-2 valid (16 windows of 128, the calibrate default), measure perplexity on the
last 4096 tokens of valid (8 windows of 512, disjoint from the calibration windows and from every
evaluation, which uses the test split) and the read ratio really executed there.

    .venv/bin/python benchmarks/attr_channel_variants.py smollm2-135m \
        '{"B": {"per_token": false, "statistic": "rms", "param_power": 0.5, "center": false,
                "per_consumer": false, "allocation": "global"}, ...}' > variants.jsonl

Each variant sets keys of ``attrsparse.selectors.channel_calibration.ATTR`` over its default
(a partial dict changes only those keys; before the seventh session of 2026-12-07 they applied over
the previous variant's options); one JSON line
per variant and read ratio (0.5, 0.6) on stdout, the dense perplexity first. Variants that differ
only in "greedy" / "greedy_global" allocation share one greedy path. A variant's "_calib": [n,
length] calibrates on n windows of that many tokens instead of 16 x 128 (the first n*length
tokens of valid; they must stay before the held-out last 4096). A variant's "_selector": "teal" (or
any channel rule) measures that rule instead, on the same data (its other keys are ignored).
Threads: 2, or the THREADS environment variable.
"""
import json, math, os, sys, time
import torch
from attrsparse.core.models import load_model
from attrsparse.core.channel_hooks import ChannelHooks
from attrsparse.core.sites import site_map
from attrsparse.data.calibration import calibration_sequences
from attrsparse.data.tasks import load_wikitext
import attrsparse.selectors.channel_calibration as cc

torch.set_num_threads(int(os.environ.get("THREADS", 2)))
model, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
model.eval()
seqs = calibration_sequences(tok, "wikitext2", 16, 128)
ids = tok(load_wikitext(None, split="valid"), add_special_tokens=False, return_tensors="pt").input_ids[0]
held = ids[-4096:]
dec = site_map(model).decoder_params

@torch.no_grad()
def ppl(rule):
    nll, n, read = 0.0, 0, []
    for i in range(0, 4096, 512):
        w = held[i:i + 512].view(1, -1)
        if rule is None:
            logits = model(input_ids=w, use_cache=False).logits
        else:
            with ChannelHooks(model, rule) as h, rule.live_state(model):
                logits = model(input_ids=w, use_cache=False).logits
                read.append((h.read / dec).mean().item())
        lp = torch.log_softmax(logits[0, :-1].float(), -1)
        nll -= lp.gather(-1, w[0, 1:].view(-1, 1)).sum().item(); n += 511
    return math.exp(nll / n), (sum(read) / len(read) if read else 1.0)

variants = json.loads(sys.argv[2])
print(json.dumps({"variant": "dense", "ppl_valid_end": ppl(None)[0]}), flush=True)
def share_greedy_path():
    """A greedy path is the same for "greedy" and "greedy_global": reuse one already computed."""
    if cc.ATTR["allocation"] not in cc.GREEDY_ALLOCATIONS:
        return
    for other in cc.GREEDY_ALLOCATIONS:
        found = cc._CALIBRATORS.get(cc.calibrator_key(model, seqs, "attr_channel", {**cc.ATTR, "allocation": other}))
        if found is not None:
            cc._CALIBRATORS[cc.calibrator_key(model, seqs, "attr_channel")] = found


default_seqs = seqs
DEFAULT_ATTR = dict(cc.ATTR)
for name, attr in variants.items():
    attr = dict(attr)
    n, length = attr.pop("_calib", (16, 128))  # calibration windows: count, tokens (same 2048 tokens at most)
    selector = attr.pop("_selector", "attr_channel")
    seqs = default_seqs if (n, length) == (16, 128) else calibration_sequences(tok, "wikitext2", n, length)
    cc.ATTR.clear()
    cc.ATTR.update({**DEFAULT_ATTR, **attr})  # every variant over the default, not over the previous variant
    share_greedy_path()
    t = time.time()
    rules = cc.calibrate_channels(model, seqs, selector, [0.5, 0.6])
    for r, rule in rules.items():
        rule.bind(model)
        p, rd = ppl(rule)
        print(json.dumps({"variant": name, "selector": selector,
                          "attr": dict(cc.ATTR) if selector == "attr_channel" else None, "calib": [n, length], "ratio": r, "ppl_valid_end": p, "read": rd,
                          "cal_s": time.time() - t}), flush=True)
