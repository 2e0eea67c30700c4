"""``attrsparse bench`` (the engine bench): decode speed of the engines a CPU user runs, per
(engine, precision, selector, ratio), next to the quality of each selector at each ratio.

Contenders (:mod:`attrsparse.deploy.engine.worker`, one fresh process per run):

* ``native``: the C engine (:mod:`attrsparse.deploy.engine`), fp32 / bf16 / int8 weights, channel
  rules converted from the calibrated rule set (:func:`~attrsparse.deploy.engine.convert_rules`;
  a rule the engine cannot express is a skipped record carrying the converter's line);
* ``hf``: transformers fp32 / bf16 with the channel rule applied by
  :class:`~attrsparse.core.channel_hooks.ChannelHooks` (what ``attrsparse evaluate`` runs);
* ``llamacpp``: llama-cpp-python (the optional extra ``bench``), dense only, on GGUF files of the
  same weights: F32 for fp32, F16 for bf16 (dequantised from the model's GGUF) and the GGUF as
  packaged for int8 (SmolLM2: Q4_1), labelled with its type in ``weights``.

Protocol: every contender once per round, ``rounds`` rounds, the order rotated each round
(:func:`~attrsparse.deploy.engine.bench.run_rounds`); the same prompt token ids for all (the
prompt in the model's chat template); ``warmup`` tokens generated once, then ``new_tokens`` greedy
tokens timed from the first to the last (prompt processing excluded); medians with min/max.
``speedup_vs_dense`` and ``speedup_vs_llamacpp`` are medians over rounds of the ratio within each
round (same engine and precision dense; llama.cpp dense at the same precision: F32, F16, and the
packaged GGUF for int8). ``ideal_speedup`` is total-read based: bytes of weights the same engine
and precision read per token dense ÷ bytes this contender reads (decoder linears and the LM head;
``total_read_ratio`` of dense ÷ this one's). ``floor_tokens_per_s`` = the machine's read
bandwidth at ``threads`` threads ÷ those bytes.

Quality: WikiText-2 perplexity and a task's accuracy of each (selector, ratio), measured once
through the PyTorch evaluation path (fp32 transformers under ChannelHooks); the converter test
(tests/test_engine_rules.py) proves the native engine computes the same logits and decisions at
fp32 (``quality_source`` says so in every record). Channel rules are calibrated into
``OUT/channels/<selector>`` (:func:`~attrsparse.deploy.calibrate.run_channel_calibration`) unless
``channels_from`` names a channel directory for the selector.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from ..core import __version__
from ..core.errors import UnsupportedArchitectureError, UserError, check_ratio
from ..core.fingerprint import model_fingerprint
from ..core.io import atomic_write_json, read_json, stable_hash
from ..core.models import load_model
from ..core.registry import lookup
from ..data.prompts import encode_prompt, resolve_template
from ..data.tasks import get_task
from ..deploy.calibrate import run_channel_calibration
from ..deploy.engine import convert_rules, pack
from ..deploy.engine.bandwidth import floor_tokens_per_s, measure_bandwidth
from ..deploy.engine.bench import run_rounds, summarize
from ..deploy.engine.gguf_convert import dequantise_gguf, gguf_file_type, packaged_smollm2_gguf
from ..deploy.engine.sites import rules_to_json
from ..policies import make_policy
from ..policies.channel import load_channel_policy, read_channels
from ..selectors.channels import CHANNEL_RULES
from .bench_report import plot_engine_bench, write_engine_bench_markdown
from .evaluate import evaluate_task
from .tolerance import within

ENGINES = {"native": "the C decode engine", "hf": "transformers with channel hooks",
           "llamacpp": "llama.cpp (llama-cpp-python), dense"}
PRECISIONS = {"fp32": "float32 weights", "bf16": "bfloat16 weights (llama.cpp: F16)",
              "int8": "int8 weights (llama.cpp: the packaged GGUF, e.g. Q4_1)"}
SELECTORS = {"dense": "no sparsity", **{name: "channel rule" for name in CHANNEL_RULES}}
ENGINE_PRECISIONS = {"native": ("fp32", "bf16", "int8"), "hf": ("fp32", "bf16"), "llamacpp": ("fp32", "bf16", "int8")}
GGUF_TYPES = {"fp32": "F32", "bf16": "F16"}
PROMPT = "Why do veins appear blue?"
QUALITY_SOURCE = ("PyTorch evaluation (fp32 transformers, the channel rule applied by ChannelHooks) of this "
                  "selector at this ratio, measured once for every engine and precision; the native engine "
                  "computes the same logits at fp32 (tests/test_engine_rules.py); bf16/int8 weights and "
                  "llama.cpp's GGUF types are not reflected")


@dataclass
class EngineBenchConfig:
    model: str = "smollm2-135m"
    engines: list = field(default_factory=lambda: ["native", "hf", "llamacpp"])
    precisions: list = field(default_factory=lambda: ["fp32"])
    selectors: list = field(default_factory=lambda: ["dense", "attr_channel"])
    ratios: list = field(default_factory=lambda: [0.6])
    channels_from: dict = field(default_factory=dict)  # selector -> channel directory
    rounds: int = 5
    new_tokens: int = 64
    warmup: int = 16
    threads: int = 2
    prompt: str = PROMPT
    task: str = "arc_easy"
    task_items: int = 50
    ppl_tokens: int = 2048
    quality: bool = True
    calib: str = "wikitext2"
    calib_sequences: int = 16
    calib_len: int = 128
    bandwidth_mb: int = 512
    nice: int = 0
    idle_busy: float | None = None
    load: str = "mmap"
    engine_dir: str | None = None  # where engine files are packed (default: the cache)

    def validate(self) -> "EngineBenchConfig":
        """Every name and number checked before any work (one line each)."""
        for what, names, registry in (("engine", self.engines, ENGINES), ("precision", self.precisions, PRECISIONS),
                                      ("bench selector", self.selectors, SELECTORS)):
            if not names:
                raise UserError(f"give at least one {what}")
            for name in names:
                lookup(registry, name, what)
        self.selectors = ["dense"] + [s for s in self.selectors if s != "dense"]
        sparse = self.selectors[1:]
        if sparse and not self.ratios:
            raise UserError("give at least one ratio for the channel selectors")
        self.ratios = sorted({round(check_ratio(r), 6) for r in self.ratios})
        if sparse and self.ratios[-1] >= 1.0:
            raise UserError("ratios must be below 1 (dense is always measured)")
        if self.rounds < 1 or self.new_tokens < 2 or self.warmup < 0 or self.threads < 1:
            raise UserError("--rounds >= 1, --new-tokens >= 2, --warmup >= 0 and --threads >= 1 are needed")
        if self.quality:
            if get_task(self.task).kind != "multiple_choice":
                raise UserError(f"--task must be a multiple-choice task (e.g. arc_easy, sciq), not {self.task}")
            if self.task_items < 1 or self.ppl_tokens < 16:
                raise UserError("--task-items >= 1 and --ppl-tokens >= 16 are needed")
        if self.load not in ("mmap", "copy"):
            raise UserError(f"--load must be mmap or copy, got {self.load!r}")
        for selector, path in self.channels_from.items():
            if selector not in sparse:
                raise UserError(f"--channels-from names {selector}, which is not among the channel selectors "
                                f"({', '.join(sparse) or 'none'})")
            doc, _ = read_channels(path)
            if doc.get("selector") != selector:
                raise UserError(f"--channels-from {selector}={path} holds {doc.get('selector')} rules")
            missing = [r for r in self.ratios if f"{r:g}" not in doc.get("ratios", {})]
            if missing:
                raise UserError(f"{path} has no {selector} rule at ratio {', '.join(f'{r:g}' for r in missing)} "
                                f"(it holds {', '.join(doc.get('ratios', {})) or 'none'}); calibrate those ratios")
        return self


def contender_name(engine: str, precision: str, selector: str, ratio: float) -> str:
    return f"{engine}-{precision}-{selector}" + ("" if selector == "dense" else f"@{ratio:g}")


def llamacpp_gguf(source: Path, precision: str) -> tuple[Path, str]:
    """llama.cpp's file for ``precision`` and its weights label: the F32 or F16 conversion of the
    GGUF ``source`` (made once), or ``source`` itself (its own type, e.g. Q4_1) for int8."""
    if precision in GGUF_TYPES:
        return dequantise_gguf(source, GGUF_TYPES[precision]), GGUF_TYPES[precision]
    return source, gguf_file_type(source)


def llamacpp_problem() -> str | None:
    """None when ``import llama_cpp`` works in a fresh interpreter, else its last error line."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed (pip install -e '.[bench]': llama-cpp-python==0.3.36)"
    try:
        done = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "import llama_cpp timed out"
    if done.returncode:
        return "import llama_cpp fails: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return None


class EngineBench:
    """Runs an :class:`EngineBenchConfig` into ``out`` (see the module docstring). ``command``: the
    command line to record."""

    def __init__(self, config: EngineBenchConfig, out: str | Path, model=None, tokenizer=None,
                 command: str | None = None):
        self.config = config.validate()
        self.out = Path(out)
        if model is None:
            model, tokenizer = load_model(config.model)
        self.model, self.tok = model, tokenizer
        self.command = command
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"attrsparse bench: {text}", file=sys.stderr, flush=True)

    # -- what runs ----------------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, float]]:
        cfg = self.config
        return [("dense", 1.0)] + [(s, r) for s in cfg.selectors[1:] for r in cfg.ratios]

    def prompt_ids(self) -> list[int]:
        return encode_prompt(self.tok, self.config.prompt, resolve_template(self.tok, "auto")).tolist()

    def channel_dir(self, selector: str, fingerprint: str) -> Path:
        """The channel directory of ``selector``: ``channels_from``, or calibrated into
        ``OUT/channels/<selector>`` (reused when it holds this model's rules at every ratio)."""
        cfg = self.config
        if selector in cfg.channels_from:
            return Path(cfg.channels_from[selector])
        path = self.out / "channels" / selector
        try:
            doc, _ = read_channels(path)
            if doc.get("model", {}).get("fingerprint") == fingerprint and \
                    all(f"{r:g}" in doc.get("ratios", {}) for r in cfg.ratios):
                return path
        except UserError:
            pass
        print(f"attrsparse bench: calibrating {selector} at {', '.join(f'{r:g}' for r in cfg.ratios)} into {path}",
              file=sys.stderr, flush=True)
        run_channel_calibration(self.model, self.tok, path, selector=selector, ratios=cfg.ratios, calib=cfg.calib,
                                n_sequences=cfg.calib_sequences, seq_len=cfg.calib_len, spec=cfg.model)
        return path

    def quality(self, selector: str, ratio: float, source: Path | None, fingerprint: str, bar) -> dict:
        """WikiText-2 perplexity and task accuracy of ``selector`` at ``ratio`` (stored in
        ``OUT/quality``, reused by a re-run with the same settings and rules)."""
        cfg = self.config
        sha = read_channels(source)[0].get("tensors_sha256") if source is not None else None
        key = stable_hash([cfg.model, fingerprint, cfg.task, cfg.task_items, cfg.ppl_tokens,
                           sha, __version__])
        path = self.out / "quality" / f"{selector}@{ratio:g}-{key}.json"
        stored = read_json(path, required=("wikitext2_ppl", "task_acc"))
        if stored is not None:
            bar.update(2)
            return stored
        policy = make_policy("dense") if source is None else load_channel_policy(source, ratio)
        policy.prepare(self.model)
        ppl = evaluate_task(self.model, self.tok, "wikitext2", policy, max_tokens=cfg.ppl_tokens)
        bar.update(1)
        task = evaluate_task(self.model, self.tok, cfg.task, policy, limit=cfg.task_items)
        bar.update(1)
        result = {"wikitext2_ppl": ppl["ppl"], "task": cfg.task, "task_acc": task["acc"],
                  f"{cfg.task}_acc": task["acc"], "quality_read_ratio": ppl.get("read_ratio"),
                  "task_items": task.get("n"), "ppl_tokens": cfg.ppl_tokens}
        atomic_write_json(path, result)
        return result

    def llamacpp_files(self) -> tuple[dict[str, tuple[Path, str]], str | None]:
        """``(precision -> (GGUF, weights label), None)`` for llama.cpp, or ``({}, why it is skipped)``."""
        cfg = self.config
        problem = llamacpp_problem()
        if problem is None:
            spec = str(cfg.model)
            if spec == "smollm2-135m":
                try:
                    source = packaged_smollm2_gguf()
                except UserError as exc:
                    problem = str(exc)
            elif spec.lower().endswith(".gguf") and Path(spec).is_file():
                source = Path(spec)
            else:
                problem = (f"no GGUF of the same weights for {spec} (the engine bench converts smollm2-135m's "
                           "packaged GGUF, or a .gguf given as --model)")
        if problem is not None:
            self.note(f"llamacpp skipped: {problem}")
            return {}, problem
        return {p: llamacpp_gguf(source, p) for p in cfg.precisions}, None

    # -- the run ------------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        cfg = self.config
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        loadavg_before = os.getloadavg()
        prompt = self.prompt_ids()
        fingerprint = model_fingerprint(self.model)
        for selector, path in cfg.channels_from.items():  # another model's rules: refused before any work
            load_channel_policy(path, cfg.ratios[0]).prepare(self.model)
        sources = {s: self.channel_dir(s, fingerprint) for s in cfg.selectors[1:]}
        jobs = self.jobs()

        quality: dict = {}
        if cfg.quality:
            with tqdm(total=2 * len(jobs), desc="bench quality", unit="eval", disable=not progress) as bar:
                for selector, ratio in jobs:
                    quality[(selector, ratio)] = self.quality(selector, ratio, sources.get(selector), fingerprint, bar)

        skipped: dict[tuple, str] = {}  # (engine, precision, selector, ratio) -> note
        contenders: dict[str, dict] = {}
        common = {"prompt_ids": prompt, "new_tokens": cfg.new_tokens, "warmup": cfg.warmup, "threads": cfg.threads}
        weights: dict[tuple, str] = {}
        labels: dict[str, dict] = {}
        for engine in cfg.engines:
            usable = [p for p in cfg.precisions if p in ENGINE_PRECISIONS[engine]]
            for p in cfg.precisions:
                if p not in usable:
                    for selector, ratio in jobs:
                        skipped[(engine, p, selector, ratio)] = (f"{engine} runs {', '.join(ENGINE_PRECISIONS[engine])} "
                                                                  f"only, not {p}")
            if engine == "native":
                self._native(usable, jobs, sources, common, contenders, skipped, weights)
            elif engine == "hf":
                for p in usable:
                    for selector, ratio in jobs:
                        name = contender_name("hf", p, selector, ratio)
                        contenders[name] = {**common, "engine": "hf", "model": str(cfg.model), "dtype": p,
                                            "channels": str(sources[selector]) if selector != "dense" else None,
                                            "ratio": ratio}
                        weights[("hf", p)] = p
            else:
                files, problem = self.llamacpp_files() if usable else ({}, None)
                for p in usable:
                    for selector, ratio in jobs:
                        if problem is not None:
                            skipped[("llamacpp", p, selector, ratio)] = f"llamacpp skipped: {problem}"
                        elif selector != "dense":
                            skipped[("llamacpp", p, selector, ratio)] = "llama.cpp runs dense only"
                        else:
                            gguf, label = files[p]
                            contenders[contender_name("llamacpp", p, "dense", 1.0)] = {
                                **common, "engine": "llamacpp", "gguf": str(gguf),
                                "n_ctx": len(prompt) + max(cfg.new_tokens, cfg.warmup) + 16}
                            weights[("llamacpp", p)] = label
                            labels[p] = {"weights": label, "file": str(gguf)}

        self.model = None  # the contenders run without this process's copy of the weights in the way
        gc.collect()
        threads = sorted({1, cfg.threads})
        bandwidth = measure_bandwidth(tuple(threads), size_mb=cfg.bandwidth_mb)
        read_gbs = bandwidth["read"][cfg.threads]
        runs: dict[str, list[dict]] = {}
        if contenders:
            with tqdm(total=cfg.rounds * len(contenders), desc="bench rounds", unit="run",
                      disable=not progress) as bar:
                def tick(done, total, name, result, eta):
                    what = result.get("error") or f"{result['decode_tokens_per_s']:.1f} tok/s"
                    bar.set_postfix_str(f"{name}: {what}"[:60])
                    bar.update(1)

                runs = run_rounds(contenders, cfg.rounds, nice=cfg.nice, idle_busy=cfg.idle_busy, progress=tick)

        records = self._records(jobs, runs, contenders, skipped, weights, quality, read_gbs)
        frontier = quality_frontier(records)
        for r in records:
            f = frontier.get(r["selector"])
            r["on_quality_frontier"] = bool(f and f["requested_ratio"] == r["requested_ratio"])
        results = {
            "schema_version": 2, "bench": "engines", "command": self.command,
            "python": sys.executable, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {**asdict(cfg), "channels_from": {k: str(v) for k, v in cfg.channels_from.items()}},
            "channel_sources": {k: str(v) for k, v in sources.items()},
            "protocol": {"rounds": cfg.rounds, "new_tokens": cfg.new_tokens, "warmup": cfg.warmup,
                         "threads": cfg.threads, "prompt": cfg.prompt, "prompt_ids": prompt, "load": cfg.load,
                         "nice": cfg.nice, "idle_busy": cfg.idle_busy,
                         "decode_speed": "(n - 1) / time from the first to the last generated token",
                         "speedups": "median over rounds of the ratio within each round",
                         "ideal_speedup": "bytes of weights read per token by dense (same engine and precision) "
                                          "/ bytes read by this contender (decoder linears + LM head)"},
            "versions": {"attrsparse": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "platform": platform.platform(), "loadavg_before": loadavg_before,
                        "loadavg_after": os.getloadavg()},
            "bandwidth_gbs": bandwidth, "bandwidth_read_gbs": read_gbs, "llamacpp": labels,
            "quality_source": QUALITY_SOURCE if cfg.quality else None,
            "notes": self.notes, "records": records, "frontier": frontier,
            "runs": {name: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for name, rs in runs.items()},
        }
        atomic_write_json(self.out / "bench.json", results)
        plot_engine_bench(results, self.out)
        write_engine_bench_markdown(results, self.out)
        return results

    def _native(self, precisions, jobs, sources, common, contenders, skipped, weights) -> None:
        """Engine files and converted rules of the native contenders (skipped records for the rest)."""
        cfg = self.config
        paths = {}
        for p in precisions:
            try:
                paths[p] = pack(self.model, p, directory=cfg.engine_dir)
            except UnsupportedArchitectureError as exc:
                self.note(f"native skipped: {exc}")
                for selector, ratio in jobs:
                    for q in precisions:
                        skipped[("native", q, selector, ratio)] = f"native: {exc}"
                return
        for selector, ratio in jobs:
            rules = {p: None for p in precisions}
            if selector != "dense":
                rule_set = load_channel_policy(sources[selector], ratio).rule
                try:
                    for p in precisions:
                        converted = convert_rules(rule_set, self.model, p)
                        path = self.out / "engine_rules" / f"{selector}@{ratio:g}.{p}.json"
                        atomic_write_json(path, rules_to_json(converted))
                        rules[p] = str(path)
                except UserError as exc:
                    self.note(f"native {selector}@{ratio:g} skipped: {exc}")
                    for p in precisions:
                        skipped[("native", p, selector, ratio)] = str(exc)
                    continue
            for p in precisions:
                contenders[contender_name("native", p, selector, ratio)] = {
                    **common, "engine": "native", "path": str(paths[p]), "load": cfg.load, "rules": rules[p]}
                weights[("native", p)] = p

    def _records(self, jobs, runs, contenders, skipped, weights, quality, read_gbs) -> list[dict]:
        cfg = self.config

        def paired(a: str, b: str) -> float | None:
            ra = {r["round"]: r for r in runs.get(a, []) if "error" not in r}
            rb = {r["round"]: r for r in runs.get(b, []) if "error" not in r}
            xs = [ra[k]["decode_tokens_per_s"] / rb[k]["decode_tokens_per_s"] for k in ra if k in rb]
            return statistics.median(xs) if xs else None

        def last_ok(name: str) -> dict:
            ok = [r for r in runs.get(name, []) if "error" not in r]
            return ok[-1] if ok else {}

        def bytes_per_token(name: str) -> float | None:
            last = last_ok(name)
            if "bytes_read_per_token" in last:
                return last["bytes_read_per_token"]
            if contenders.get(name, {}).get("engine") == "llamacpp" and last:
                return float(Path(contenders[name]["gguf"]).stat().st_size)  # every tensor, once per token
            return None

        dense_q = quality.get(("dense", 1.0), {})
        records = []
        for engine in cfg.engines:
            for p in cfg.precisions:
                for selector, ratio in jobs:
                    name = contender_name(engine, p, selector, ratio)
                    label = weights.get((engine, p)) or (GGUF_TYPES.get(p, "packaged GGUF") if engine == "llamacpp"
                                                          else p if p in ENGINE_PRECISIONS[engine] else None)
                    rec = {"engine": engine, "precision": p, "weights": label,
                           "selector": selector, "requested_ratio": ratio, "contender": name,
                           "skipped": skipped.get((engine, p, selector, ratio))}
                    summary = summarize(runs[name]) if name in runs else {}
                    last = last_ok(name)
                    read = last.get("read_ratio") or ({"mean": 1.0} if engine == "llamacpp" and last else {})
                    total = last.get("total_read_ratio") or ({"mean": 1.0} if engine == "llamacpp" and last else {})
                    dense_name = contender_name(engine, p, "dense", 1.0)
                    llama = contender_name("llamacpp", p, "dense", 1.0)
                    nbytes, dense_bytes = bytes_per_token(name), bytes_per_token(dense_name)
                    ideal = dense_bytes / nbytes if nbytes and dense_bytes else None
                    speedup = paired(name, dense_name)
                    rec.update({
                        "read_ratio": read.get("mean"), "read_ratio_p10": read.get("p10"),
                        "read_ratio_p90": read.get("p90"), "total_read_ratio": total.get("mean"),
                        "decode_tokens_per_s": summary.get("decode_tokens_per_s"),
                        "decode_tokens_per_s_min": summary.get("decode_tokens_per_s_min"),
                        "decode_tokens_per_s_max": summary.get("decode_tokens_per_s_max"),
                        "rounds": summary.get("runs", 0), "errors": summary.get("errors", []),
                        "speedup_vs_dense": speedup,
                        "speedup_vs_llamacpp": paired(name, llama) if llama in runs else None,
                        "llamacpp_reference": f"llama.cpp {weights[('llamacpp', p)]}"
                        if llama in runs and paired(name, llama) is not None else None,
                        "ideal_speedup": ideal,
                        "of_ideal": speedup / ideal if speedup is not None and ideal else None,
                        "peak_rss_mb": summary.get("peak_rss_mb"),
                        "weight_bytes": last.get("weight_bytes"),
                        "kv_cache": last.get("kv_cache"),
                        "bytes_read_per_token": nbytes,
                        "floor_tokens_per_s": floor_tokens_per_s(nbytes, read_gbs) if nbytes else None,
                        "head_cost": last.get("head_cost"),
                        "torch_imported": last.get("torch_imported"),
                    })
                    q = quality.get((selector, ratio), {})
                    rec.update({"wikitext2_ppl": q.get("wikitext2_ppl"), "task": q.get("task", cfg.task),
                                "task_acc": q.get("task_acc"), f"{cfg.task}_acc": q.get("task_acc"),
                                "quality_read_ratio": q.get("quality_read_ratio"),
                                "quality_source": QUALITY_SOURCE if q else None})
                    for key in ("wikitext2_ppl", "task_acc"):
                        rec[f"{key}_relative"] = q[key] / dense_q[key] if q and dense_q.get(key) else None
                    verdicts = (within("acc", rec["task_acc_relative"]), within("ppl", rec["wikitext2_ppl_relative"]))
                    rec["within_tolerance"] = None if None in verdicts else all(verdicts)  # None: unknown
                    records.append(rec)
        return records


def quality_frontier(records: list[dict]) -> dict:
    """Per channel selector: the lowest requested ratio from which on (every ratio at or above it)
    the task accuracy stays within 5% and perplexity within 10% of dense; None if no ratio does,
    and no entry when quality was not measured."""
    out = {}
    by_selector: dict[str, dict[float, dict]] = {}
    for r in records:
        if r["selector"] != "dense" and r.get("within_tolerance") is not None:
            by_selector.setdefault(r["selector"], {})[r["requested_ratio"]] = r
    for selector, rows in by_selector.items():
        lowest = None
        for ratio in sorted(rows, reverse=True):
            if not rows[ratio]["within_tolerance"]:
                break
            lowest = rows[ratio]
        out[selector] = None if lowest is None else {
            "requested_ratio": lowest["requested_ratio"], "quality_read_ratio": lowest.get("quality_read_ratio")}
    return out


def command_line(argv: list[str]) -> str:
    return shlex.join(["attrsparse", *argv])
