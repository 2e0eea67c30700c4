"""The engine's input-sparse linear kernel (``eng_linear``: the site rule, then the kernel over
output slices) against torch on random shapes, all precisions, dense / all skipped / none
skipped; skipped weight rows poisoned (NaN or garbage) leave the output bit-identical; a
hand-computed rule with centring and compensation; per-projection rules (each column range of a
fused matrix with its own threshold and scale) against torch, with the rows a projection skips
poisoned in its own columns only, and the weights read counted per projection."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from attrsparse.deploy.engine.cdefs import EngSite, engine_library
from attrsparse.deploy.engine.fmt import DTYPE_CODE
from attrsparse.deploy.engine.pack import quantize

SHAPES = [(1, 1), (13, 37), (50, 129), (77, 1000), (64, 16), (300, 33), (576, 960),
          (21, 16411)]  # rows longer than 4 column tiles: the dense rows go eight per pass too (a head)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_linear(stored, precision, scale, x, *, threshold=None, a=None, m=None, keep=None, bias=None,
               model_bias=None, threads=1):
    """y = the engine's linear of input-major ``stored`` [in, P] on x (a shared rule); returns
    (y, kept count)."""
    lib = engine_library()
    n_in, P = stored.shape
    keep_t = None if keep is None else torch.cat([keep.to(torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    site = EngSite(scale=_ptr(a), center=_ptr(m), keep=_ptr(keep_t), bias=_ptr(bias),
                   threshold=0.0 if threshold is None else float(threshold), rule=int(threshold is not None))
    y = torch.full((P,), math.nan)
    kept = (ctypes.c_int64 * 1)()
    reads = lib.eng_linear(DTYPE_CODE[precision], stored.data_ptr(), _ptr(scale), n_in, P, x.data_ptr(),
                           ctypes.byref(site), 1, None, _ptr(model_bias), y.data_ptr(), kept, threads)
    assert reads == kept[0] * P
    return y, kept[0]


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


def run_proj(stored, precision, scale, x, cols, tests, *, m=None, keep=None, bias=None, threads=1):
    """The engine's linear under a per-projection rule (rule 2): projection p = columns
    [cols[p], cols[p+1]) tests ``tests[p] = (threshold or None, scale or None)``. Returns
    (y, kept per projection, weights read)."""
    lib = engine_library()
    n_in, P = stored.shape
    keep_t = None if keep is None else torch.cat([keep.to(torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    site = EngSite(center=_ptr(m), keep=_ptr(keep_t), bias=_ptr(bias), rule=2)
    for p, (t, a) in enumerate(tests):
        site.pscale[p] = _ptr(a)
        site.pthreshold[p] = 0.0 if t is None else float(t)
        site.prule[p] = int(t is not None)
    bounds = (ctypes.c_int64 * len(cols))(*cols)
    kept = (ctypes.c_int64 * (len(cols) - 1))()
    y = torch.full((P,), math.nan)
    reads = lib.eng_linear(DTYPE_CODE[precision], stored.data_ptr(), _ptr(scale), n_in, P, x.data_ptr(),
                           ctypes.byref(site), len(cols) - 1, bounds, None, y.data_ptr(), kept, threads)
    return y, list(kept), reads


def proj_reference(deq, x, cols, tests, *, m=None, keep=None, bias=None):
    """Per projection: its kept mask and its columns of y (double), as in engine.h."""
    v = (x - m if m is not None else x)
    masks, y, size = [], torch.zeros(deq.shape[1], dtype=torch.float64), torch.zeros(deq.shape[1], dtype=torch.float64)
    for p, (t, a) in enumerate(tests):
        kept = torch.ones_like(v, dtype=torch.bool) if t is None else v.abs() * (a if a is not None else 1.0) > t
        if keep is not None:
            kept &= keep
        c0, c1 = cols[p], cols[p + 1]
        y[c0:c1] = (v.double() * kept) @ deq[:, c0:c1].double()
        size[c0:c1] = (v.double().abs() * kept) @ deq[:, c0:c1].abs().double()
        masks.append(kept)
    if bias is not None:
        y = y + bias.double()
    return y, masks, size


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("cols", [[0, 64, 96, 128], [0, 100, 133, 166], [0, 37, 37, 50], [0, 1000, 2000],
                                  [0, 5, 9], [0, 0, 33]])
def test_per_projection_rule_matches_torch(precision, cols):
    """Each projection (a column range of the fused input-major matrix: q | k | v or gate | up)
    keeps the channels of its own test; the output, the kept counts, the weights read (kept_p x
    columns_p) and 1 / 2 / 3 threads (bit-identical) are checked; then the rows a projection skips
    are poisoned in its own columns only, and the output stays bit-identical."""
    gen = torch.Generator().manual_seed(sum(cols))
    n_in, P = 83, cols[-1]
    w = torch.randn(n_in, P, generator=gen)
    stored, scale, deq = quantize(w, precision, dim=1)
    x = torch.randn(n_in, generator=gen)
    m, bias = torch.randn(n_in, generator=gen) * 0.1, torch.randn(P, generator=gen)
    keep = torch.rand(n_in, generator=gen) > 0.2
    np_ = len(cols) - 1
    scales = [torch.rand(n_in, generator=gen) * 2 for _ in range(np_)]
    tests = [(0.2 + 0.4 * p, scales[p]) for p in range(np_)]  # different thresholds and scales
    cases = [{"tests": tests, "m": m, "bias": bias},
             {"tests": tests, "keep": keep},
             {"tests": [(0.5, None)] + [(None, None)] * (np_ - 1)},  # projection 0 tests, the rest dense
             {"tests": [(None, None)] + tests[1:], "keep": keep, "m": m}]
    for case in cases:
        tests_ = case.pop("tests")
        y, kept, reads = run_proj(stored, precision, scale, x, cols, tests_, **case)
        want, masks, size = proj_reference(deq, x, cols, tests_, **case)
        assert kept == [int(k.sum()) for k in masks]
        assert reads == sum(k * (cols[p + 1] - cols[p]) for p, k in enumerate(kept))
        tol = 1e-6 * size + 1e-6 * want.abs() + 1e-30
        assert ((y.double() - want).abs() <= tol).all(), case
        for threads in (2, 3):
            assert torch.equal(run_proj(stored, precision, scale, x, cols, tests_, threads=threads, **case)[0], y)
        # poison what each projection skips, in its own columns only
        poisoned = stored.clone()
        for p, k in enumerate(masks):
            rows, c0, c1 = (~k).nonzero().flatten(), cols[p], cols[p + 1]
            if precision == "int8":
                poisoned[rows, c0:c1] = torch.randint(-127, 128, (len(rows), c1 - c0), generator=gen, dtype=torch.int8)
            else:
                view = poisoned.view(torch.float32 if precision == "fp32" else torch.bfloat16)
                view[rows, c0:c1] = math.nan
        for threads in (1, 2):
            got = run_proj(poisoned, precision, scale, x, cols, tests_, threads=threads, **case)[0]
            assert torch.equal(got, y)
        if any(bool((~k).any()) and cols[p + 1] > cols[p] for p, k in enumerate(masks)):  # visible when read
            assert not torch.equal(run_linear(poisoned, precision, scale, x)[0], run_linear(stored, precision, scale, x)[0])
        case["tests"] = tests_
    # the decisions really differ between projections
    y, kept, _ = run_proj(stored, precision, scale, x, cols, tests, m=m)
    assert len(set(kept)) > 1 or P == 0
    # equal tests on every projection: the same outputs as the shared rule (one decision)
    same = [(0.6, scales[0])] * np_
    y_proj, kept_proj, reads_proj = run_proj(stored, precision, scale, x, cols, same, m=m, bias=bias)
    y_shared, kept_shared = run_linear(stored, precision, scale, x, threshold=0.6, a=scales[0], m=m, bias=bias)
    assert torch.equal(y_proj, y_shared) and kept_proj == [kept_shared] * np_ and reads_proj == kept_shared * P
