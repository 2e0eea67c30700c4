"""CLI sub-commands ``evaluate`` (one task, one selector) and ``compare`` (the grid)."""

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


def cmd_bench(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = BenchConfig(model=args.model, ratios=comma_floats(args.ratios, "--ratios", ratios=True),
                         modes=comma_list(args.modes, "--modes"),
                         static_from=args.static_from, predictor_from=args.predictor_from,
                         allocation=args.allocation, oracle_selector=args.oracle_selector, dtype=args.dtype,
                         speed_prompts=args.speed_prompts, new_tokens=args.new_tokens, repeats=args.repeats,
                         batch_size=args.batch_size, gen_questions=args.gen_questions, mc1_items=args.mc1_items,
                         task=args.task, task_items=args.task_items, ppl_tokens=args.ppl_tokens,
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

    p = sub.add_parser("bench", help="dense vs static vs predictor (vs oracle): decode speed, ideal "
                                     "speed-up, memory and quality in one run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="parameter-weighted activation ratios")
    p.add_argument("--modes", default="dense,static,predictor,oracle")
    p.add_argument("--static-from", default=None, help="a calibrate directory (default: calibrate into OUT/static)")
    p.add_argument("--predictor-from", default=None,
                   help="a train-predictor directory (default: train into OUT/predictor)")
    p.add_argument("--allocation", default="uniform", help="static allocation when calibrating: uniform or greedy")
    p.add_argument("--oracle-selector", default="corrected_gxo", help="metric of the oracle mode")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--speed-prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gen-questions", type=int, default=20, help="TruthfulQA questions for BLEU vs dense")
    p.add_argument("--mc1-items", type=int, default=100)
    p.add_argument("--task", default="arc_easy", help="ground-truth multiple-choice task (arc_easy or sciq)")
    p.add_argument("--task-items", type=int, default=100)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--no-quality", action="store_true", help="speed only")
    p.add_argument("--no-speed", action="store_true", help="quality only")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bench)
