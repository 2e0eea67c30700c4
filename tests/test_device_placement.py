"""Device placement: every tensor the engine makes lives where the model runs, never on a default.

No accelerator is needed. The check simulates one: the model stays on the CPU (the "device"),
while the default device of the run is ``meta``. A tensor that attrsparse creates without naming
its device then holds no data, and the run fails as soon as it is used (mixed devices, or a value
read back), which is what a CPU-created tensor does next to a CUDA model. Tokenizer outputs are
host tensors, as in real life. A command that passes must give exactly the results of a plain
CPU run. (What the simulation cannot see: a host tensor fed to the model without ``.to(device)``;
those paths go through :func:`attrsparse.core.architectures.model_device` and are read in review.)
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from attrsparse.core import distributed
from attrsparse.core.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"


def host_tokenizer(tok):
    """``tok`` whose encodings are made on the CPU whatever the default device."""
    cls = tok.__class__

    def on_cpu(name):
        method = getattr(cls, name)

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            with torch.device("cpu"):
                return method(self, *args, **kwargs)
        return call

    names = ("__call__", "apply_chat_template", "encode")
    tok.__class__ = type(f"Host{cls.__name__}", (cls,), {n: on_cpu(n) for n in names})
    return tok


@pytest.fixture
def meta_default():
    """Run the block with ``meta`` as the default device (restored afterwards)."""
    def run(fn, *args, **kwargs):
        torch.set_default_device("meta")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_device(None)
    return run


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items()
                if k not in ("timings", "timing_s", "created", "elapsed_s", "seconds", "written")}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def test_sweep_makes_every_tensor_on_the_model_device(tiny_truthfulqa_lm, tmp_path, monkeypatch, meta_default):
    from attrsparse.experiments import plots
    from attrsparse.experiments.sweep import Sweep, SweepConfig
    from attrsparse.selectors.base import get_selector, list_metrics

    monkeypatch.setattr(plots, "plot_curves", lambda *a, **k: None)
    metrics = [m for m in list_metrics() if m != "static_gxo"  # static_gxo: its own test below
               and get_selector(m).mode != "channel"]  # input-channel rules run on tasks, not in the sweep
    settings = dict(metrics=metrics, ratios=[0.5, 1.0], limit=2, template="paper", ig_steps=2,
                    max_new_tokens=4, data=str(FIXTURES / "truthfulqa_3.csv"))
    model, tok = tiny_truthfulqa_lm()
    tok = host_tokenizer(tok)
    simulated = meta_default(lambda: Sweep(SweepConfig(**settings, stream_scores=True), tmp_path / "sim",
                                           model=model, tokenizer=tok).run(progress=False))
    plain = Sweep(SweepConfig(**settings), tmp_path / "cpu", model=model, tokenizer=tok).run(progress=False)
    assert _strip_timings(simulated["aggregates"]) == _strip_timings(plain["aggregates"])
    assert _strip_timings(simulated["questions"]) == _strip_timings(plain["questions"])


@pytest.mark.parametrize("task", ["truthfulqa_mc1", "wikitext2", "truthfulqa_gen"])
def test_evaluation_makes_every_tensor_on_the_model_device(tiny_truthfulqa_lm, task, meta_default):
    from attrsparse.data.calibration import calibration_sequences
    from attrsparse.evaluation.evaluate import evaluate_task
    from attrsparse.policies import make_policy

    model, tok = tiny_truthfulqa_lm()
    tok = host_tokenizer(tok)
    data = str(FIXTURES / ("wikitext_tiny.txt" if task == "wikitext2" else "truthfulqa_3.csv"))
    selectors = ["dense", "corrected_gxo", "teal_units", "cats_units", "wina_units", "wanda", "random"]
    calib = calibration_sequences(tok, str(FIXTURES / "wikitext_tiny.txt"), 2, 8)

    def run_all():
        out = {}
        for name in selectors:
            policy = make_policy(name, 1.0 if name == "dense" else 0.5)
            if policy.mode in ("online", "static"):
                policy.prepare(model, calib)
            out[name] = evaluate_task(model, tok, task, policy, limit=2, data=data, max_tokens=48,
                                      max_new_tokens=4)
        return out

    simulated = meta_default(run_all)
    assert _strip_timings(simulated) == _strip_timings(run_all())


def test_calibration_makes_every_tensor_on_the_model_device(tiny_truthfulqa_lm, tmp_path, meta_default):
    from attrsparse.core.io import load_tensors
    from attrsparse.deploy.calibrate import run_calibration

    model, tok = tiny_truthfulqa_lm()
    tok = host_tokenizer(tok)
    settings = dict(ratios=[0.5, 0.7], metric="corrected_gxo", allocation="greedy",
                    calib=str(FIXTURES / "wikitext_tiny.txt"), n_sequences=3, seq_len=6, search_sequences=2)
    simulated = meta_default(run_calibration, model, tok, tmp_path / "sim", **settings)
    plain = run_calibration(model, tok, tmp_path / "cpu", **settings)
    assert _strip_timings(simulated["ratios"]) == _strip_timings(plain["ratios"])
    a, b = load_tensors(tmp_path / "sim" / "static.safetensors"), load_tensors(tmp_path / "cpu" / "static.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("choice, local_rank, gpus, expected", [
    ("auto", 0, 0, "cpu"), ("cpu", 1, 2, "cpu"), ("auto", 1, 2, "cuda:1"), ("cuda", 3, 2, "cuda:1"),
    ("auto", 0, 1, "cuda:0"), ("cuda:1", 0, 2, "cuda:1")])
def test_device_per_local_rank(monkeypatch, choice, local_rank, gpus, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert distributed.resolve_device(choice) == torch.device(expected)


@pytest.mark.parametrize("choice", ["cuda", "cuda:0", "tpu", "gpu0"])
def test_unavailable_or_unknown_device_is_a_user_error(monkeypatch, choice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device"):
        distributed.resolve_device(choice)


def test_dependency_analysis_makes_every_tensor_on_the_model_device(tiny_truthfulqa_lm, tmp_path, monkeypatch,
                                                                     meta_default):
    from attrsparse.experiments import plots
    from attrsparse.experiments.dependency import DependencyConfig, run_dependency

    monkeypatch.setattr(plots, "plot_dependency", lambda *a, **k: None)
    model, tok = tiny_truthfulqa_lm()
    tok = host_tokenizer(tok)
    cfg = dict(model="tiny", data=str(FIXTURES / "truthfulqa_3.csv"), limit=2, ratios=[0.3, 1.0], template="paper",
               max_new_tokens=4, ablations=5, chunk=2, max_samples=15)
    simulated = meta_default(run_dependency, DependencyConfig(**cfg), tmp_path / "sim", model=model,
                             tokenizer=tok, progress=False)
    plain = run_dependency(DependencyConfig(**cfg), tmp_path / "cpu", model=model, tokenizer=tok, progress=False)
    assert _strip_timings(simulated) == _strip_timings(plain)


def test_predictor_training_and_policy_make_every_tensor_on_the_model_device(tiny_truthfulqa_lm, meta_default):
    from attrsparse.core.units import unit_map
    from attrsparse.deploy.predictor import PredictorConfig, collect_training_data, train_predictor
    from attrsparse.evaluation.evaluate import evaluate_task
    from attrsparse.policies.predictor import PredictorPolicy

    model, tok = tiny_truthfulqa_lm()
    tok = host_tokenizer(tok)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 40, (12,), generator=gen) for _ in range(4)]
    config = PredictorConfig(rank=8, head_rank=4, epochs=3, lr=1e-2, batch_size=16, seed=0)

    def train():
        return train_predictor(collect_training_data(model, seqs), unit_map(model), [0.5], config)

    simulated, plain = meta_default(train), train()
    assert all(torch.equal(a, b) for a, b in zip(simulated.state_dict().values(), plain.state_dict().values()))

    def evaluate():
        policy = PredictorPolicy("predictor", 0.5, plain)
        policy.prepare(model)
        return {task: evaluate_task(model, tok, task, policy, limit=2, max_tokens=48, data=str(
            FIXTURES / ("wikitext_tiny.txt" if task == "wikitext2" else "truthfulqa_3.csv")))
            for task in ("truthfulqa_mc1", "wikitext2")}

    assert _strip_timings(meta_default(evaluate)) == _strip_timings(evaluate())
