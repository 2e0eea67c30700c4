"""``attrsparse bench --modes``: speed and quality of dense, static, predictor and oracle sparsity in one
run (without ``--modes``, ``attrsparse bench`` is the engine bench: :mod:`.engine_bench`).

For every (mode, ratio) one record (``DIR/records/<mode>@<ratio>-<settings hash>.json``, atomic,
so a re-run with the same settings resumes; ``--no-speed``/``--no-quality`` parts are added later)
holding:

* speed (not for the oracle, which needs the dense pass itself): greedy decoding with a KV cache
  through :func:`attrsparse.generate` on ``speed_prompts`` TruthfulQA prompts, ``new_tokens`` tokens
  each (no early stop), batch ``batch_size``. Dense and the mode are timed *alternately* in the
  same process (``repeats`` pairs after one warm-up pair) and ``speedup`` is the ratio of the
  medians of decode tokens/s, so machine noise hits both alike. ``prefill_s`` is the median time
  of the first forward call. ``peak_rss_mb`` is the process's peak resident memory during the
  mode's own runs (``VmHWM`` reset before them, Linux).
* ``ideal_speedup``: dense multiply-adds per decoded token over the mode's, counting everything a
  token costs: the maskable attention and MLP weights really multiplied (``computed_fraction`` of
  the runtime: sliced or gathered weights, key/value heads and dense fallbacks included), the
  always-dense rest (norms' and biases' are negligible, embeddings are a lookup), the LM head
  (``vocab x hidden``) and the predictor's own weights. ``ideal_speedup_executed`` uses the masks'
  parameter-weighted ratio instead (what the paper's accounting would promise).
  ``achieved_over_ideal = speedup / ideal_speedup``.
* quality on held-out data, all against dense in the same run: ``bleu_vs_dense`` (TruthfulQA
  generation, questions from 0, chat template), ``mc1`` (TruthfulQA MC1, ground truth),
  ``<task>_acc`` (ARC-Easy by default, ground truth) and ``wikitext2_ppl`` (test split).
  Calibration and predictor training use data disjoint from these (WikiText-2 valid).
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core import __version__
from ..core.errors import UserError, check_ratio
from ..core.io import atomic_write_json, read_json, stable_hash
from ..core.models import load_model
from ..core.units import unit_map
from ..data.calibration import calibration_sequences
from ..data.tasks import load_truthfulqa
from ..deploy.calibrate import run_calibration
from ..deploy.predictor import run_train_predictor
from ..deploy.runtime import generate
from ..policies import make_policy
from .bench_report import plot_bench, write_bench_markdown
from .evaluate import evaluate_task
from .tolerance import within

MODES = ("dense", "static", "predictor", "oracle")


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    ratios: list = field(default_factory=lambda: [0.3, 0.5, 0.7])
    modes: list = field(default_factory=lambda: list(MODES))
    static_from: str | None = None  # a calibrate directory; default: calibrate into DIR/static
    predictor_from: str | None = None  # a train-predictor directory; default: train into DIR/predictor
    allocation: str = "uniform"
    oracle_selector: str = "corrected_gxo"
    dtype: str = "float32"
    speed_prompts: int = 4
    new_tokens: int = 48
    repeats: int = 3
    batch_size: int = 1
    gen_questions: int = 20
    mc1_items: int = 100
    task: str = "arc_easy"
    task_items: int = 100
    ppl_tokens: int = 4096
    calib_sequences: int = 32
    predictor_sequences: int = 64
    quality: bool = True
    speed: bool = True

    def validate(self) -> "BenchConfig":
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise UserError(f"unknown bench mode(s) {', '.join(unknown)} (available: {', '.join(MODES)})")
        if not self.ratios:
            raise UserError("give at least one ratio")
        self.ratios = sorted({round(check_ratio(r), 6) for r in self.ratios})
        if self.repeats < 1 or self.new_tokens < 2 or self.speed_prompts < 1:
            raise UserError("--repeats >= 1, --new-tokens >= 2 and --speed-prompts >= 1 are needed")
        return self


def read_peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def macs_per_token(model, computed_fraction: float, predictor_params: int = 0) -> float:
    """Multiply-adds per decoded token: maskable weights x fraction + the rest + LM head + predictor."""
    units = unit_map(model)
    maskable = units.maskable_params
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    other = sum(p.numel() for p in model.parameters()) - maskable - embed - (0 if tied else head)
    return computed_fraction * maskable + max(0, other) + head + predictor_params


class Bench:
    """Runs a :class:`BenchConfig` into ``out`` (see the module docstring)."""

    def __init__(self, config: BenchConfig, out: Path, model=None, tokenizer=None):
        self.config = config.validate()
        self.out = Path(out)
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype)
        self.model, self.tok = model, tokenizer
        self._sources: dict[str, str] = {}
        self._prompts: list[str] | None = None

    # -- sparsity sources ----------------------------------------------------------------------
    def static_dir(self) -> str:
        cfg = self.config
        if cfg.static_from:
            return cfg.static_from

        path = self.out / "static"
        run_calibration(self.model, self.tok, path, ratios=cfg.ratios, allocation=cfg.allocation,
                        n_sequences=cfg.calib_sequences, spec=cfg.model)
        return str(path)

    def predictor_dir(self) -> str:
        cfg = self.config
        if cfg.predictor_from:
            return cfg.predictor_from

        path = self.out / "predictor"
        if not (path / "predictor.json").exists():
            run_train_predictor(self.model, self.tok, path, ratios=cfg.ratios,
                                n_seq=cfg.predictor_sequences, spec=cfg.model)
        return str(path)

    def selector(self, mode: str) -> str:
        """The :func:`make_policy` / :func:`generate` name of ``mode`` (calibrates or trains once)."""
        if mode == "dense":
            return "dense"
        if mode == "oracle":
            return self.config.oracle_selector
        if mode not in self._sources:
            self._sources[mode] = self.static_dir() if mode == "static" else self.predictor_dir()
        return f"{mode}:{self._sources[mode]}"

    # -- measurements --------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        """The speed prompts: the first ``speed_prompts`` TruthfulQA questions (read once)."""
        if self._prompts is None:
            self._prompts = [it.question for it in load_truthfulqa(limit=self.config.speed_prompts)]
        return self._prompts

    def _generate(self, sparsity, ratio):
        cfg = self.config
        return generate((self.model, self.tok), self.prompts(), sparsity, ratio=ratio,
                        max_new_tokens=cfg.new_tokens, batch_size=cfg.batch_size, stop_at_eos=False)

    def measure_speed(self, mode: str, ratio: float) -> dict:
        """Alternate dense and ``mode`` runs; medians and their ratio (see module docstring)."""
        cfg = self.config
        sparsity = None if mode == "dense" else self.selector(mode)
        dense_tps, mode_tps, prefill, results = [], [], [], []
        peak = 0.0
        for rep in range(cfg.repeats + 1):  # rep 0 is the warm-up pair
            d = self._generate(None, None)
            supported = reset_peak_rss()
            m = self._generate(sparsity, ratio)
            peak = max(peak, read_peak_rss_mb()) if supported or rep == cfg.repeats else peak
            if rep > 0:
                dense_tps.append(d.tokens_per_s)
                mode_tps.append(m.tokens_per_s)
                prefill.append(m.prefill_s / max(1, len(self.prompts()) // cfg.batch_size))
                results.append(m)
        last = results[-1]
        predictor_params = 0
        if mode == "predictor":
            predictor_params = make_policy(sparsity, ratio).chooser(self.model).cost_params()
        dense_macs = macs_per_token(self.model, 1.0)
        computed = last.computed_fraction if mode != "dense" else 1.0
        executed = last.executed.param if mode != "dense" else 1.0
        ideal = dense_macs / macs_per_token(self.model, computed, predictor_params)
        speedup = statistics.median(mode_tps) / statistics.median(dense_tps)
        return {"decode_tokens_per_s": statistics.median(mode_tps),
                "dense_decode_tokens_per_s": statistics.median(dense_tps),
                "speedup": speedup, "ideal_speedup": ideal,
                "ideal_speedup_executed": dense_macs / macs_per_token(self.model, executed, predictor_params),
                "achieved_over_ideal": speedup / ideal, "computed_fraction": computed,
                "predictor_params_per_token": predictor_params,
                "prefill_s": statistics.median(prefill), "peak_rss_mb": peak,
                "speed_executed_ratio": executed, "kernel": last.details.get("kernel_backend"),
                "threads": torch.get_num_threads()}

    def measure_quality(self, mode: str, ratio: float) -> dict:
        cfg = self.config
        policy = make_policy(self.selector(mode), ratio if mode != "dense" else 1.0)
        if policy.mode in ("online", "static", "predictor", "channel"):
            policy.prepare(self.model, calibration_sequences(self.tok, "wikitext2", cfg.calib_sequences, 128))
        runs = {"gen": evaluate_task(self.model, self.tok, "truthfulqa_gen", policy, limit=cfg.gen_questions),
                "mc1": evaluate_task(self.model, self.tok, "truthfulqa_mc1", policy, limit=cfg.mc1_items),
                "task": evaluate_task(self.model, self.tok, cfg.task, policy, limit=cfg.task_items),
                "ppl": evaluate_task(self.model, self.tok, "wikitext2", policy, max_tokens=cfg.ppl_tokens)}
        tokens = sum(r["executed_tokens"] for r in runs.values())
        return {"bleu_vs_dense": runs["gen"]["bleu_vs_dense"], "exact_vs_dense": runs["gen"]["exact_vs_dense"],
                "mc1": runs["mc1"]["acc"], "task_acc": runs["task"]["acc"],
                f"{cfg.task}_acc": runs["task"]["acc"], "wikitext2_ppl": runs["ppl"]["ppl"],
                "executed_ratio": sum(r["executed_ratio"] * r["executed_tokens"] for r in runs.values()) / tokens,
                "executed_ratio_by_task": {k: r["executed_ratio"] for k, r in runs.items()}}

    # -- the run -------------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, float]]:
        return [("dense", 1.0)] + [(m, r) for m in self.config.modes if m != "dense" for r in self.config.ratios]

    def run(self, progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        records = []
        bar = tqdm(self.jobs(), desc="bench", unit="job", disable=not progress)
        settings = asdict(cfg)
        for key in ("ratios", "modes", "quality", "speed"):
            settings.pop(key)
        fingerprint = stable_hash([settings, __version__])
        for mode, ratio in bar:
            path = self.out / "records" / f"{mode}@{ratio:g}-{fingerprint}.json"
            record = read_json(path, required=("mode", "requested_ratio"))  # else named and redone
            wanted = {"speed": cfg.speed and mode != "oracle", "quality": cfg.quality}
            if record is None or any(want and not record.get(f"has_{k}") for k, want in wanted.items()):
                bar.set_postfix_str(f"{mode}@{ratio:g}")
                record = {"mode": mode, "requested_ratio": ratio, **(record or {})}
                if wanted["speed"] and not record.get("has_speed"):
                    record.update(self.measure_speed(mode, ratio), has_speed=True)
                if wanted["quality"] and not record.get("has_quality"):
                    record.update(self.measure_quality(mode, ratio), has_quality=True)
                record.setdefault("executed_ratio", record.get("speed_executed_ratio"))
                atomic_write_json(path, record)
            records.append(record)
        return self.write(records)

    def write(self, records: list[dict]) -> dict:
        import transformers

        dense = next(r for r in records if r["mode"] == "dense")
        for r in records:
            for key in ("mc1", "task_acc", "wikitext2_ppl", "bleu_vs_dense"):
                if r.get(key) is not None and dense.get(key):
                    r[f"{key}_relative"] = r[key] / dense[key]
            if r["mode"] == "dense":
                r.setdefault("speedup", 1.0)
                r.setdefault("ideal_speedup", 1.0)
        for key in ("decode_tokens_per_s", "speedup", "ideal_speedup", "bleu_vs_dense", "mc1",
                    "wikitext2_ppl", "peak_rss_mb", "executed_ratio"):
            for r in records:
                r.setdefault(key, None)
        results = {"schema_version": 1, "config": asdict(self.config),
                   "versions": {"attrsparse": __version__, "torch": torch.__version__,
                                "transformers": transformers.__version__, "python": platform.python_version()},
                   "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                               "platform": platform.platform()},
                   "records": records, "frontier": quality_frontier(records)}
        atomic_write_json(self.out / "bench.json", results)

        plot_bench(results, self.out)
        write_bench_markdown(results, self.out)
        return results


def quality_frontier(records: list[dict]) -> dict:
    """Per mode: the lowest requested ratio from which on MC1 and the task stay within 5% and
    perplexity within 10% of dense (None if no ratio does)."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        if mode == "dense":
            continue
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["requested_ratio"])
        lowest = None
        for r in reversed(rows):
            ok = bool(within("mc1", r.get("mc1_relative")) and within("acc", r.get("task_acc_relative"))
                      and within("ppl", r.get("wikitext2_ppl_relative")))
            if not ok:
                break
            lowest = r
        out[mode] = None if lowest is None else {"requested_ratio": lowest["requested_ratio"],
                                                 "executed_ratio": lowest.get("executed_ratio")}
    return out
