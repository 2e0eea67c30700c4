"""The experiment sub-commands (sweep, dependency, demo), registered on the CLI's parser."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.models import load_model
from ..experiments.dependency import DependencyConfig, run_dependency
from ..experiments.sweep import Sweep, SweepConfig
from ..selectors import resolve_metric_names
from .args import add_device_arg, add_truncate_arg, comma_floats, comma_ints, comma_list

DEMO_METRICS = "magnitude,gradient,gxo,snip,ig,corrected_gxo,recommended"
ALL_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
DEFAULT_LIMIT = 25  # questions of a sweep without --questions
#: ``attrsparse demo`` on 2 idle cores: fixed minutes, per sweep question, per dependency question
DEMO_MINUTES = (1.0, 0.4, 0.3)


def _metric_names(text: str) -> list[str]:
    return resolve_metric_names(comma_list(text, "--metrics", nonempty=True))


def _add_sweep_args(p: argparse.ArgumentParser, limit: int = DEFAULT_LIMIT) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    p.add_argument("--dataset", default="truthfulqa", help="truthfulqa (TruthfulQA generation)")
    p.add_argument("--data", default=None, help="local TruthfulQA.csv (default: $ATTRSPARSE_DATA_DIR, else the "
                                               "bundled copy; 'truthful_qa' = HF hub, online)")
    p.add_argument("--metrics", default="magnitude,gradient,gxo,snip,ig,corrected_gxo",
                   help="comma-separated metrics/selectors; 'paper' = the paper's six, "
                        "'recommended' = our best selector")
    p.add_argument("--ratios", default=ALL_RATIOS, help="requested activation ratios in (0, 1]")
    p.add_argument("--scope", "--policy", dest="scope", default="per_layer",
                   help="top-k scope: per_layer (paper), global or threshold")
    p.add_argument("--template", default="auto", help="auto (chat if the model has one), chat, paper, qa")
    p.add_argument("--limit", type=int, default=None,
                   help=f"number of questions (default {limit}; with --questions: all of those)")
    p.add_argument("--offset", type=int, default=0, help="first question index")
    p.add_argument("--questions", default=None, help="explicit question indices, e.g. 0,5,9")
    add_truncate_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="cap on the label length")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    add_device_arg(p)
    p.add_argument("--head-reduction", default="sum", help="sum (exact) or mean (official code)")
    p.add_argument("--ig-steps", type=int, default=20, help="Riemann steps of IG (default 20)")
    p.add_argument("--ig-questions", type=int, default=None, help="run IG on the first k questions only")
    p.add_argument("--mask-prefill", action="store_true", help="mask the whole prompt with step 0's masks")
    p.add_argument("--no-mc1", action="store_true", help="skip TruthfulQA MC1 under the masks")
    p.add_argument("--mc1-ratios", default=None, help="ratios at which MC1 runs under masks (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-scores", action="store_true",
                   help="keep every question's per-token scores in OUT/scores (safetensors shards)")
    p.add_argument("--max-memory", type=float, default=None, metavar="MB",
                   help="memory budget of the streamed-scores buffer (default 256; needs --stream-scores)")
    p.add_argument("--out", required=True, help="output directory (resumes if it holds a run)")


def _sweep_config(args):
    if args.max_memory is not None and not args.stream_scores:
        raise UserError("--max-memory bounds the streamed scores; add --stream-scores")
    questions = comma_ints(args.questions, "--questions")
    if questions is not None and args.offset:
        raise UserError("--offset applies to the data set's order; with --questions give the indices themselves")
    limit = DEFAULT_LIMIT if args.limit is None and questions is None else args.limit
    return SweepConfig(
        model=args.model, dataset=args.dataset, data=args.data, metrics=_metric_names(args.metrics),
        ratios=comma_floats(args.ratios, "--ratios", ratios=True), scope=args.scope, template=args.template,
        limit=limit, offset=args.offset, questions=questions, truncate=args.truncate,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, head_reduction=args.head_reduction,
        ig_steps=args.ig_steps, ig_questions=args.ig_questions, mask_prefill=args.mask_prefill,
        mc1=not args.no_mc1, seed=args.seed, stream_scores=args.stream_scores, device=args.device,
        max_memory_mb=256.0 if args.max_memory is None else args.max_memory,
        mc1_ratios=comma_floats(args.mc1_ratios, "--mc1-ratios", ratios=True) if args.mc1_ratios else None)


def cmd_sweep(args) -> int:
    sweep = Sweep(_sweep_config(args), Path(args.out))
    if sweep.run() is not None:  # None on the other ranks of a torchrun job: rank 0 reports
        print(f"report: {Path(args.out) / 'report.md'}\nplots:  {Path(args.out) / 'curves.png'}")
    return 0


def cmd_dependency(args) -> int:
    config = DependencyConfig(model=args.model, data=args.data, limit=args.limit, offset=args.offset,
                              ratios=comma_floats(args.ratios, "--ratios", ratios=True), template=args.template,
                              max_new_tokens=args.max_new_tokens, ablations=args.ablations,
                              device=args.device)
    run_dependency(config, Path(args.out))
    print(f"dependency analysis: {Path(args.out) / 'dependency.json'}")
    return 0


def demo_estimate_minutes(limit: int, dependency_questions: int) -> float:
    """Minutes ``attrsparse demo`` takes on 2 idle cores (measured, :data:`DEMO_MINUTES`), scaled
    by its question counts."""
    base, per_question, per_dependency_question = DEMO_MINUTES
    return base + per_question * limit + per_dependency_question * dependency_questions


def cmd_demo(args) -> int:
    """The paper's sweep on the default model plus the dependency analysis (about 12 minutes on
    2 idle cores; IG and MC1 are limited to keep it there, and the report says so)."""
    out = Path(args.out)
    start = time.monotonic()
    minutes = demo_estimate_minutes(args.limit, args.dependency_questions)
    print(f"demo: dependency analysis on {args.dependency_questions} questions, then the sweep of "
          f"{args.limit} TruthfulQA questions x 7 metrics x 10 ratios on {args.model}; about "
          f"{minutes:.0f} minutes on 2 idle cores (longer on busy ones), into {out}", flush=True)
    model, tok = load_model(args.model)
    run_dependency(DependencyConfig(model=args.model, limit=args.dependency_questions,
                                    offset=args.offset), out, model=model, tokenizer=tok)
    config = SweepConfig(model=args.model, metrics=_metric_names(DEMO_METRICS), limit=args.limit,
                         offset=args.offset, ig_steps=args.ig_steps, ig_questions=args.ig_questions,
                         mc1_ratios=comma_floats(args.mc1_ratios, "--mc1-ratios", ratios=True))
    Sweep(config, out, model=model, tokenizer=tok).run()
    print(f"\ndemo finished in {(time.monotonic() - start) / 60:.1f} minutes (estimate {minutes:.0f})\n"
          f"report: {out / 'report.md'}\nplots:  {out / 'curves.png'} (and .svg)\n"
          f"data:   {out / 'results.json'}, {out / 'results.csv'}, {out / 'dependency.json'}")
    return 0


def register_commands(sub) -> None:
    """Add the experiment commands to the CLI's sub-parsers (imports stay lazy)."""
    p = sub.add_parser("sweep", help="accuracy-activation sweep (the paper's oracle protocol)")
    _add_sweep_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("dependency", help="attribution error from dependency between layers")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--template", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ablations", type=int, default=64, help="single-unit removals measured per question")
    add_device_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_dependency)

    p = sub.add_parser("demo", help="run the paper's sweep and dependency analysis on the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--ig-steps", type=int, default=4, help="IG steps in the demo (paper: 20)")
    p.add_argument("--ig-questions", type=int, default=3, help="IG on the first k questions only")
    p.add_argument("--dependency-questions", type=int, default=3)
    p.add_argument("--mc1-ratios", default="0.3,0.5", help="ratios with MC1 under masks")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
