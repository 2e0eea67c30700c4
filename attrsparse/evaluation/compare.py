"""``attrsparse compare``: selectors x tasks x activation ratios x models, side by side.

One job = (model, task, selector, ratio); ``dense`` at ratio 1.0 is run once per (model, task)
and every other number is also given relative to it. Each finished job is written atomically to
``out/records/<model>/<task>/<selector>@<ratio>.json`` under a fingerprint of the settings, so an
interrupted run resumes where it stopped. The merged outputs are:

* ``compare.json`` (config, versions, records, frontier), ``compare.csv`` and ``compare.md``
  (one table per task: rows = selectors, columns = requested ratios, each cell ``value (executed
  ratio)``, plus the frontier: the lowest requested ratio at which a selector stays within
  tolerance of dense);
* ``<task>.png``/``.svg``: the task's metric against the executed parameter-weighted ratio, one
  panel per model.

Primary metrics and tolerances: multiple choice ``acc`` (MC2: ``mc2``) within 5% relative of
dense, perplexity ``ppl`` within 10% relative, generation ``bleu_vs_dense`` >= 95 (of 100).
Deployable policies (online, static, predictor) are calibrated once per (model, selector, ratio)
on calibration sequences disjoint from the evaluated data (:mod:`attrsparse.data.calibration`).
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core import __version__
from ..core.distributed import init_distributed, run_sharded
from ..core.errors import UserError, check_ratio
from ..core.fingerprint import model_key
from ..core.io import atomic_write_json, atomic_write_text, stable_hash
from ..core.models import load_model
from ..core.units import unit_map
from ..data.calibration import calibration_sequences
from ..data.tasks import get_task
from ..policies import make_policy
from ..policies.base import with_decision_cost
from ..selectors import get_metric, resolve_metric_names
from .compare_report import frontier, plot_model, plot_task, write_csv, write_markdown
from .evaluate import evaluate_task

PRIMARY = {"multiple_choice": "acc", "perplexity": "ppl", "generation": "bleu_vs_dense"}
RECORD_FIELDS = ("model", "task", "selector", "requested_ratio", "executed_ratio")  # a record lacking one is redone


@dataclass
class CompareConfig:
    models: list = field(default_factory=lambda: ["smollm2-135m"])
    tasks: list = field(default_factory=lambda: ["arc_easy", "sciq", "truthfulqa_mc1", "wikitext2"])
    # [] or ["dense"] = dense baselines only
    selectors: list = field(default_factory=lambda: ["corrected_gxo", "magnitude", "teal", "cats",
                                                     "wina", "wanda", "random"])
    ratios: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    limit: int | None = 100
    offset: int = 0
    max_tokens: int = 4096  # perplexity: tokens of the test split
    max_new_tokens: int = 32  # generation
    calib: str = "wikitext2"
    calib_sequences: int = 32
    calib_len: int = 128
    dtype: str = "float32"
    scope: str = "per_layer"  # selection scope of oracle selectors
    data: dict = field(default_factory=dict)  # {task: local path or hub name}; default: bundled
    device: str = "auto"  # cuda:<local rank> when CUDA is available, else cpu

    def validate(self) -> "CompareConfig":
        if not self.models or not self.tasks:
            raise UserError("compare needs at least one model and one task")
        for task in list(self.tasks) + list(self.data):
            get_task(task)  # unknown names fail here, with a hint
        self.selectors = [s for s in resolve_metric_names(
            [s for s in self.selectors if ":" not in s and s != "dense"])] + \
            [s for s in self.selectors if ":" in s]
        for s in self.selectors:
            if ":" not in s and get_metric(s).is_ig:
                raise UserError(f"{s}: IG needs 20+ passes per sequence; use it in `attrsparse sweep`")
        self.ratios = sorted({round(check_ratio(r), 6) for r in self.ratios if float(r) < 1.0})
        if self.selectors and not self.ratios:
            raise UserError("give at least one ratio below 1.0 (dense is always included)")
        return self

    def job_key(self, model: str, task: str) -> dict:
        keys = asdict(self)
        for k in ("models", "tasks", "selectors", "ratios", "device"):
            keys.pop(k)
        return {**keys, "model": model, "task": task, "attrsparse": __version__}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def primary_metric(task: str) -> str:
    spec = get_task(task)
    return "mc2" if spec.scoring == "mc2" else PRIMARY[spec.kind]


class Compare:
    """Runs a :class:`CompareConfig` into ``out`` (see the module docstring)."""

    def __init__(self, config: CompareConfig, out: Path, loaded: dict | None = None):
        self.config = config.validate()
        self.out = Path(out)
        self.loaded = loaded or {}  # {model spec: (model, tokenizer)} for tests and the API

    def jobs(self) -> list[tuple[str, str, str, float]]:
        cfg = self.config
        out = []
        for model in cfg.models:
            for task in cfg.tasks:
                out.append((model, task, "dense", 1.0))
                out += [(model, task, s, r) for s in cfg.selectors for r in cfg.ratios]
        return out

    def record_key(self, model: str, task: str, selector: str, ratio: float, weights: str) -> str:
        """``<model>/<task>/<selector>@<ratio>-<settings hash>``: the record's path under ``records/``."""
        key = stable_hash([self.config.job_key(model, task), weights])
        return f"{slug(model)}/{task}/{slug(selector)}@{ratio:g}-{key}"

    def record_path(self, model: str, task: str, selector: str, ratio: float, weights: str) -> Path:
        return self.out / "records" / f"{self.record_key(model, task, selector, ratio, weights)}.json"

    def context(self):
        """This process's place in the (torchrun) job; the models load on its device."""
        return init_distributed(self.config.device)

    def _load(self, spec: str):
        if spec not in self.loaded:
            device = self.context().device
            self.loaded = {spec: load_model(spec, dtype=self.config.dtype, device=device)}  # one model in memory
        return self.loaded[spec]

    def run_job(self, model_spec: str, task: str, selector: str, ratio: float, calib_cache: dict) -> dict:
        cfg = self.config
        model, tok = self._load(model_spec)
        policy = make_policy(selector, ratio, scope=cfg.scope)
        if policy.mode in ("online", "static", "predictor", "channel"):
            if model_spec not in calib_cache:
                calib_cache[model_spec] = calibration_sequences(tok, cfg.calib, cfg.calib_sequences, cfg.calib_len)
            policy.prepare(model, calib_cache[model_spec])
        result = evaluate_task(model, tok, task, policy, limit=cfg.limit, offset=cfg.offset,
                               data=cfg.data.get(task),
                               max_tokens=cfg.max_tokens, max_new_tokens=cfg.max_new_tokens)
        return {"model": model_spec, **result, "selector": selector, "requested_ratio": ratio}

    def run(self, progress: bool = True) -> dict | None:
        """Run (this rank's share of) the jobs; on rank 0 merge and write the outputs.

        Under ``torchrun`` the jobs are sharded round-robin over the ranks
        (:func:`attrsparse.core.distributed.run_sharded`); every rank writes its own records and rank 0
        merges them in job order, so the outputs equal a single-process run. Returns the results
        on rank 0, None on the other ranks.
        """
        calib_cache, weights = {}, {}

        def key(_, job):
            model_spec, task, selector, ratio = job
            if model_spec not in weights:
                model = self._load(model_spec)[0]
                weights[model_spec] = model_key(model)
            return self.record_key(model_spec, task, selector, ratio, weights[model_spec])

        records = run_sharded(self.jobs(), key, lambda _, job: self.run_job(*job, calib_cache),
                              self.out / "records", ctx=self.context(), progress=progress, desc="compare",
                              required=RECORD_FIELDS)
        return None if records is None else self.write([self.with_read_ratio(r) for r in records])

    def with_read_ratio(self, record: dict) -> dict:
        """Add ``executed_ratio_with_decision_cost`` to an online selector's record written before
        evaluations reported it (exact: it follows from the record's mean unit ratios)."""
        if "executed_ratio_with_decision_cost" in record or record["selector"] == "dense":
            return record

        units = unit_map(self._load(record["model"])[0])
        policy = make_policy(record["selector"], record["requested_ratio"], scope=self.config.scope)
        read = with_decision_cost(record, units, policy.prepaid_params(units))
        return record if read is None else {**record, "executed_ratio_with_decision_cost": read}

    def write(self, records: list[dict]) -> dict:
        import torch
        import transformers

        results = {"schema_version": 1, "config": asdict(self.config),
                   "versions": {"attrsparse": __version__, "torch": torch.__version__,
                                "transformers": transformers.__version__,
                                "python": platform.python_version()},
                   "records": [with_relative(r, records) for r in records]}
        results["frontier"] = frontier(results["records"], self.config)
        atomic_write_json(self.out / "compare.json", results)
        write_csv(results, self.out)
        write_markdown(results, self.out)
        for task in self.config.tasks:
            plot_task(results, task, self.out)
        for model in self.config.models:
            plot_model(results, model, self.out)
        return results


def with_relative(record: dict, records: list[dict]) -> dict:
    """Add ``value`` (the task's primary metric), ``dense_value`` and ``relative_to_dense``."""
    metric = primary_metric(record["task"])
    dense = next((r for r in records if r["model"] == record["model"] and r["task"] == record["task"]
                  and r["selector"] == "dense"), None)
    value = record.get(metric)
    dense_value = dense.get(metric) if dense else None
    rel = value / dense_value if value is not None and dense_value not in (None, 0) else None
    return {**record, "primary_metric": metric, "value": value, "dense_value": dense_value,
            "relative_to_dense": rel}


def command_line(argv: list[str]) -> str:
    return "attrsparse " + " ".join(argv)


def save_command(out: Path, argv: list[str]) -> None:
    atomic_write_text(Path(out) / "COMMAND.txt", command_line(argv) + "\n")
