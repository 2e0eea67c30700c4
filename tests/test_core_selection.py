"""select(): per_layer / global / threshold budgets, ratio validation, deterministic ties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from attrsparse import UnitScores, UserError, select
from attrsparse.selectors.topk import keep_count, top_k

T, L, N, H = 3, 4, 10, 4


def scores(seed=0, t=T, l=L, n=N, h=H) -> UnitScores:
    gen = torch.Generator().manual_seed(seed)
    return UnitScores(torch.randn(t, l, n, generator=gen), torch.randn(t, l, h, generator=gen))


def test_keep_count_is_exact_ceiling():
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert keep_count(0.7, 10) == 7  # 7.000000000000001
    assert keep_count(0.1, 30) == 3
    assert keep_count(0.1, 4) == 1 and keep_count(0.5, 9) == 5 and keep_count(1.0, 9) == 9
    assert keep_count(1e-6, 4) == 1  # at least one
    for total in range(1, 130):
        for k in range(1, 21):
            r = k / 20
            assert keep_count(r, total) == min(total, max(1, math.ceil(Fraction(str(r)) * total))), (r, total)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("n", [10, 48])
def test_per_layer_keeps_exactly_k_per_row(ratio, n):
    s = scores(n=n)
    masks = select(s, ratio)
    assert masks.mlp.dtype == torch.bool and masks.mlp.shape == s.mlp.shape
    assert masks.heads.shape == s.heads.shape
    assert (masks.mlp.sum(-1) == keep_count(ratio, n)).all()
    assert (masks.heads.sum(-1) == keep_count(ratio, H)).all()
    # the kept units are the top ones of their row
    for m, sc in ((masks.mlp, s.mlp), (masks.heads, s.heads)):
        kept_min = sc.masked_fill(~m, float("inf")).amin(-1)
        dropped_max = sc.masked_fill(m, float("-inf")).amax(-1)
        assert (kept_min > dropped_max).all()


def test_per_layer_float_edge_case_three_of_ten():
    masks = select(scores(n=10), 0.3)
    assert (masks.mlp.sum(-1) == 3).all()


def test_head_ratio_overrides_heads_only():
    masks = select(scores(), 0.5, head_ratio=0.25)
    assert (masks.mlp.sum(-1) == 5).all()
    assert (masks.heads.sum(-1) == 1).all()


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_global_keeps_total_per_token(ratio):
    s = scores()
    masks = select(s, ratio, scope="global")
    assert (masks.mlp.sum((-1, -2)) == keep_count(ratio, L * N)).all()
    assert (masks.heads.sum((-1, -2)) == keep_count(ratio, L * H)).all()
    for t in range(T):  # top units over all layers of the token
        flat, m = s.mlp[t].flatten(), masks.mlp[t].flatten()
        assert flat[m].min() > flat[~m].max() if (~m).any() else True


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_threshold_keeps_total_over_everything(ratio):
    s = scores()
    masks = select(s, ratio, scope="threshold")
    assert masks.mlp.sum() == keep_count(ratio, T * L * N)  # distinct scores: exact
    assert masks.heads.sum() == keep_count(ratio, T * L * H)
    if ratio < 1:
        assert s.mlp[masks.mlp].min() > s.mlp[~masks.mlp].max()


def test_threshold_keeps_ties_at_the_threshold():
    s = UnitScores(torch.zeros(T, L, N), torch.zeros(T, L, H))
    masks = select(s, 0.3, scope="threshold")
    assert masks.mlp.all() and masks.heads.all()


@pytest.mark.parametrize("policy", ["per_layer", "global", "threshold"])
def test_ratio_one_keeps_everything(policy):
    masks = select(scores(), 1.0, scope=policy)
    assert masks.mlp.all() and masks.heads.all()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "abc", None, float("nan")])
def test_invalid_ratios_raise_user_error(bad):
    with pytest.raises(UserError, match="ratio"):
        select(scores(), bad)


def test_invalid_head_ratio_and_policy():
    with pytest.raises(UserError, match="head_ratio"):
        select(scores(), 0.5, head_ratio=2)
    with pytest.raises(UserError, match="policy"):
        select(scores(), 0.5, scope="random")


def test_string_ratio_is_accepted():
    assert torch.equal(select(scores(), "0.5").mlp, select(scores(), 0.5).mlp)


def test_ties_break_by_lowest_index_deterministically():
    s = UnitScores(torch.zeros(T, L, N), torch.ones(T, L, H))
    for policy in ("per_layer", "global"):
        masks = select(s, 0.3, scope=policy)
        again = select(s, 0.3, scope=policy)
        assert torch.equal(masks.mlp, again.mlp) and torch.equal(masks.heads, again.heads)
    per_layer = select(s, 0.3)
    assert per_layer.mlp[..., :3].all() and not per_layer.mlp[..., 3:].any()
    assert per_layer.heads[..., :2].all() and not per_layer.heads[..., 2:].any()  # ceil(1.2) = 2
    glob = select(s, 0.3, scope="global")  # 12 of 40 per token: layers 0 (10) and 1 (first 2)
    assert glob.mlp[:, 0].all() and glob.mlp[:, 1, :2].all() and (glob.mlp[:, 1].sum(-1) == 2).all()
    assert not glob.mlp[:, 2:].any()
    # partial ties: among equal scores the lower index wins; higher scores always win
    row = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 3.0])
    assert top_k(row, 3).tolist() == [False, True, True, False, False, True]


def test_select_works_on_leading_batch_dims():
    s = UnitScores(torch.randn(2, T, L, N), torch.randn(2, T, L, H))
    masks = select(s, 0.5)
    assert masks.mlp.shape == (2, T, L, N)
    assert (masks.mlp.sum(-1) == 5).all() and (masks.heads.sum(-1) == 2).all()
