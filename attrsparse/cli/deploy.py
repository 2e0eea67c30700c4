"""CLI sub-commands ``calibrate``, ``export`` and ``generate`` (registered by ``commands.py``)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from .experiments import add_device_arg
from ..core.errors import UserError


def _ratios(text: str) -> list[float]:
    from .experiments import comma_floats
    from ..core.errors import check_ratio

    return [check_ratio(v, "ratio") for v in comma_floats(text, "--ratios", nonempty=True)]


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
    from ..deploy.calibrate import run_calibration

    _positive(args.n_seq, "--n-seq")
    _positive(args.search_seqs, "--search-seqs")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    return run_calibration(model, tok, out, ratios=ratios, metric=args.metric, allocation=args.allocation,
                           calib=args.calib, n_sequences=args.n_seq, seq_len=args.seq_len,
                           search_sequences=args.search_seqs, labels=args.labels,
                           head_power=args.head_power, spec=args.model, data=args.data)


def cmd_calibrate(args) -> int:
    from ..core.distributed import init_distributed
    from ..core.models import load_model

    ratios = _ratios(args.ratios)
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


def test_windows(tokenizer, n: int, seq_len: int, data: str | None = None):
    """The first ``n`` windows of ``seq_len`` tokens of the WikiText-2 *test* split (calibration
    reads the valid split)."""
    from ..data.tasks import load_wikitext

    text = load_wikitext(data, split="test")
    ids = tokenizer(text[: n * seq_len * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(n, ids.numel() // seq_len))]


def perplexity(model, sequences) -> float:
    """exp(mean next-token cross-entropy) over 1-D id ``sequences``."""
    import math

    import torch
    import torch.nn.functional as F

    from ..core.architectures import model_device
    from ..core.trace import to_ids

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

    from ..core.errors import check_ratio
    from ..core.models import load_model
    from ..deploy.calibrate import JSON_NAME, TENSORS_NAME, load_static_policy
    from ..deploy.export import EXPORT_INFO, export_model

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
        report = export_model(model, tok, policy.masks, out, info=info)
        if args.sparsity_from is None:  # keep the calibration beside the export
            (out / "calibration").mkdir(exist_ok=True)
            for name in (JSON_NAME, TENSORS_NAME):
                shutil.copy(Path(source) / name, out / "calibration" / name)
    if args.eval_seqs > 0:
        seqs = test_windows(tok, args.eval_seqs, args.seq_len, args.data_eval)
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).eval()
        report["quality"] = {"wikitext2_test_windows": len(seqs), "window": args.seq_len,
                             "ppl_dense": perplexity(model, seqs), "ppl_export": perplexity(reloaded, seqs),
                             "loaded_with": "AutoModelForCausalLM.from_pretrained"}
        from ..core.io import atomic_write_json

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

    from ..deploy.runtime import generate

    if not args.prompt or not any(p.strip() for p in args.prompt):
        raise UserError("--prompt is empty")
    if args.threads:
        torch.set_num_threads(_positive(args.threads, "--threads"))
    sparsity = args.sparsity_from
    if args.predictor:
        if sparsity:
            raise UserError("use either --sparsity-from or --predictor")
        sparsity = f"predictor:{args.predictor}"
    result = generate(args.model, args.prompt, sparsity, ratio=args.ratio, dtype=args.dtype,
                      max_new_tokens=_positive(args.max_new_tokens, "--max-new-tokens"),
                      batch_size=args.batch_size, template=args.template)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    for prompt, text in zip(args.prompt, result.texts):
        print(f"> {prompt}\n{text}\n")
    ex = result.executed
    print(f"[{result.mode}] executed ratio {ex.param:.3f} (mlp {ex.mlp:.3f}, heads {ex.heads:.3f}), "
          f"computed {result.computed_fraction:.3f}, {result.tokens_per_s:.1f} tokens/s decode")
    return 0


def register_deploy_commands(sub) -> None:
    """Add ``calibrate``, ``export`` and ``generate`` to the CLI's sub-parsers."""
    p = sub.add_parser("calibrate", help="calibrated static masks at parameter-weighted ratios")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="parameter-weighted target ratios")
    _add_calibration_args(p)
    add_device_arg(p)
    p.add_argument("--out", required=True, help="sparsity directory (static.json + static.safetensors)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="save a physically smaller stock model (static masks sliced)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
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
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sparsity-from", default=None, help="sparsity directory, static:DIR or predictor:PATH")
    p.add_argument("--predictor", default=None, help="predictor file/directory (predictor runtime)")
    p.add_argument("--ratio", type=float, default=None, help="which calibrated ratio")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--template", default="auto", help="auto, chat, paper, qa or raw")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)
