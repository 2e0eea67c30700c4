"""One benchmark contender in a fresh process: ``python worker.py '<json spec>'`` prints one JSON line.

Run as a *script* (not ``-m``): for the native engine it registers attrsparse's packages as bare
module objects and imports only the runner, its C binding and the error/path helpers, because
the package ``__init__`` files import torch (~210 MB resident) and the point of the measurement
is a process holding little beyond the weights. Each contender imports its own library here and
nowhere else, so one process never holds two engines.

Spec keys: ``engine`` (``native`` | ``hf`` | ``llamacpp``), ``prompt_ids``, ``new_tokens``,
``warmup`` (tokens generated once before the timed run), ``threads``; native: ``path``, ``load``,
``mode``, ``rules`` (a rules JSON file or null); hf: ``model``, ``dtype``, ``channels`` and
``ratio`` (a channel directory applied through ChannelHooks, or null); llamacpp: ``gguf``,
``n_ctx``. Output: ``tokens``, ``decode_tokens_per_s`` (127 / time from the first to the last
token for 128 tokens: prompt processing excluded), ``peak_rss_mb`` (VmHWM of this process),
and the engine's own counters (hf: the read ratio from the hooks' counts, and the bytes of
weights it implies per token).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

PACKAGES = ("attrsparse", "attrsparse.core", "attrsparse.deploy", "attrsparse.deploy.kernels",
            "attrsparse.deploy.engine")


def bare_packages() -> None:
    """Make ``attrsparse.deploy.engine.runner`` importable without running any package __init__."""
    root = Path(__file__).resolve().parents[3]
    for name in PACKAGES:
        if name not in sys.modules:
            folder = root / name.replace(".", "/")
            spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            sys.modules[name] = importlib.util.module_from_spec(spec)  # created, never executed


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_native(spec: dict) -> dict:
    bare_packages()
    runner = importlib.import_module("attrsparse.deploy.engine.runner")
    sites = importlib.import_module("attrsparse.deploy.engine.sites")
    rules = None
    if spec.get("rules"):
        rules = sites.rules_from_json(json.loads(Path(spec["rules"]).read_text()))
    prompt, new = spec["prompt_ids"], spec["new_tokens"]
    with runner.Engine(spec["path"], threads=spec["threads"], max_ctx=len(prompt) + max(new, spec["warmup"]),
                       load=spec.get("load", "mmap"), rules=rules) as eng:
        if spec["warmup"]:
            eng.generate(prompt, spec["warmup"], mode=spec.get("mode", "greedy"))
        g = eng.generate(prompt, new, mode=spec.get("mode", "greedy"))
        return {"tokens": g.tokens, "decode_tokens_per_s": g.decode_tokens_per_s, "prompt_s": g.prompt_s,
                "read_ratio": g.ratio_stats(), "total_read_ratio": g.ratio_stats(total=True),
                "head_cost": g.head_cost, "head_candidates": sum(g.candidates) / len(g.candidates),
                "weight_bytes": eng.weight_bytes, "file_bytes": eng.file_bytes, "kv_cache": eng.kv_cache,
                "bytes_read_per_token": sum(lin * g.bytes_per_weight + h for lin, h in zip(g.linear_reads, g.head_bytes))
                / len(g.tokens)}


def run_hf(spec: dict) -> dict:
    torch = importlib.import_module("torch")
    models = importlib.import_module("attrsparse.core.models")
    sites = importlib.import_module("attrsparse.core.sites")
    torch.set_num_threads(spec["threads"])
    model, _ = models.load_model(spec.get("model", "smollm2-135m"), dtype=spec.get("dtype", "fp32"))
    prompt = torch.tensor([spec["prompt_ids"]])
    applied, reads = None, []
    if spec.get("channels"):  # a calibrated channel rule through ChannelHooks, as `attrsparse evaluate` runs it
        channel = importlib.import_module("attrsparse.policies.channel")
        policy = channel.load_channel_policy(spec["channels"], spec["ratio"])
        policy.prepare(model)
        context = policy.apply(model)
    else:
        context = contextlib.nullcontext()

    def greedy(n: int) -> tuple[list[int], list[float]]:
        cache, step, tokens, times = None, prompt, [], []
        reads.clear()
        with torch.no_grad():
            for i in range(n):
                out = model(step, cache=cache, use_cache=True)
                cache = out.cache
                tokens.append(int(out.logits[0, -1].argmax()))
                times.append(time.perf_counter())
                if applied is not None and i > 0:  # the read ratio of each generated token's step
                    reads.append(float(applied.last_read(1, 1)))
                step = torch.tensor([[tokens[-1]]])
        return tokens, times

    with context as applied:
        if spec["warmup"]:
            greedy(spec["warmup"])
        tokens, times = greedy(spec["new_tokens"])
    smap = sites.site_map(model)
    decoder, head = smap.decoder_params, smap.head_params
    runner = importlib.import_module("attrsparse.deploy.engine.runner")
    ratio = runner.ratio_summary(reads) or {"mean": 1.0, "p10": 1.0, "p90": 1.0}
    total = (ratio["mean"] * decoder + head) / (decoder + head)
    nbytes = next(model.parameters()).element_size()
    return {"tokens": tokens, "decode_tokens_per_s": _rate(times), "read_ratio": ratio,
            "total_read_ratio": {"mean": total}, "bytes_read_per_token": total * (decoder + head) * nbytes}


def run_llamacpp(spec: dict) -> dict:
    llama_cpp = importlib.import_module("llama_cpp")
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=spec.get("n_ctx", 512), logits_all=False, verbose=False)

    def greedy(n: int) -> tuple[list[int], list[float]]:
        tokens, times = [], []
        for tok in llm.generate(spec["prompt_ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            tokens.append(int(tok))
            times.append(time.perf_counter())
            if len(tokens) == n:
                break
        return tokens, times

    if spec["warmup"]:
        greedy(spec["warmup"])
    tokens, times = greedy(spec["new_tokens"])
    return {"tokens": tokens, "decode_tokens_per_s": _rate(times)}


RUNNERS = {"native": run_native, "hf": run_hf, "llamacpp": run_llamacpp}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (1e6 bytes): VmHWM of /proc/self/status.
    (ru_maxrss is wrong here: Linux carries the parent's high-water mark across fork + exec, so a
    worker started by a 2 GB benchmark process would report 2 GB.)"""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    result = RUNNERS[spec["engine"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_imported"] = "torch" in sys.modules
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
