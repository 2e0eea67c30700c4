"""Command-line entry point: ``attrsparse <command> ...``.

Every command lives in its own function; user mistakes (:class:`~attrsparse.core.errors.UserError`)
print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.errors import UserError, check_ratio
from ..core.models import load_model
from ..core.units import executed_ratio, unit_map
from ..data.prompts import encode_prompt, greedy_continuation, resolve_template, stop_token_ids
from ..data.tasks import get_task, list_tasks
from ..selectors import get_metric, list_metrics, select
from ..selectors.scoring import score
from .args import add_model_args, check_out, comma_list
from .deploy import register_deploy_commands
from .evaluation import register_evaluation_commands
from .experiments import register_commands


def cmd_info(args) -> int:
    model, _ = load_model(args.model, dtype=args.dtype)
    summary = unit_map(model).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        text = f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {text}")
    return 0


def cmd_metrics(args) -> int:
    names = list_metrics()
    width = max(len(n) for n in names)
    for name in names:
        metric = get_metric(name)
        print(f"{name:<{width}}  {metric.kind:<11}  {metric.description}")
    return 0


def cmd_tasks(args) -> int:
    for name in list_tasks():
        task = get_task(name)
        print(f"{name:<16} {task.kind:<16} {task.description}")
    return 0


def cmd_score(args) -> int:
    import torch

    ratio = check_ratio(args.ratio)
    metrics = comma_list(args.metrics, "--metrics", nonempty=True)
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    model, tok = load_model(args.model, dtype=args.dtype)
    template = resolve_template(tok, args.template)
    prompt = encode_prompt(tok, args.prompt, template)
    if args.target is not None:
        target = tok(args.target, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if target.numel() == 0:
            raise UserError("--target is empty")
    else:
        target = greedy_continuation(model, prompt, args.max_new_tokens, stop_token_ids(tok, model))
    scores = score(model, prompt, target, metrics=metrics, ig_steps=args.ig_steps)
    units = unit_map(model)
    report = {"model": args.model, "template": template, "target": tok.decode(target),
              "target_tokens": int(target.numel()), "ratio": ratio, "metrics": {}}
    for name, s in scores.items():
        masks = select(s, ratio, scope=args.scope)
        acc = executed_ratio(masks, units)
        top_layer = torch.topk(s.mlp.sum(-1).mean(0), k=min(3, units.num_layers)).indices.tolist()
        report["metrics"][name] = {**acc.as_dict(), "mlp_scores_shape": list(s.mlp.shape),
                                   "head_scores_shape": list(s.heads.shape),
                                   "layers_with_most_mlp_attribution": top_layer}
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attrsparse",
        description="Attribution-based sparse activation for small language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="layers, units and parameter shares of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("metrics", help="list every metric, selector and baseline with its kind")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("selectors", help="list every metric and selector by name")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("tasks", help="list the evaluation tasks")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("score", help="score one prompt's continuation and report the masks' ratio")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="question / prompt text")
    p.add_argument("--target", default=None, help="continuation to attribute (default: dense greedy)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--template", default="auto", help="auto, chat, paper or qa")
    p.add_argument("--metrics", default="magnitude,gradient,gxo,snip,corrected_gxo")
    p.add_argument("--ratio", default=0.5, help="unit activation ratio in (0, 1]")
    p.add_argument("--scope", "--policy", dest="scope", default="per_layer",
                   help="top-k scope: per_layer, global or threshold")
    p.add_argument("--ig-steps", type=int, default=20)
    p.set_defaults(func=cmd_score)

    register_commands(sub)  # sweep, dependency, demo
    register_evaluation_commands(sub)  # evaluate, compare, bench
    register_deploy_commands(sub)  # calibrate, export, generate, train-predictor
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise; our own stages show progress
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for records
    try:
        if getattr(args, "out", None) is not None and os.environ.get("RANK", "0") in ("", "0"):
            # every command with --out: writable, before any work (rank 0 of torchrun, keeping the
            # folder, since other ranks may write into it at once)
            check_out(args.out, keep=os.environ.get("WORLD_SIZE", "1") not in ("", "1"))
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"attrsparse: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("attrsparse: interrupted; completed work is saved and the run resumes where it stopped",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
