"""The engine's input-sparse linear kernel (``eng_linear``: the site rule, then the kernel over
output slices) against torch on random shapes, all precisions, dense / all skipped / none
skipped; skipped weight rows poisoned (NaN or garbage) leave the output bit-identical; a
hand-computed rule with centring and compensation."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from attrsparse.deploy.engine.cdefs import EngSite, engine_library
from attrsparse.deploy.engine.fmt import DTYPE_CODE
from attrsparse.deploy.engine.pack import quantize

SHAPES = [(1, 1), (13, 37), (50, 129), (77, 1000), (64, 16), (300, 33), (576, 960)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_linear(stored, precision, scale, x, *, threshold=None, a=None, m=None, keep=None, bias=None,
               model_bias=None, threads=1):
    """y = the engine's linear of input-major ``stored`` [in, P] on x; returns (y, kept count)."""
    lib = engine_library()
    n_in, P = stored.shape
    keep_t = None if keep is None else torch.cat([keep.to(torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    site = EngSite(scale=_ptr(a), center=_ptr(m), keep=_ptr(keep_t), bias=_ptr(bias),
                   threshold=0.0 if threshold is None else float(threshold), rule=int(threshold is not None))
    y = torch.full((P,), math.nan)
    kept = lib.eng_linear(DTYPE_CODE[precision], stored.data_ptr(), _ptr(scale), n_in, P, x.data_ptr(),
                          ctypes.byref(site), _ptr(model_bias), y.data_ptr(), threads)
    return y, kept


def reference(deq, x, *, threshold=None, a=None, m=None, keep=None, bias=None, model_bias=None):
    v = (x - m if m is not None else x).double()
    kept = torch.ones_like(v, dtype=torch.bool)
    if threshold is not None:
        kept = (x - m if m is not None else x).abs() * (a if a is not None else 1.0) > threshold
    if keep is not None:
        kept &= keep
    y = (v * kept) @ deq.double()
    for b in (model_bias, bias):
        if b is not None:
            y = y + b.double()
    scale_of_terms = (v.abs() * kept) @ deq.abs().double()
    return y, kept, scale_of_terms


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_torch(shape, precision):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    n_in, P = shape
    w = torch.randn(n_in, P, generator=gen)
    stored, scale, deq = quantize(w, precision, dim=1)
    x = torch.randn(n_in, generator=gen)
    a, m = torch.rand(n_in, generator=gen) * 2, torch.randn(n_in, generator=gen) * 0.1
    bias, model_bias = torch.randn(P, generator=gen), torch.randn(P, generator=gen)
    keep = torch.rand(n_in, generator=gen) > 0.3
    cases = [{},  # dense: no rule at all
             {"threshold": -1.0, "a": a, "m": m, "bias": bias},  # rule keeps every channel
             {"threshold": 1e9, "a": a, "m": m, "bias": bias, "model_bias": model_bias},  # skips every channel
             {"threshold": 0.6, "a": a, "m": m, "bias": bias, "model_bias": model_bias},  # about half
             {"threshold": 0.3, "keep": keep}, {"keep": keep, "m": m}]
    for case in cases:
        y, kept = run_linear(stored, precision, scale, x, **case)
        want, mask, size = reference(deq, x, **case)
        assert kept == int(mask.sum())
        tol = 1e-6 * size + 1e-6 * want.abs() + 1e-30
        assert ((y.double() - want).abs() <= tol).all(), case
        for threads in (2, 3):
            assert torch.equal(run_linear(stored, precision, scale, x, threads=threads, **case)[0], y)
    # extremes really happened
    assert run_linear(stored, precision, scale, x, threshold=1e9, a=a)[1] == 0
    assert run_linear(stored, precision, scale, x, threshold=-1.0)[1] == n_in


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_skipped_rows_are_never_read(precision):
    """Poison the input-major rows of the skipped channels (NaN, or garbage for int8): the
    output is finite and bit-identical, so no skipped row is read."""
    gen = torch.Generator().manual_seed(7)
    n_in, P = 97, 203
    w = torch.randn(n_in, P, generator=gen)
    stored, scale, _ = quantize(w, precision, dim=1)
    x = torch.randn(n_in, generator=gen)
    m = torch.randn(n_in, generator=gen) * 0.1
    keep = torch.rand(n_in, generator=gen) > 0.25
    for case in ({"threshold": 0.7, "m": m}, {"keep": keep}, {"threshold": 0.2, "keep": keep}):
        clean, kept = run_linear(stored, precision, scale, x, **case)
        _, mask, _ = reference(w, x, **case)
        assert 0 < kept < n_in
        poisoned = stored.clone()
        if precision == "int8":
            poisoned[~mask] = torch.randint(-127, 128, (int((~mask).sum()), P), generator=gen, dtype=torch.int8)
        else:
            poisoned.view(torch.float32 if precision == "fp32" else torch.bfloat16)[~mask] = math.nan
        for threads in (1, 2):
            got, _ = run_linear(poisoned, precision, scale, x, threads=threads, **case)
            assert torch.isfinite(got).all() and torch.equal(got, clean)
    # the poison is visible when the rows are read
    got, _ = run_linear(poisoned, precision, scale, x)
    assert not torch.equal(got, clean)


def test_rule_by_hand():
    """x = [0.5, -2, 1, 3], m = [0, -1, 0, 1], a = [1, 2, 0.1, 1], t = 1:
    |x - m| * a = [0.5, 2, 0.1, 2] -> channels 1 and 3 kept with values -1 and 2;
    y = -1 * W^T[1] + 2 * W^T[3] + bias."""
    wt = torch.tensor([[100.0, 100.0, 100.0],
                       [1.0, 2.0, 3.0],
                       [100.0, 100.0, 100.0],
                       [-1.0, 0.5, 4.0]])
    x = torch.tensor([0.5, -2.0, 1.0, 3.0])
    kw = {"threshold": 1.0, "a": torch.tensor([1.0, 2.0, 0.1, 1.0]), "m": torch.tensor([0.0, -1.0, 0.0, 1.0]),
              "bias": torch.tensor([0.25, -0.5, 1.0])}
    y, kept = run_linear(wt, "fp32", None, x, **kw)
    assert kept == 2
    assert y.tolist() == [-3.0 + 0.25, -1.0 - 0.5, 5.0 + 1.0]
    # strictly greater: a channel exactly at the threshold is skipped
    y, kept = run_linear(wt, "fp32", None, x, threshold=2.0, a=kw["a"], m=kw["m"])
    assert kept == 0 and y.tolist() == [0.0, 0.0, 0.0]
    # int8: y_o = s_o * sum_j x_j q[j, o]
    q = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    s = torch.tensor([0.5, 2.0])
    y, _ = run_linear(q, "int8", s, torch.tensor([2.0, -1.0]))
    assert y.tolist() == [0.5 * (2 - 3), 2.0 * (-4 - 4)]
