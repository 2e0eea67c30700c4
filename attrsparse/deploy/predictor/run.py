"""``attrsparse train-predictor``: oracle labels on calibration text, predictor training, report.

Steps (:func:`run_train_predictor`):

1. ``n_seq + holdout`` calibration sequences (:func:`attrsparse.data.calibration.calibration_sequences`);
   the last ``holdout`` are held out for the report.
2. Dense block inputs and oracle corrected-GxO ranks for every token
   (:func:`~attrsparse.deploy.predictor.train.collect_training_data`), cached in
   ``DIR/training_data.safetensors`` / ``DIR/heldout_data.safetensors`` with a JSON key, so a
   re-run with other training settings or ratios skips this step (about 2 s per 128-token sequence
   on SmolLM2-135M; the cache holds ``L * (8d + 2(N + H))`` bytes per token, 231 kB for SmolLM2).
3. One predictor trained on the soft labels of all ``--ratios`` (``DIR/predictor.safetensors``).
4. Recall/precision against the oracle on the held-out tokens at every ratio and the cost ratio,
   written to ``DIR/predictor.json``, then the manifest (kind ``predictor``). Task quality under the
   predictor (``--eval-tasks``) is added by the command (:mod:`attrsparse.cli.deploy`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...core.artifacts import write_manifest
from ...core.errors import UserError, check_ratio
from ...core.fingerprint import model_fingerprint
from ...core.io import atomic_save_tensors, atomic_write_json, load_tensors, stable_hash
from ...core.units import UnitMasks, executed_ratio, unit_map
from ...data.calibration import calibration_sequences
from ...policies.predictor import REPORT_NAME, save_predictor
from ...selectors.budget import BudgetRule
from .train import PredictorConfig, TrainingData, collect_training_data, train_predictor

DATA_FORMAT = 1


@torch.no_grad()
def evaluate_predictor(predictor, data, units, ratio: float) -> dict:
    """Recall and precision of a :class:`~attrsparse.deploy.predictor.Predictor`'s masks against
    the oracle's on :class:`~attrsparse.deploy.predictor.TrainingData` at ``ratio``: per unit
    kind, parameter-weighted (kept MLP units and query heads weighted by their parameters) and per
    layer; plus the executed ratio of the predicted and the oracle masks."""
    rule = BudgetRule(units, check_ratio(ratio), predictor.meta.get("head_power", 0.5))
    hit = {"mlp": 0, "heads": 0}
    pred_n = {"mlp": 0, "heads": 0}
    true_n = {"mlp": 0, "heads": 0}
    per_layer, pred_masks, true_masks = [], [], []
    for layer in range(units.num_layers):
        heads = rule.heads(predictor.head_logits(layer, data.attn_in[layer]))
        mlp = rule.mlp(predictor.mlp_logits(layer, data.mlp_in[layer]), heads)
        truth = data.labels(layer, ratio, units, rule.head_power)
        layer_hits = {}
        for kind, p, t in (("mlp", mlp, truth.mlp), ("heads", heads, truth.heads)):
            h = int((p & t).sum())
            hit[kind] += h
            pred_n[kind] += int(p.sum())
            true_n[kind] += int(t.sum())
            layer_hits[kind] = h / max(1, int(t.sum()))
        per_layer.append(layer_hits)
        pred_masks.append(UnitMasks(mlp, heads))
        true_masks.append(truth)
    w = {"mlp": units.mlp_unit_params, "heads": units.head_params}

    def weighted(counts):
        return sum(counts[k] * w[k] for k in w)

    pred = UnitMasks.stack(pred_masks, dim=1)
    true = UnitMasks.stack(true_masks, dim=1)
    return {
        "ratio": ratio, "tokens": data.tokens,
        "recall_mlp": hit["mlp"] / max(1, true_n["mlp"]), "precision_mlp": hit["mlp"] / max(1, pred_n["mlp"]),
        "recall_heads": hit["heads"] / max(1, true_n["heads"]),
        "precision_heads": hit["heads"] / max(1, pred_n["heads"]),
        "recall_param": weighted(hit) / max(1, weighted(true_n)),
        "precision_param": weighted(hit) / max(1, weighted(pred_n)),
        "random_recall_mlp": pred_n["mlp"] / (data.tokens * units.num_layers * units.mlp_size),
        "random_recall_heads": pred_n["heads"] / (data.tokens * units.num_layers * units.num_heads),
        "recall_mlp_per_layer": [round(x["mlp"], 4) for x in per_layer],
        "recall_heads_per_layer": [round(x["heads"], 4) for x in per_layer],
        "executed_ratio_predicted": executed_ratio(pred, units).param,
        "executed_ratio_oracle": executed_ratio(true, units).param,
    }


def _cached_data(model, sequences, path: Path, key: dict, progress: bool):
    """:class:`TrainingData` of ``sequences``, read from ``path`` when its key matches."""
    key_path = path.with_suffix(".json")
    digest = stable_hash(key)
    if path.exists() and key_path.exists():
        try:
            stored = json.loads(key_path.read_text()).get("key")
        except (ValueError, AttributeError):
            stored = None
        tensors = load_tensors(path) if stored == digest else None
        if tensors is not None and set(tensors) == {"attn_in", "mlp_in", "mlp_rank", "head_rank"}:
            return TrainingData(**tensors), True
    data = collect_training_data(model, sequences, progress=progress)
    atomic_save_tensors(path, data.tensors())
    atomic_write_json(key_path, {"key": digest, **key})  # written last: marks the data complete
    return data, False


def run_train_predictor(model, tokenizer, out: str | Path, *, ratios, calib: str = "wikitext2",
                        data: str | None = None, n_seq: int = 64, seq_len: int = 128,
                        holdout: int | None = None, config=None, spec: str = "?",
                        progress: bool = True) -> dict:
    """Train, save and report a predictor (module docstring); returns the report dict."""
    ratios = sorted({check_ratio(r, "--ratios") for r in ratios})
    config = (config or PredictorConfig()).validate()
    holdout = max(1, n_seq // 8) if holdout is None else holdout
    if n_seq < 1 or holdout < 1:
        raise UserError("--n-seq and --holdout must be at least 1")
    out = Path(out)
    units = unit_map(model)
    fingerprint = model_fingerprint(model)
    t0 = time.perf_counter()
    seqs = calibration_sequences(tokenizer, calib, n_seq + holdout, seq_len, data=data)
    if len(seqs) < 2:
        raise UserError(f"calibration source '{calib}' gave {len(seqs)} sequence(s); need a training "
                        "and a held-out one")
    cut = len(seqs) - min(holdout, len(seqs) - 1)  # fewer sequences than asked: keep a held-out one
    key = {"format": DATA_FORMAT, "fingerprint": fingerprint, "calib": calib, "data": data,
           "seq_len": seq_len, "dtype": str(next(model.parameters()).dtype)}
    train_data, cached_train = _cached_data(model, seqs[:cut], out / "training_data.safetensors",
                                            {**key, "sequences": [0, cut]}, progress)
    held_data, cached_held = _cached_data(model, seqs[cut:], out / "heldout_data.safetensors",
                                          {**key, "sequences": [cut, len(seqs)]}, progress)
    t_data = time.perf_counter() - t0
    meta = {"model": {"spec": spec, "fingerprint": fingerprint},
            "calibration": {"source": calib, "data": data, "train_sequences": cut,
                            "heldout_sequences": len(seqs) - cut, "seq_len": seq_len}}
    t1 = time.perf_counter()
    predictor = train_predictor(train_data, units, ratios, config, meta=meta, progress=progress)
    t_train = time.perf_counter() - t1
    weights = save_predictor(predictor, out)
    report = {"predictor": str(weights), "rank": predictor.rank, "head_rank": predictor.head_rank,
              **predictor.meta,
              "cost": predictor.cost(units),
              "timing_s": {"labels": round(t_data, 1), "labels_cached": cached_train and cached_held,
                           "training": round(t_train, 1), "threads": torch.get_num_threads()},
              "heldout": [evaluate_predictor(predictor, held_data, units, r) for r in ratios]}
    atomic_write_json(out / REPORT_NAME, report)
    write_manifest(out, "predictor", model, spec)
    return report


def print_report(report: dict, out: Path) -> None:
    cost = report["cost"]
    print(f"predictor: {report['predictor']}  (rank {report['rank']}, head rank {report['head_rank']}, "
          f"trained on {report['training_tokens']} tokens at ratios "
          f"{', '.join(f'{r:g}' for r in report['ratios'])})")
    print(f"cost per token and layer: MLP predictor {cost['mlp_cost_ratio']:.3f} of the dense MLP, "
          f"head predictor {cost['head_cost_ratio']:.3f} of the attention projections, "
          f"{cost['layer_cost_ratio']:.3f} of the layer")
    print("held-out recall / precision against the oracle (budget_gxo):")
    print(f"  {'ratio':>5}  {'executed':>8}  {'mlp R':>6}  {'mlp P':>6}  {'heads R':>7}  {'heads P':>7}  "
          f"{'param R':>7}  {'random mlp R':>12}")
    for e in report["heldout"]:
        print(f"  {e['ratio']:>5g}  {e['executed_ratio_predicted']:>8.3f}  {e['recall_mlp']:>6.3f}  "
              f"{e['precision_mlp']:>6.3f}  {e['recall_heads']:>7.3f}  {e['precision_heads']:>7.3f}  "
              f"{e['recall_param']:>7.3f}  {e['random_recall_mlp']:>12.3f}")
    for row in report.get("quality", []):
        value = {k: row[k] for k in ("ppl", "acc", "acc_norm", "mc2") if k in row}
        print(f"  {row['task']:<16} {row['selector']:<24} ratio {row['executed_ratio']:.3f}  "
              + "  ".join(f"{k} {v:.4g}" for k, v in value.items()))
    print(f"report: {out / 'predictor.json'}")
