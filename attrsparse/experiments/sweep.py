"""The paper's oracle protocol as a resumable accuracy-activation sweep.

Per question: (1) label = dense greedy continuation, as many tokens as the reference best answer
(capped); (2) one trace of unit outputs and per-token gradients along that label, from which every
metric's scores come (IG needs its own passes); (3) masks for every (metric, ratio); (4) all
variants decode together as one batch with per-row mask schedules; (5) BLEU/ROUGE-L against the
dense output and truthfulness against TruthfulQA's references; (6) MC1 by masked
log-likelihood, each candidate answer scored with its own oracle masks.

Each finished question is written atomically to ``out/records/q<index>.json``; a re-run with the
same settings skips them. Traces are cached under ``out/cache``, keyed by model, data and settings.
Under ``torchrun`` the questions are sharded across ranks and merged on rank 0
(:func:`attrsparse.core.distributed.run_sharded`, ``docs/distributed.md``); with ``stream_scores`` the
per-token scores are kept in safetensors shards under ``out/scores`` (:mod:`attrsparse.experiments.streaming`).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core import __version__
from ..core.architectures import model_device
from ..core.decoding import masked_greedy_decode, masked_loglik
from ..core.distributed import init_distributed, run_sharded
from ..core.errors import UserError, check_ratio
from ..core.fingerprint import model_key
from ..core.io import (
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    sha256_file,
    stable_hash,
    warn_recompute,
)
from ..core.models import describe_source, load_model
from ..core.trace import GradientTrace, trace_gradients
from ..core.units import UnitMasks, executed_ratio, unit_map
from ..data.prompts import (
    TRUNCATE,
    encode_prompt,
    fit_prompt,
    greedy_continuation,
    resolve_template,
    stop_token_ids,
)
from ..data.tasks import load_truthfulqa
from ..data.tasks.truthfulqa import resolve_truthfulqa_path
from ..data.textmetrics import mean_and_stderr, rouge_l, sentence_bleu, truth_scores
from ..scores import PAPER_SCORES as PAPER_METRICS
from ..selectors import get_metric, resolve_metric_names
from .plots import plot_curves
from .report import write_csv, write_report
from .streaming import ScoreReader, ScoreWriter

DATASETS = ("truthfulqa", "truthfulqa_gen")
RUN_FILE = "sweep.json"  # the configuration an output folder holds (identity), written first
RECORD_FIELDS = ("index", "question", "prompt_tokens", "dense_text", "dense_tokens", "dense_truth",
                 "mc1_dense", "dense_reproduced", "timings", "variants")
VARIANT_FIELDS = frozenset({"metric", "requested_ratio", "text", "generated_tokens", "executed_ratio",
                            "executed_ratio_mlp", "executed_ratio_heads", "executed_ratio_kv_heads",
                            "executed_tokens", "bleu_vs_dense", "rougeL_vs_dense", "truth_bleu_diff",
                            "truth_rougeL_diff", "truth_bleu_acc", "mc1"})


@dataclass
class SweepConfig:
    model: str = "smollm2-135m"
    dataset: str = "truthfulqa"
    data: str | None = None
    metrics: list = field(default_factory=lambda: list(PAPER_METRICS))
    ratios: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    scope: str = "per_layer"
    template: str = "auto"
    limit: int | None = 25
    offset: int = 0
    questions: list | None = None
    max_new_tokens: int = 64  # cap on the label length (reference answer tokens)
    dtype: str = "float32"
    head_reduction: str = "sum"
    ig_steps: int = 20
    ig_questions: int | None = None  # run IG on the first k questions only (None = all)
    mask_prefill: bool = False
    mc1: bool = True
    mc1_ratios: list | None = None  # ratios at which MC1 runs under masks (None = all)
    seed: int = 0
    stream_scores: bool = False  # keep per-token scores in out/scores (safetensors shards)
    max_memory_mb: float = 256.0  # budget of the streamed-scores buffer
    device: str = "auto"  # cuda:<local rank> when CUDA is available, else cpu
    truncate: str = "none"  # a prompt longer than the context: refused, or "left" (its end kept)

    def validate(self) -> "SweepConfig":
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset '{self.dataset}' (available: truthfulqa)")
        if not self.metrics:
            raise UserError("no metrics given")
        self.metrics = resolve_metric_names(self.metrics)  # expands aliases, drops repeats
        channel = [m for m in self.metrics if get_metric(m).mode == "channel"]
        if channel:
            raise UserError(f"{', '.join(channel)}: input-channel rules decide from the live input, not "
                            "units along a label; evaluate them on tasks (evaluate, compare, bench)")
        if not self.ratios:
            raise UserError("no ratios given")
        self.ratios = sorted({round(check_ratio(r), 6) for r in self.ratios})
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if not self.max_memory_mb > 0:
            raise UserError(f"--max-memory must be a positive number of MB, got {self.max_memory_mb:g}")
        if self.truncate not in TRUNCATE:
            raise UserError(f"--truncate must be one of {', '.join(TRUNCATE)}, got {self.truncate!r}")
        if self.questions is not None and self.limit is not None and self.limit < len(self.questions):
            raise UserError(f"--limit {self.limit} would drop {len(self.questions) - self.limit} of the "
                            f"{len(self.questions)} questions given with --questions; leave --limit out")
        return self

    def identity(self) -> dict:
        """Everything that changes a question's record: what :meth:`fingerprint` hashes, and what
        an output folder records so that another configuration is never written over it."""
        keys = asdict(self)
        for k in ("limit", "offset", "questions", "stream_scores", "max_memory_mb", "device"):
            keys.pop(k)
        if keys["truncate"] == "none":
            keys.pop("truncate")  # records written before the option keep their names
        return keys

    def fingerprint(self) -> str:
        """Hash of everything that changes a question's record."""
        return stable_hash(self.identity())


def _trace_cached(model, prompt, target, cache_dir: Path, key_base: dict) -> GradientTrace:
    key = stable_hash({**key_base, "prompt": prompt.tolist(), "target": target.tolist()})
    path = cache_dir / f"trace-{key}.safetensors"
    stored = load_tensors(path)
    if stored is not None and stored["mlp_x"].shape[0] == target.numel():
        device = model_device(model)
        return GradientTrace(*(stored[k].to(device) for k in ("mlp_x", "mlp_g", "head_x", "head_g", "losses")))
    trace = trace_gradients(model, prompt, target).row(0)
    atomic_save_tensors(path, {"mlp_x": trace.mlp_x, "mlp_g": trace.mlp_g, "head_x": trace.head_x,
                               "head_g": trace.head_g, "losses": trace.losses})
    return trace


class Sweep:
    """Runs a :class:`SweepConfig` into an output directory (see the module docstring)."""

    def __init__(self, config: SweepConfig, out: Path, model=None, tokenizer=None):
        self.config = config.validate()
        self.out = Path(out)
        self.identity = json.loads(json.dumps(config.identity()))  # as stored in RUN_FILE
        check_same_run(self.out, self.identity)  # before any work: never write over another run
        self.items = load_truthfulqa(config.data, limit=config.limit, offset=config.offset,
                                     indices=config.questions)
        if not self.items:
            raise UserError("the dataset selection is empty")
        # joins the torchrun group (if any); the model runs on this rank's device
        self.ctx = init_distributed(config.device if model is None else model_device(model))
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype, device=self.ctx.device)
        self.model, self.tok = model, tokenizer
        self.units = unit_map(model)
        self.template = resolve_template(tokenizer, config.template)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.records_dir = self.out / "records"
        self.cache_dir = self.out / "cache"
        self.score_writer = None  # a streaming.ScoreWriter while a run streams scores
        self.key_base = {"model": config.model, "weights": model_key(model), "dtype": config.dtype,
                         "template": self.template, "attrsparse": __version__}
        # every prompt checked against the context before any work (refused, or cut on the left)
        self.prompts = {item.index: fit_prompt(encode_prompt(tokenizer, item.question, self.template), model,
                                               config.max_new_tokens, config.truncate, f"question {item.index}")
                        for item in self.items}

    # -- one question --------------------------------------------------------------------------
    def _uses_ig(self, q_pos: int) -> bool:
        return self.config.ig_questions is None or q_pos < self.config.ig_questions

    def _variants(self, q_pos: int) -> list[tuple[str, float]]:
        """(metric, ratio) pairs decoded for this question; ratio 1.0 is decoded once as dense."""
        use_ig = self._uses_ig(q_pos)
        return [(m, r) for m in self.config.metrics for r in self.config.ratios
                if r < 1.0 and (use_ig or not get_metric(m).is_ig)]

    def _masks(self, prompt, target, trace, variants, stream_key: str | None = None) -> list[UnitMasks]:
        cfg = self.config
        names = {m for m, _ in variants}
        scores = {}
        for name in names:
            # None for selectors that choose masks themselves; most need no extra passes
            scores[name] = get_metric(name).scores(self.model, prompt, target, trace,
                                                   head_reduction=cfg.head_reduction, ig_steps=cfg.ig_steps)
        if stream_key is not None and self.score_writer is not None:
            tensors = {"prompt_ids": prompt, "target_ids": target}
            for name in sorted(n for n in scores if scores[n] is not None):
                tensors.update({f"{name}.mlp": scores[name].mlp, f"{name}.heads": scores[name].heads})
            self.score_writer.add(stream_key, tensors)
        context = {"model": self.model, "prompt_ids": prompt, "target_ids": target, "trace": trace,
                   "units": self.units, "head_reduction": cfg.head_reduction}
        chosen = {}
        for name in scores:
            ratios = [r for m, r in variants if m == name]
            for r, masks in zip(ratios, get_metric(name).masks_for_many(scores[name], ratios, cfg.scope, **context)):
                chosen[(name, r)] = masks
        return [chosen[v] for v in variants]

    def _mc1(self, item, variants) -> tuple[int, dict]:
        """MC1 by summed log-likelihood of each candidate: (dense correct, {variant: correct}).

        Each candidate is its own target: its masks come from its own oracle trace. Metrics that
        need extra passes per candidate (IG, re-scoring selectors) and ratios outside
        ``mc1_ratios`` are left out (their ``mc1`` is null).
        """
        prompt = self.prompts[item.index]
        choices = [c for c in [item.best_answer] + list(item.incorrect_answers) if c.strip()]
        mc1_ratios = self.config.mc1_ratios
        variants = [v for v in variants if get_metric(v[0]).single_pass
                    and (mc1_ratios is None or any(abs(v[1] - r) < 1e-9 for r in mc1_ratios))]
        dense_ll, variant_ll = [], []
        for choice in choices:
            text = choice if self.template == "chat" else " " + choice
            target = self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            dense_ll.append(float(masked_loglik(self.model, prompt, target, None)[0]))
            if variants:
                trace = trace_gradients(self.model, prompt, target).row(0)
                masks = UnitMasks.stack(self._masks(prompt, target, trace, variants))
                variant_ll.append(masked_loglik(self.model, prompt, target, masks))
        dense_ok = int(max(range(len(choices)), key=lambda i: dense_ll[i]) == 0)
        if not variant_ll:
            return dense_ok, {}
        correct = (torch.stack(variant_ll, dim=1).argmax(-1) == 0).int().tolist()  # [V]
        return dense_ok, dict(zip(variants, correct))

    def run_question(self, q_pos: int, item) -> dict:
        cfg, tok = self.config, self.tok
        torch.manual_seed(cfg.seed)
        timings = {}
        t0 = time.perf_counter()
        prompt = self.prompts[item.index]
        ref_len = len(tok(item.best_answer, add_special_tokens=False).input_ids)
        label = greedy_continuation(self.model, prompt, max(1, min(ref_len, cfg.max_new_tokens)), self.stop_ids)
        dense_text = tok.decode(label, skip_special_tokens=True).strip()
        timings["labels"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        trace = _trace_cached(self.model, prompt, label, self.cache_dir, self.key_base)
        variants = self._variants(q_pos)
        masks = self._masks(prompt, label, trace, variants, stream_key=self._record_key(q_pos, item))
        timings["scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        dense_row = UnitMasks.dense(self.units, label.numel(), device=model_device(self.model))
        batch = UnitMasks.stack(masks + [dense_row])
        outputs = masked_greedy_decode(self.model, [prompt] * (len(masks) + 1), batch, label.numel(),
                                       self.stop_ids, self.pad_id, cfg.mask_prefill)
        timings["masked_decoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        mc1_dense, mc1_variants = self._mc1(item, variants) if cfg.mc1 else (None, {})
        timings["mc1"] = time.perf_counter() - t0

        dense_truth = truth_scores(dense_text, item.correct_answers, item.incorrect_answers)
        rows = []
        for i, ((metric, ratio), out) in enumerate(zip(variants + [("dense", 1.0)], outputs)):
            text = tok.decode(out, skip_special_tokens=True).strip()
            acc = executed_ratio(batch[i][: max(1, out.numel())], self.units)
            truth = truth_scores(text, item.correct_answers, item.incorrect_answers)
            rows.append({"metric": metric, "requested_ratio": ratio, "text": text,
                         "generated_tokens": int(out.numel()), **acc.as_dict(),
                         "bleu_vs_dense": sentence_bleu(text, dense_text),
                         "rougeL_vs_dense": rouge_l(text, dense_text),
                         "truth_bleu_diff": truth["bleu_diff"], "truth_rougeL_diff": truth["rougeL_diff"],
                         "truth_bleu_acc": truth["bleu_acc"],
                         "mc1": mc1_dense if metric == "dense" else mc1_variants.get((metric, ratio))})
        return {"index": item.index, "question": item.question, "prompt_tokens": int(prompt.numel()),
                "dense_text": dense_text, "dense_tokens": int(label.numel()),
                "dense_truth": dense_truth, "mc1_dense": mc1_dense,
                "dense_reproduced": rows[-1]["text"] == dense_text, "timings": timings,
                "variants": rows}

    # -- whole run ----------------------------------------------------------------------------
    def _record_key(self, q_pos: int, item) -> str:
        """File stem of a question's record (and its streamed scores' key)."""
        fingerprint = stable_hash([self.config.fingerprint(), self.key_base])
        ig = "ig" if self._uses_ig(q_pos) else "noig"  # records differ with and without IG rows
        return f"q{item.index:04d}-{fingerprint}-{ig}"

    def _record_is_valid(self, q_pos: int, item, record: dict, streamed=None) -> bool:
        variants, truth = record["variants"], record["dense_truth"]
        if not isinstance(variants, list) or not all(isinstance(v, dict) and VARIANT_FIELDS <= v.keys()
                                                     for v in variants) \
                or not isinstance(truth, dict) or not {"bleu_diff", "rougeL_diff", "bleu_acc"} <= truth.keys():
            warn_recompute(self.records_dir / f"{self._record_key(q_pos, item)}.json",
                           "lacks a field of its variants or of dense_truth")
            return False
        expected = set(self._variants(q_pos)) | {("dense", 1.0)}
        if {(v["metric"], v["requested_ratio"]) for v in variants} != expected:
            return False  # written by another version
        return streamed is None or self._record_key(q_pos, item) in streamed  # scores were lost

    def run(self, progress: bool = True) -> dict | None:
        """Run (or resume) every question; returns the results on rank 0, None on other ranks.

        Under torchrun each rank runs its shard of the questions; only rank 0 writes
        ``results.json``, the CSV, the plots and the report, from all records in question order.
        """
        ctx = self.ctx
        if ctx.is_main:  # the folder now holds this configuration (checked in __init__)
            atomic_write_json(self.out / RUN_FILE, {"kind": "sweep", "config": self.identity})
        streamed = None
        if self.config.stream_scores:
            streamed = set(ScoreReader(self.out / "scores").keys())
            self.score_writer = ScoreWriter(self.out / "scores", prefix=f"rank{ctx.rank:03d}",
                                            max_memory_mb=self.config.max_memory_mb)
        try:
            records = run_sharded(
                self.items, self._record_key, self.run_question, self.records_dir,
                valid_fn=lambda q_pos, item, record: self._record_is_valid(q_pos, item, record, streamed),
                manifest_dir=self.out / "shards", ctx=ctx, progress=progress, desc="sweep", required=RECORD_FIELDS,
                after_shard=self.score_writer.close if self.score_writer else None)
        finally:  # scores of questions whose records were written reach disk, even on an interrupt
            if self.score_writer is not None:
                self.score_writer.close()
            self.score_writer = None
        if records is None:
            return None  # not rank 0: rank 0 writes the merged outputs
        results = self.results(records)

        atomic_write_json(self.out / "results.json", results)
        write_csv(results, self.out)
        plot_curves(results, self.out)
        write_report(results, self.out, dependency=read_json(self.out / "dependency.json"))
        return results

    def results(self, records: list[dict]) -> dict:
        import transformers

        cfg = self.config
        data_path = resolve_truthfulqa_path(cfg.data)
        return {
            "schema_version": 1,
            "config": {**asdict(cfg), "template": self.template, "requested_template": cfg.template},
            "versions": {"attrsparse": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "model": {"spec": cfg.model, "units": self.units.summary(), **_model_source(cfg.model)},
            "data": {"path": str(data_path), "n_questions": len(records),
                     "sha256": sha256_file(data_path) if Path(str(data_path)).is_file() else None},
            "questions": records,
            "dense": _dense_aggregate(records),
            "aggregates": aggregate(records, cfg.metrics, cfg.ratios),
        }


def check_same_run(out: Path, identity: dict) -> None:
    """UserError (one line) when ``out`` holds a sweep of another configuration: the one recorded in
    ``RUN_FILE``, or for folders written before it, the configuration in ``results.json``. Settings
    a stored file does not know (options added later) are not compared."""
    stored = read_json(out / RUN_FILE)
    theirs = stored.get("config") if isinstance(stored, dict) else None
    if not isinstance(theirs, dict):
        results = read_json(out / "results.json")
        theirs = dict(results.get("config") or {}) if isinstance(results, dict) else None
        if not theirs:
            return
        theirs["template"] = theirs.pop("requested_template", theirs.get("template"))
    differ = [k for k in identity if k in theirs and theirs[k] != identity[k]]
    if differ:
        shown = "; ".join(f"{k} {_short(theirs[k])} there, {_short(identity[k])} now" for k in differ[:4])
        raise UserError(f"{out} holds a sweep of another configuration ({shown}); choose another --out "
                        "(a run resumes only with the same settings)")


def _short(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_source(spec: str) -> dict:
    try:
        return {"source": describe_source(spec)}
    except Exception as err:  # provenance is best-effort; never fail a finished sweep on it
        return {"source": {"spec": spec, "error": str(err)}}


def _dense_aggregate(records: list[dict]) -> dict:
    def mean(key, sub="dense_truth"):
        return mean_and_stderr([r[sub][key] for r in records])[0]

    return {"truth_bleu_diff": mean("bleu_diff"), "truth_rougeL_diff": mean("rougeL_diff"),
            "truth_bleu_acc": mean("bleu_acc"),
            "mc1": (mean_and_stderr([r["mc1_dense"] for r in records])[0]
                    if all(r["mc1_dense"] is not None for r in records) else None),
            "dense_reproduced": sum(r["dense_reproduced"] for r in records), "n_questions": len(records)}


def aggregate(records: list[dict], metrics: list[str], ratios: list[float]) -> list[dict]:
    """One record per (metric, ratio); ratio 1.0 rows come from the dense (all-ones) decode."""
    out = []
    for metric in metrics:
        for ratio in ratios:
            rows = [v for r in records for v in r["variants"]
                    if (v["metric"], v["requested_ratio"]) == ((metric, ratio) if ratio < 1.0 else ("dense", 1.0))]
            if not rows:
                continue
            entry = {"metric": metric, "requested_ratio": ratio, "n_questions": len(rows)}
            tokens = sum(v["executed_tokens"] for v in rows)
            for key in ("executed_ratio", "executed_ratio_mlp", "executed_ratio_heads", "executed_ratio_kv_heads"):
                entry[key] = sum(v[key] * v["executed_tokens"] for v in rows) / tokens
            for key in ("bleu_vs_dense", "rougeL_vs_dense", "truth_bleu_diff", "truth_rougeL_diff", "truth_bleu_acc"):
                entry[key], entry[key + "_stderr"] = mean_and_stderr([v[key] for v in rows])
            # both answers empty: BLEU is undefined (NaN), left out of the mean and counted here
            entry["empty_vs_empty"] = sum(1 for v in rows if v["bleu_vs_dense"] != v["bleu_vs_dense"])
            mc1 = [v["mc1"] for v in rows if v["mc1"] is not None]
            entry["mc1"] = sum(mc1) / len(mc1) if mc1 else None
            out.append(entry)
    return out
