"""Training the contextual predictors on the oracle's attribution labels.

**Labels** are the oracle ``budget_gxo`` masks (corrected GxO scored along the dense model's own
predictions, one trace, the head-favouring parameter budget of
:class:`~attrsparse.selectors.budget.BudgetRule`), i.e. exactly
``OraclePolicy(get_selector("budget_gxo"), ratio).row_masks(model, ids)``. The per-token corrected
GxO *ranks* are stored, so one training set gives the labels at every ratio. One predictor serves
all ratios: its target is the fraction of the training ratios at which the oracle keeps a unit
(soft binary cross-entropy), and at inference the units are ranked by logit.

Training is deterministic for a seed and thread count (Adam, fixed shuffles, deterministic
algorithms). The model is :class:`attrsparse.selectors.predictor.Predictor`; its file is written by
:func:`attrsparse.policies.predictor.save_predictor`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...core.errors import UserError, check_ratio
from ...core.trace import to_ids, trace_gradients
from ...core.units import UnitMap, UnitMasks, UnitScores, unit_map
from ...policies.predictor import FORMAT
from ...scores import get_score
from ...selectors.base import get_selector
from ...selectors.budget import BudgetRule
from ...selectors.predictor import LowRankClassifier, Predictor
from ...selectors.topk import unit_ranks

SCORE_METRIC = "corrected_gxo"  # the oracle's per-token score
LABEL_SELECTOR = "budget_gxo"  # the oracle's masks at a parameter-weighted ratio


# -- training data -----------------------------------------------------------------------------

@dataclass
class TrainingData:
    """Dense block inputs and oracle ranks of ``T`` calibration tokens, layer-major.

    ``attn_in``, ``mlp_in``: ``[L, T, d]`` float32; ``mlp_rank [L, T, N]``, ``head_rank [L, T, H]``
    int16 (0 = the unit with the highest corrected GxO at that token).
    """

    attn_in: torch.Tensor
    mlp_in: torch.Tensor
    mlp_rank: torch.Tensor
    head_rank: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.attn_in.shape[1]

    def labels(self, layer: int, ratio: float, units: UnitMap, head_power: float = 0.5) -> UnitMasks:
        """The oracle's masks ``mlp [T, N]``, ``heads [T, H]`` of ``layer`` at ``ratio``."""
        scores = UnitScores(-self.mlp_rank[layer].float(), -self.head_rank[layer].float())
        return BudgetRule(units, ratio, head_power).masks(scores)

    def tensors(self) -> dict[str, torch.Tensor]:
        return asdict(self)


@contextmanager
def _capture_block_inputs(units: UnitMap):
    """Record the input of every layer's first attention / MLP projection: lists of ``[.., d]``."""
    attn: list = [None] * units.num_layers
    mlp: list = [None] * units.num_layers
    handles = []
    for l in range(units.num_layers):
        handles.append(units.attn_in_modules[l].register_forward_pre_hook(
            lambda _m, args, l=l: attn.__setitem__(l, args[0].detach().float().clone())))
        handles.append(units.mlp_in_modules[l].register_forward_pre_hook(
            lambda _m, args, l=l: mlp.__setitem__(l, args[0].detach().float().clone())))
    try:
        yield attn, mlp
    finally:
        for h in handles:
            h.remove()


def collect_training_data(model: nn.Module, sequences: list[torch.Tensor], progress: bool = False) -> TrainingData:
    """Dense block inputs and oracle ranks for every position of ``sequences`` (1-D ids, >= 2 each).

    Per sequence, one trace (forward + backward) over ``ids`` attributes ``CE(logits_t, y_t)`` to
    every unit, ``y_t`` being the model's own prediction from that (dense) forward, as
    :class:`~attrsparse.policies.oracle.OraclePolicy` does; the same forward gives the block
    inputs. Corrected GxO scores are stored as ranks. The passes run on the model's device; the
    data is kept on the CPU.
    """
    units = unit_map(model)
    if units.mlp_size > torch.iinfo(torch.int16).max:
        raise UserError(f"{units.mlp_size} MLP units per layer: more than the int16 ranks can hold")
    metric = get_score(SCORE_METRIC)
    parts: dict[str, list] = {"attn_in": [], "mlp_in": [], "mlp_rank": [], "head_rank": []}
    bar = _progress(sequences, "oracle labels", progress)
    for ids in bar:
        ids = to_ids(ids)
        if ids.numel() < 2:
            raise UserError("each calibration sequence needs at least 2 tokens")
        with _capture_block_inputs(units) as (attn, mlp):  # target's last token is never an input
            trace = trace_gradients(model, ids[:1], torch.cat([ids[1:], ids[-1:]]), labels="argmax").row(0)
        scores = metric.from_trace(trace)  # [S, L, *]
        s = ids.numel()
        parts["attn_in"].append(torch.stack([a.reshape(s, -1) for a in attn]).cpu())
        parts["mlp_in"].append(torch.stack([m.reshape(s, -1) for m in mlp]).cpu())
        parts["mlp_rank"].append(unit_ranks(scores.mlp).to(torch.int16).transpose(0, 1).cpu())
        parts["head_rank"].append(unit_ranks(scores.heads).to(torch.int16).transpose(0, 1).cpu())
    return TrainingData(**{k: torch.cat(v, dim=1) for k, v in parts.items()})


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    return tqdm(items, desc=desc, leave=False)


# -- training ------------------------------------------------------------------------------------

@dataclass
class PredictorConfig:
    """Training settings (``rank``: MLP bottleneck, ``head_rank``: head bottleneck)."""

    rank: int = 64
    head_rank: int = 32
    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 256
    seed: int = 0

    def validate(self) -> "PredictorConfig":
        for name in ("rank", "head_rank", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr:g}")
        return self


@contextmanager
def _deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _fit(net: LowRankClassifier, x: torch.Tensor, y: torch.Tensor, config: PredictorConfig,
         gen: torch.Generator) -> float:
    """Soft-BCE training of ``net`` on ``x [T, d]`` -> targets ``y [T, C]`` in [0, 1]; inputs are
    standardised during training and the standardisation folded into ``net.down`` afterwards.
    Returns the last epoch's mean loss."""
    mu = x.mean(0, dtype=torch.float64).float()
    sd = x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    last = float("nan")
    for _ in range(config.epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = perm[start:start + config.batch_size]
            loss = F.binary_cross_entropy_with_logits(net(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        last = total / len(x)
    with torch.no_grad():  # net(h) == old_net((h - mu) / sd)
        w = net.down.weight / sd
        net.down.bias -= w @ mu
        net.down.weight.copy_(w)
    return last


def train_predictor(data: TrainingData, units: UnitMap, ratios, config: PredictorConfig | None = None,
                    meta: dict | None = None, progress: bool = False) -> Predictor:
    """Train one :class:`Predictor` on ``data`` whose soft targets average the oracle labels at
    ``ratios``. Bitwise reproducible for a fixed ``config.seed`` and thread count."""
    config = (config or PredictorConfig()).validate()
    ratios = sorted({check_ratio(r) for r in ratios})
    if not ratios:
        raise UserError("train-predictor needs at least one ratio")
    if data.tokens < 2:
        raise UserError(f"only {data.tokens} calibration tokens; need more to train a predictor")
    head_power = float(getattr(_label_selector(), "head_power", 0.5))
    losses = {"mlp": [], "heads": []}
    # training runs on the host, where the data is
    with torch.random.fork_rng(devices=[]), _deterministic(), torch.enable_grad(), torch.device("cpu"):
        torch.manual_seed(config.seed)
        predictor = Predictor.for_units(units, data.attn_in.shape[-1], config.rank, config.head_rank)
        gen = torch.Generator().manual_seed(config.seed)
        for layer in _progress(range(units.num_layers), "train predictor", progress):
            labels = [data.labels(layer, r, units, head_power) for r in ratios]
            y_heads = torch.stack([m.heads.float() for m in labels]).mean(0)
            y_mlp = torch.stack([m.mlp.float() for m in labels]).mean(0)
            losses["heads"].append(_fit(predictor.heads[layer], data.attn_in[layer], y_heads, config, gen))
            losses["mlp"].append(_fit(predictor.mlp[layer], data.mlp_in[layer], y_mlp, config, gen))
    predictor.requires_grad_(False).eval()
    predictor.meta = {**(meta or {}), "format": FORMAT, "units": units.structure(),
                      "hidden": int(data.attn_in.shape[-1]), "ratios": ratios, "head_power": head_power,
                      "label_selector": LABEL_SELECTOR, "score_metric": SCORE_METRIC,
                      "config": asdict(config), "training_tokens": data.tokens,
                      "final_loss": {k: sum(v) / len(v) for k, v in losses.items()}}
    return predictor


def _label_selector():
    return get_selector(LABEL_SELECTOR)
