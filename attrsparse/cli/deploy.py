"""CLI sub-commands ``calibrate``, ``export`` and ``generate`` (registered by ``commands.py``)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..core.architectures import model_device
from ..core.artifacts import artifact_kind
from ..core.distributed import init_distributed
from ..core.errors import UserError, check_ratio
from ..core.io import atomic_write_json
from ..core.models import load_model
from ..core.trace import to_ids
from ..data.tasks import load_wikitext
from ..deploy.calibrate import run_calibration, run_channel_calibration
from ..deploy.export import EXPORT_INFO, export_model
from ..deploy.predictor import PredictorConfig, print_report, run_train_predictor
from ..deploy.runtime import generate
from ..evaluation.evaluate import evaluate_task
from ..policies import DensePolicy, load_predictor_policy
from ..policies.predictor import REPORT_NAME
from ..policies.static import JSON_NAME, TENSORS_NAME, load_static_policy
from ..selectors.channel_calibration import check_attr
from ..selectors.channels import CHANNEL_RULES
from .args import add_device_arg, add_model_args, add_truncate_arg, comma_floats, comma_list


def _ratios(text: str) -> list[float]:
    return comma_floats(text, "--ratios", nonempty=True, ratios=True)


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")
    return value


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="corrected_gxo", help="attribution metric (default corrected_gxo)")
    p.add_argument("--allocation", default="uniform", help="uniform (default) or greedy (searched "
                                                            "on calibration loss)")
    p.add_argument("--calib", default="wikitext2", help="wikitext2 (valid split, default), truthfulqa "
                                                        "(questions 400+) or a text file")
    p.add_argument("--data", default=None, help="data file/directory for --calib (default: the bundled copies, or $ATTRSPARSE_DATA_DIR)")
    p.add_argument("--n-seq", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--search-seqs", type=int, default=2, help="sequences the greedy search measures "
                                                              "its loss on (default 2)")
    p.add_argument("--labels", default="text", help="text (next-token loss, default) or dense (the "
                                                    "model's own predictions)")
    p.add_argument("--head-power", type=float, default=0.5, help="uniform: heads keep ratio**power")


def _calibrate(model, tok, args, ratios, out: Path) -> dict:
    _positive(args.n_seq, "--n-seq")
    _positive(args.search_seqs, "--search-seqs")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    return run_calibration(model, tok, out, ratios=ratios, metric=args.metric, allocation=args.allocation,
                           calib=args.calib, n_sequences=args.n_seq, seq_len=args.seq_len,
                           search_sequences=args.search_seqs, labels=args.labels,
                           head_power=args.head_power, spec=args.model, data=args.data,
                           overwrite=getattr(args, "overwrite", False))


def cmd_calibrate(args) -> int:
    ratios = _ratios(args.ratios)
    if args.selector in CHANNEL_RULES:
        return _calibrate_channels(args, ratios)
    if args.attr:
        raise UserError("--attr sets options of attr_channel, not of static masks")
    if args.selector != "static":
        raise UserError(f"--selector must be static or a channel rule ({', '.join(CHANNEL_RULES)}), "
                        f"got '{args.selector}'")
    ctx = init_distributed(args.device)  # under torchrun: join the job; the model runs on this rank's device
    model, tok = load_model(args.model, dtype=args.dtype, device=ctx.device)
    doc = _calibrate(model, tok, args, ratios, Path(args.out))
    if doc is None:  # another rank of a torchrun job: rank 0 reports
        return 0
    print(f"{'ratio':>6} {'executed':>9} {'mlp':>6} {'heads':>6} {'kv':>5}  allocation")
    for key, entry in doc["ratios"].items():
        print(f"{key:>6} {entry['executed_ratio']:9.4f} {entry['executed_ratio_mlp']:6.3f} "
              f"{entry['executed_ratio_heads']:6.3f} {entry['executed_ratio_kv_heads']:5.2f}  "
              f"{entry['allocation']} ({entry['heads']['kv_groups']}x{entry['heads']['heads_per_group']} heads)")
    print(f"sparsity file: {Path(args.out) / 'static.json'}")
    return 0


def _attr_options(items: list[str] | None) -> dict:
    """``--attr KEY=VALUE`` items as a dict; each VALUE is read as JSON (true, 0.5, ["attn_in"]),
    else as a string."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--attr takes KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _calibrate_channels(args, ratios) -> int:
    _positive(args.n_seq, "--n-seq")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    attr = check_attr(_attr_options(args.attr))  # bad options fail before the model loads
    if attr and args.selector != "attr_channel":
        raise UserError(f"--attr sets options of attr_channel, not of '{args.selector}'")
    model, tok = load_model(args.model, dtype=args.dtype, device=init_distributed(args.device).device)
    doc = run_channel_calibration(model, tok, args.out, selector=args.selector, ratios=ratios, calib=args.calib,
                                  n_sequences=args.n_seq, seq_len=args.seq_len, data=args.data, spec=args.model,
                                  overwrite=getattr(args, "overwrite", False), attr=attr)
    print(f"{'ratio':>6} {'read on calibration':>20}  allocation")
    for key, entry in doc["ratios"].items():
        print(f"{key:>6} {entry['calibration_read_ratio']:20.4f}  {entry['allocation']}")
    print(f"channel file: {Path(args.out) / 'channels.json'}")
    return 0


def test_windows(tokenizer, n: int, seq_len: int, data: str | None = None):
    """The first ``n`` windows of ``seq_len`` tokens of the WikiText-2 *test* split (calibration
    reads the valid split)."""
    text = load_wikitext(data, split="test")
    ids = tokenizer(text[: n * seq_len * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(n, ids.numel() // seq_len))]


def perplexity(model, sequences) -> float:
    """exp(mean next-token cross-entropy) over 1-D id ``sequences``."""
    import math

    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = to_ids(seq, model_device(model)).view(1, -1)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(total / count)


def cmd_export(args) -> int:
    from transformers import AutoModelForCausalLM

    ratio = check_ratio(args.ratio)
    out = Path(args.out)
    model, tok = load_model(args.model, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.sparsity_from
        if source is None:
            source = str(Path(tmp) / "calibration")
            print(f"no --sparsity-from: calibrating {args.metric} on {args.calib} "
                  f"({args.n_seq} x {args.seq_len} tokens, {args.allocation})")
            _calibrate(model, tok, args, [ratio], Path(source))
        source = source.removeprefix("static:")
        policy = load_static_policy(source, ratio)
        policy.check_model(model)
        info = {"source_model": args.model, "sparsity": str(args.sparsity_from or "calibrated for this export"),
                "ratio": ratio, "metric": policy.doc.get("metric"),
                "allocation": policy.entry.get("allocation"), "calibration": policy.doc.get("calibration")}
        kept = {} if args.sparsity_from else {  # keep the calibration beside the export
            f"calibration/{name}": Path(source) / name for name in (JSON_NAME, TENSORS_NAME)}
        report = export_model(model, tok, policy.masks, out, info=info, extra_files=kept)
    if args.eval_seqs > 0:
        seqs = test_windows(tok, args.eval_seqs, args.seq_len, args.data_eval)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).eval()
        report["quality"] = {"wikitext2_test_windows": len(seqs), "window": args.seq_len,
                             "ppl_dense": perplexity(model, seqs), "ppl_export": perplexity(reloaded, seqs),
                             "loaded_with": "AutoModelForCausalLM.from_pretrained"}

        atomic_write_json(out / EXPORT_INFO, report)
    mb = report["size_on_disk_bytes"] / 1e6
    print(f"exported {out}: {report['params_after']:,} parameters (was {report['params_before']:,}), "
          f"{mb:.1f} MB on disk, executed ratio {report['executed_ratio']:.3f}, "
          f"{report['num_attention_heads']} heads / {report['num_key_value_heads']} kv heads, "
          f"MLP {report['mlp_size']}")
    pad = report["padding_units"]
    if pad.get("mlp") or pad.get("heads"):
        print(f"note: the stock format has one MLP size and head count for every layer; "
              f"{pad['mlp']} MLP units and {pad['heads']} heads are stored as zero-output padding "
              f"(non-uniform allocation); `attrsparse generate --sparsity-from` runs the exact sizes")
    if "quality" in report:
        q = report["quality"]
        print(f"WikiText-2 test perplexity ({q['wikitext2_test_windows']} x {q['window']} tokens): "
              f"dense {q['ppl_dense']:.2f}, export {q['ppl_export']:.2f}")
    return 0


def cmd_generate(args) -> int:
    import torch

    if not args.prompt or not any(p.strip() for p in args.prompt):
        raise UserError("--prompt is empty")
    if args.threads:
        torch.set_num_threads(_positive(args.threads, "--threads"))
    sparsity = args.sparsity_from
    if sparsity and ":" not in sparsity and artifact_kind(sparsity) is None:
        sparsity = f"static:{sparsity}"  # what --sparsity-from names: a sparsity (static) directory
    if args.predictor:
        if sparsity:
            raise UserError("use either --sparsity-from or --predictor")
        sparsity = f"predictor:{args.predictor}"
    result = generate(args.model, args.prompt, sparsity, ratio=args.ratio, dtype=args.dtype,
                      max_new_tokens=_positive(args.max_new_tokens, "--max-new-tokens"),
                      batch_size=args.batch_size, template=args.template, truncate=args.truncate)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    for prompt, text in zip(args.prompt, result.texts):
        print(f"> {prompt}\n{text}\n")
    ex = result.executed
    print(f"[{result.mode}] executed ratio {ex.param:.3f} (mlp {ex.mlp:.3f}, heads {ex.heads:.3f}), "
          f"computed {result.computed_fraction:.3f}, {result.tokens_per_s:.1f} tokens/s decode")
    return 0


def _quality(model, tokenizer, weights: Path, ratios, tasks, limit, max_tokens, progress) -> list[dict]:
    """Task numbers under the dense model and the predictor at each ratio."""
    rows = []
    for task in tasks:
        policies = [DensePolicy()] + [load_predictor_policy(weights, r) for r in ratios]
        for policy in policies:
            rows.append(evaluate_task(model, tokenizer, task, policy, limit=limit, max_tokens=max_tokens,
                                      progress=progress))
    return rows


def cmd_train_predictor(args) -> int:
    config = PredictorConfig(rank=args.rank, head_rank=args.head_rank, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, seed=args.seed).validate()
    ratios = comma_floats(args.ratios, "--ratios", nonempty=True, ratios=True)
    tasks = comma_list(args.eval_tasks, "--eval-tasks") or None
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    report = run_train_predictor(model, tokenizer, args.out, ratios=ratios, calib=args.calib, data=args.data,
                                 n_seq=args.n_seq, seq_len=args.seq_len, holdout=args.holdout,
                                 config=config, spec=args.model)
    if tasks:
        report["quality"] = _quality(model, tokenizer, report["predictor"], ratios, tasks, args.eval_limit,
                                     args.eval_max_tokens, True)
        atomic_write_json(Path(args.out) / REPORT_NAME, report)
    print_report(report, Path(args.out))
    return 0


def register_predictor_commands(sub) -> None:
    """Add ``train-predictor`` to the CLI's sub-parsers."""
    p = sub.add_parser("train-predictor",
                       help="train per-layer unit predictors on the oracle's attribution labels")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--ratios", default="0.3,0.5,0.7",
                   help="parameter-weighted ratios whose oracle labels train the predictor")
    p.add_argument("--calib", default="wikitext2", help="wikitext2 (valid split), truthfulqa or a text file")
    p.add_argument("--data", default=None, help="local data file of the calibration source")
    p.add_argument("--n-seq", type=int, default=64,
                   help="training sequences (default 64; more is better but holds every layer's block inputs "
                        "and unit ranks in memory and on disk beside the predictor: on SmolLM2, 256 x 128 "
                        "tokens take 7.6 GB and improved WikiText-2 perplexity at 0.7 from 25.9 to 23.7)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--holdout", type=int, default=None, help="held-out sequences (default n-seq/8)")
    p.add_argument("--rank", type=int, default=64, help="bottleneck of the MLP-unit predictor")
    p.add_argument("--head-rank", type=int, default=32, help="bottleneck of the head predictor")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", default=None,
                   help="optional tasks to score dense and under the predictor, e.g. wikitext2,truthfulqa_mc1")
    p.add_argument("--eval-limit", type=int, default=100, help="items per multiple-choice task")
    p.add_argument("--eval-max-tokens", type=int, default=4096, help="tokens of perplexity tasks")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_train_predictor)


def register_deploy_commands(sub) -> None:
    """Add ``calibrate``, ``export``, ``generate`` and ``train-predictor`` to the CLI's sub-parsers."""
    p = sub.add_parser("calibrate", help="calibrated static masks at parameter-weighted ratios")
    add_model_args(p)
    p.add_argument("--ratios", default="0.3,0.5,0.7",
                   help="target ratios: parameter-weighted (static masks) or read ratios (channel rules)")
    p.add_argument("--selector", default="static",
                   help="static (unit masks from --metric, default) or a channel rule: " + ", ".join(CHANNEL_RULES))
    _add_calibration_args(p)
    add_device_arg(p)
    p.add_argument("--attr", action="append", metavar="KEY=VALUE",
                   help="an attr_channel option over its default, repeatable: per_consumer=false (one decision "
                        "per shared input), statistic=abs|rms, x_weight=0|1|2|4, param_power=0.5, grad_power=1, center=true|mode, "
                        "allocation=global|layer|uniform|sensitivity|greedy|greedy_global, at_rule=0, labels=text|sampled, skip_first=0 "
                        "(docs/results/channels/README.md measures each)")
    p.add_argument("--out", required=True, help="sparsity directory (static.json + static.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the masks of another model, metric or calibration in --out (default: refuse)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="save a physically smaller stock model (static masks sliced)")
    add_model_args(p)
    p.add_argument("--ratio", required=True, help="parameter-weighted activation ratio")
    p.add_argument("--sparsity-from", default=None, help="sparsity directory from `attrsparse calibrate` "
                                                         "(default: calibrate now with the options below)")
    _add_calibration_args(p)
    p.add_argument("--eval-seqs", type=int, default=8, help="WikiText-2 test windows for the perplexity "
                                                            "of dense vs export (0: skip)")
    p.add_argument("--data-eval", default=None, help="WikiText-2 location for the perplexity")
    p.add_argument("--out", required=True, help="output directory (a save_pretrained checkpoint)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="greedy decoding, dense or sparse (static masks or predictors)")
    add_model_args(p)
    p.add_argument("--sparsity-from", default=None, help="sparsity directory, static:DIR or predictor:PATH")
    p.add_argument("--predictor", default=None, help="predictor file/directory (predictor runtime)")
    p.add_argument("--ratio", type=float, default=None, help="which calibrated ratio")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--template", default="auto", help="auto, chat, paper, qa or raw")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    add_truncate_arg(p)
    p.set_defaults(func=cmd_generate)
    register_predictor_commands(sub)
