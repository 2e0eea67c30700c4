"""CLI sub-commands ``evaluate`` (one task, one selector), ``compare`` (the grid) and ``bench`` (speed
and quality: the engine bench, or the unit modes with ``--modes``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import UserError
from ..core.models import load_model
from ..data.calibration import calibration_sequences
from ..data.tasks import get_task
from ..evaluation.bench import Bench, BenchConfig
from ..evaluation.compare import Compare, CompareConfig, save_command
from ..evaluation.engine_bench import PROMPT as ENGINE_PROMPT
from ..evaluation.engine_bench import EngineBench, EngineBenchConfig, command_line
from ..evaluation.evaluate import evaluate_task
from ..policies import make_policy
from .args import add_device_arg, add_truncate_arg, comma_floats, comma_list


def _task_paths(text: str | None) -> dict:
    """``"truthfulqa_mc1=path.csv,wikitext2=dir"`` -> ``{task: path}``."""
    out = {}
    for part in comma_list(text, "--data"):
        task, sep, path = part.partition("=")
        if not sep or not path:
            raise UserError(f"--data entries must be TASK=PATH, got '{part}'")
        out[task.strip()] = path.strip()
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=100, help="items per task (default 100)")
    p.add_argument("--offset", type=int, default=0, help="first item")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity: tokens of the test split")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation: answer length cap")
    p.add_argument("--calib", default="wikitext2", help="calibration source of deployable selectors: "
                                                        "wikitext2 (valid split), truthfulqa (questions >= 400) or a text file")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--scope", "--policy", dest="scope", default="per_layer",
                   help="top-k scope of oracle selectors: per_layer, global or threshold")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    add_device_arg(p)


def cmd_evaluate(args) -> int:
    policy = make_policy(args.selector, args.ratio, scope=args.scope)

    get_task(args.task)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if policy.mode in ("online", "static", "predictor", "channel"):
        policy.prepare(model, calibration_sequences(tok, args.calib, args.calib_sequences, args.calib_len))
    result = evaluate_task(model, tok, args.task, policy, limit=args.limit, offset=args.offset,
                           data=args.data, max_tokens=args.max_tokens,
                           max_new_tokens=args.max_new_tokens, progress=True, truncate=args.truncate)
    print(json.dumps({"model": args.model, **result}, indent=2))
    return 0


def cmd_compare(args) -> int:
    config = CompareConfig(models=comma_list(args.models, "--models"), tasks=comma_list(args.tasks, "--tasks"),
                           selectors=comma_list(args.selectors, "--selectors"),
                           ratios=comma_floats(args.ratios, "--ratios", ratios=True),
                           limit=args.limit, offset=args.offset, max_tokens=args.max_tokens,
                           max_new_tokens=args.max_new_tokens, calib=args.calib,
                           calib_sequences=args.calib_sequences, calib_len=args.calib_len,
                           dtype=args.dtype, scope=args.scope, data=_task_paths(args.data),
                           device=args.device)
    out = Path(args.out)
    results = Compare(config, out).run()
    if results is not None:  # None on the non-main ranks of a torchrun job
        save_command(out, sys.argv[1:])
        print(f"table:  {out / 'compare.md'} (and .csv, .json)\nplots:  "
              + ", ".join(str(out / f"{t}.png") for t in config.tasks))
    return 0


#: options of the two benches (``attrsparse bench``): the engine bench (default) and the unit modes (--modes)
ENGINE_OPTIONS = ("engines", "precisions", "selectors", "channels_from", "rounds", "warmup", "prompt", "nice",
                  "idle_busy", "bandwidth_mb", "load", "calib", "calib_sequences", "calib_len")
MODE_OPTIONS = ("static_from", "predictor_from", "allocation", "oracle_selector", "dtype", "speed_prompts",
                "repeats", "batch_size", "gen_questions", "mc1_items", "no_speed")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _channels_from(text: str | None, selectors: list[str]) -> dict:
    """``"attr_channel=DIR,teal=DIR"`` (or a bare ``DIR`` when one channel selector is benched)."""
    out = {}
    for part in comma_list(text, "--channels-from"):
        selector, sep, path = part.partition("=")
        if not sep:
            sparse = [s for s in selectors if s != "dense"]
            if len(sparse) != 1:
                raise UserError(f"--channels-from entries must be SELECTOR=DIR, got '{part}'")
            selector, path = sparse[0], part
        if not selector.strip() or not path.strip():
            raise UserError(f"--channels-from entries must be SELECTOR=DIR, got '{part}'")
        if selector.strip() in out:
            raise UserError(f"--channels-from names {selector.strip()} twice")
        out[selector.strip()] = path.strip()
    return out


def cmd_bench(args) -> int:
    given = lambda names: [_option(n) for n in names if getattr(args, n) not in (None, False)]  # noqa: E731
    if args.modes is not None:
        if given(ENGINE_OPTIONS):
            raise UserError(f"{', '.join(given(ENGINE_OPTIONS))} belong(s) to the engine bench; --modes runs the "
                            "unit-mode bench (leave --modes out for the engine bench)")
        return _bench_modes(args)
    if given(MODE_OPTIONS):
        raise UserError(f"{', '.join(given(MODE_OPTIONS))} belong(s) to the unit-mode bench: add --modes "
                        "(e.g. --modes dense,static,predictor,oracle)")
    selectors = comma_list(args.selectors or "dense,attr_channel", "--selectors", nonempty=True)
    config = EngineBenchConfig(
        model=args.model, engines=comma_list(args.engines or "native,hf,llamacpp", "--engines", nonempty=True),
        precisions=comma_list(args.precisions or "fp32", "--precisions", nonempty=True), selectors=selectors,
        ratios=comma_floats(args.ratios or "0.6", "--ratios", ratios=True),
        channels_from=_channels_from(args.channels_from, selectors),
        rounds=5 if args.rounds is None else args.rounds, new_tokens=args.new_tokens or 64,
        warmup=16 if args.warmup is None else args.warmup, threads=args.threads or 2,
        prompt=args.prompt or ENGINE_PROMPT, task=args.task, task_items=args.task_items or 50,
        ppl_tokens=args.ppl_tokens or 2048,
        quality=not args.no_quality, calib=args.calib or "wikitext2", calib_sequences=args.calib_sequences or 16,
        calib_len=args.calib_len or 128, bandwidth_mb=args.bandwidth_mb or 512, nice=args.nice or 0,
        idle_busy=args.idle_busy, load=args.load or "mmap").validate()  # every name checked before any work
    out = Path(args.out)
    EngineBench(config, out, command=command_line(getattr(args, "argv", None) or sys.argv[1:])).run()
    print(f"results: {out / 'bench.json'}\ntable:   {out / 'bench.md'}\nplot:    {out / 'bench.png'}")
    return 0


def _bench_modes(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = BenchConfig(model=args.model, ratios=comma_floats(args.ratios or "0.3,0.5,0.7", "--ratios", ratios=True),
                         modes=comma_list(args.modes, "--modes"),
                         static_from=args.static_from, predictor_from=args.predictor_from,
                         allocation=args.allocation or "uniform", oracle_selector=args.oracle_selector or "corrected_gxo",
                         dtype=args.dtype or "float32", speed_prompts=args.speed_prompts or 4,
                         new_tokens=args.new_tokens or 48, repeats=args.repeats or 3,
                         batch_size=args.batch_size or 1, gen_questions=args.gen_questions or 20,
                         mc1_items=100 if args.mc1_items is None else args.mc1_items,
                         task=args.task, task_items=args.task_items or 100, ppl_tokens=args.ppl_tokens or 4096,
                         quality=not args.no_quality, speed=not args.no_speed)
    out = Path(args.out)
    Bench(config, out).run()
    print(f"results: {out / 'bench.json'}\ntable:   {out / 'bench.md'}\nplot:    {out / 'bench.png'}")
    return 0


def register_evaluation_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="one task under one selector at one ratio (JSON on stdout)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", required=True, help="a task name (see `attrsparse tasks`)")
    p.add_argument("--selector", default="dense",
                   help="dense, a metric/selector name, static:DIR or predictor:DIR")
    p.add_argument("--ratio", type=float, default=1.0, help="target activation ratio in (0, 1]")
    p.add_argument("--data", default=None, help="local data file/dir (default: bundled copies)")
    _add_common(p)
    add_truncate_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="selectors x tasks x ratios x models in one table and figure per task")
    p.add_argument("--models", default="smollm2-135m", help="comma-separated model specs")
    p.add_argument("--tasks", default="arc_easy,sciq,truthfulqa_mc1,wikitext2")
    p.add_argument("--selectors", default="corrected_gxo,magnitude,teal,cats,wina,wanda,random",
                   help="comma-separated metric/selector names, static:DIR, predictor:DIR")
    p.add_argument("--ratios", default="0.3,0.5,0.7,0.9", help="requested ratios (< 1; dense is always run)")
    p.add_argument("--data", default=None, help="local data per task: TASK=PATH[,TASK=PATH...]")
    p.add_argument("--out", required=True, help="output directory (resumes if it holds a run)")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "bench", help="decode speed of the native engine, transformers and llama.cpp per precision, channel "
                      "selector and ratio, with quality (or, with --modes, the unit-sparsity modes in-process)",
        description="Default (the engine bench): decode tokens/s of every (engine, precision, selector, ratio) in "
                    "fresh processes alternating in rounds, read ratios, speed-ups against dense and llama.cpp, the "
                    "ideal and the memory-bandwidth floor, peak RSS, and WikiText-2 perplexity and task accuracy of "
                    "each selector (docs/engine.md). With --modes: dense vs static vs predictor (vs oracle) in one "
                    "process (docs/evaluation.md).")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--engines", default=None,
                   help="native (the C engine), hf (transformers + channel hooks), llamacpp (llama-cpp-python, "
                        "dense; pip install -e '.[bench]'); default native,hf,llamacpp")
    p.add_argument("--precisions", default=None,
                   help="fp32, bf16, int8 (llama.cpp: F32, F16 and the packaged GGUF, e.g. Q4_1; hf: fp32, bf16); "
                        "default fp32")
    p.add_argument("--selectors", default=None,
                   help="dense and channel rules (attr_channel, teal, wina, cats, r_sparse, scap); dense is always "
                        "measured; default dense,attr_channel")
    p.add_argument("--ratios", default=None, help="read ratios of the channel selectors (default 0.6; "
                                                   "with --modes: parameter-weighted ratios, default 0.3,0.5,0.7)")
    p.add_argument("--channels-from", default=None,
                   help="SELECTOR=DIR[,...]: channel directories from `attrsparse calibrate --selector` "
                        "(default: calibrate into OUT/channels/SELECTOR)")
    p.add_argument("--rounds", type=int, default=None, help="rounds; every contender once per round (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="tokens generated before the timed run (default 16)")
    p.add_argument("--prompt", default=None, help=f"prompt of the speed runs (default: {ENGINE_PROMPT!r})")
    p.add_argument("--nice", type=int, default=None, help="niceness of the contender processes (default 0)")
    p.add_argument("--idle-busy", type=float, default=None,
                   help="before each run wait until other work keeps at most this fraction of the CPUs busy")
    p.add_argument("--bandwidth-mb", type=int, default=None, help="buffer of the bandwidth benchmark (default 512)")
    p.add_argument("--load", default=None, help="native: mmap (default) or copy (private copy, huge pages)")
    p.add_argument("--calib", default=None, help="calibration text of channel rules (default wikitext2)")
    p.add_argument("--calib-sequences", type=int, default=None, help="calibration sequences (default 16)")
    p.add_argument("--calib-len", type=int, default=None, help="calibration sequence length (default 128)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of every contender (default 2; with --modes: torch threads, default torch's)")
    p.add_argument("--new-tokens", type=int, default=None, help="timed tokens (default 64; with --modes 48)")
    p.add_argument("--task", default="arc_easy", help="ground-truth multiple-choice task (arc_easy or sciq)")
    p.add_argument("--task-items", type=int, default=None, help="task items (default 50; with --modes 100)")
    p.add_argument("--ppl-tokens", type=int, default=None,
                   help="WikiText-2 test tokens of the perplexity (default 2048; with --modes 4096)")
    p.add_argument("--no-quality", action="store_true", help="speed only")
    p.add_argument("--out", required=True)
    g = p.add_argument_group("unit-mode bench (--modes)")
    g.add_argument("--modes", default=None, help="dense,static,predictor,oracle: the in-process bench of unit "
                                                  "sparsity instead of the engine bench")
    g.add_argument("--static-from", default=None, help="a calibrate directory (default: calibrate into OUT/static)")
    g.add_argument("--predictor-from", default=None,
                   help="a train-predictor directory (default: train into OUT/predictor)")
    g.add_argument("--allocation", default=None, help="static allocation when calibrating: uniform (default) or greedy")
    g.add_argument("--oracle-selector", default=None, help="metric of the oracle mode (default corrected_gxo)")
    g.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    g.add_argument("--speed-prompts", type=int, default=None, help="default 4")
    g.add_argument("--repeats", type=int, default=None, help="default 3")
    g.add_argument("--batch-size", type=int, default=None, help="default 1")
    g.add_argument("--gen-questions", type=int, default=None, help="TruthfulQA questions for BLEU vs dense (default 20)")
    g.add_argument("--mc1-items", type=int, default=None, help="default 100")
    g.add_argument("--no-speed", action="store_true", help="quality only")
    p.set_defaults(func=cmd_bench)
