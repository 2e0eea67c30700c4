"""Contextual predictors (Deja Vu / ShadowLLM style) trained on the oracle's attribution labels.

Per layer, two small classifiers read the hidden state entering a block, *after* the block's
norm, i.e. the input of its first projection (``q_proj`` / ``c_attn`` / ``qkv_proj`` for
attention, ``gate_proj`` / ``fc1`` / ``c_fc`` / ``gate_up_proj`` for the MLP; the same tensor the
runtime's :class:`~attrsparse.deploy.runtime.UnitChooser` receives), so the choice exists before
the work it skips:

* heads:  ``h [.., d] -> Linear(d, r_h) -> ReLU -> Linear(r_h, H)`` logits;
* MLP:    ``h [.., d] -> Linear(d, r) -> ReLU -> Linear(r, N)`` logits.

**Labels** are the oracle ``budget_gxo`` masks (corrected GxO scored along the dense model's own
predictions, one trace, the head-favouring parameter budget of :func:`budget_masks`), i.e. exactly
``OraclePolicy(get_metric("budget_gxo"), ratio).row_masks(model, ids)``. The per-token corrected
GxO *ranks* are stored, so one training set gives the labels at every ratio. One predictor serves
all ratios: its target is the fraction of the training ratios at which the oracle keeps a unit
(soft binary cross-entropy), and at inference the units are ranked by logit.

**Allocation** (:class:`BudgetRule`, the labels' rule): per token and layer keep the top
``round(H * ratio ** 0.5)`` heads by logit, then the top ``k`` MLP units that fill the rest of the
layer's parameter budget given the query and key/value heads kept, so the executed
parameter-weighted ratio is the requested one up to half an MLP unit per layer.

**Cost**: multiply-adds per token = the predictor's weights (``d*r + r*N`` and ``d*r_h + r_h*H``
per layer) against the dense block's projection weights (attention scores excluded, which makes
the ratio conservative); :meth:`Predictor.cost`.

Training is deterministic for a seed and thread count (Adam, fixed shuffles, deterministic
algorithms). Files: ``DIR/predictor.safetensors`` (weights, with the JSON metadata in its header:
model fingerprint, units, ranks, training ratios, label metric, calibration source).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.architectures import UnitMap, model_device, unit_map
from ..core.errors import UserError, check_ratio
from ..core.hooks import UnitHooks
from ..core.io import atomic_write_bytes
from ..policies.base import PolicyOutput, SparsityPolicy, model_logits
from ..core.units import UnitMasks, UnitScores, layer_param_fractions
from .runtime import NativeChoice, UnitChooser

WEIGHTS_NAME = "predictor.safetensors"
REPORT_NAME = "predictor.json"
FORMAT = 1
SCORE_METRIC = "corrected_gxo"  # the oracle's per-token score
LABEL_SELECTOR = "budget_gxo"  # the oracle's masks at a parameter-weighted ratio
_META_KEY = "attrsparse_predictor"


# -- allocation ------------------------------------------------------------------------------------

def unit_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every unit in its row of ``scores [..., C]`` (0 = highest; ties -> lower index)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def _top_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Keep the top ``k`` (per row, broadcast) of ``scores [..., C]``; ties -> lower index."""
    return unit_ranks(scores) < torch.as_tensor(k, device=scores.device).unsqueeze(-1)


@dataclass
class BudgetRule:
    """The per-token, per-layer allocation of :func:`attrsparse.metrics.progressive.budget_masks`,
    split in two steps so heads are chosen before attention and the MLP before the MLP runs."""

    units: UnitMap
    ratio: float
    head_power: float = 0.5

    @property
    def head_keep(self) -> int:
        h = self.units.num_heads
        return max(1, min(h, round(h * self.ratio ** self.head_power)))

    def heads(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [..., H]`` -> keep ``[..., H]`` (bool)."""
        return _top_mask(logits, self.head_keep)

    def mlp_count(self, heads: torch.Tensor | None, leading: tuple, device=None) -> torch.Tensor:
        """MLP units per row ``[...]`` that fill the layer budget given ``heads [..., H]`` (None:
        the rule's head count, all key/value heads, on ``device``)."""
        u = self.units
        if heads is None:
            return self._mlp_units(torch.full(leading, self.head_keep, device=device),
                                   torch.full(leading, u.num_kv_heads, device=device))
        groups = heads.reshape(*heads.shape[:-1], u.num_kv_heads, u.group_size).any(-1)
        return self._mlp_units(heads.sum(-1), groups.sum(-1))

    def _mlp_units(self, n_heads: torch.Tensor, n_groups: torch.Tensor) -> torch.Tensor:
        """MLP units that fill the layer budget with ``n_heads`` query heads in ``n_groups``
        key/value groups (int64 tensors, broadcast)."""
        u = self.units
        attn = n_heads * u.head_params + n_groups * u.kv_group_params + u.attn_fixed_params
        room = self.ratio * (u.attn_params_per_layer + u.mlp_params_per_layer) - attn - u.mlp_fixed_params
        return torch.clamp(torch.round(room / u.mlp_unit_params), 1, u.mlp_size).long()

    def mlp_budget_table(self) -> torch.Tensor:
        """:meth:`mlp_count` for every head outcome: ``[(H + 1) * (G + 1)]``, entry
        ``nh * (G + 1) + ng`` for ``nh`` heads in ``ng`` key/value groups (the C library's table)."""
        u = self.units
        return self._mlp_units(torch.arange(u.num_heads + 1, device="cpu").unsqueeze(1),
                               torch.arange(u.num_kv_heads + 1, device="cpu")).reshape(-1)

    def mlp(self, logits: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``logits [..., N]`` -> keep ``[..., N]`` (bool) with :meth:`mlp_count` units per row."""
        return _top_mask(logits, self.mlp_count(heads, tuple(logits.shape[:-1]), logits.device))

    def masks(self, scores: UnitScores) -> UnitMasks:
        """Both steps on scores ``[..., L, *]`` (equals ``budget_masks``; tested)."""
        heads = self.heads(scores.heads)
        return UnitMasks(self.mlp(scores.mlp, heads), heads)


# -- the predictor -------------------------------------------------------------------------------

class LowRankClassifier(nn.Module):
    """``h [.., d] -> Linear(d, r) -> ReLU -> Linear(r, C)``: logits ``[.., C]``."""

    def __init__(self, hidden: int, rank: int, classes: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(h)))

    def macs(self) -> int:
        return self.down.weight.numel() + self.up.weight.numel()


class Predictor(nn.Module):
    """Per-layer head and MLP classifiers of one model (see the module docstring).

    ``meta`` holds what the file records (units, ranks, training ratios, calibration, fingerprint).
    """

    def __init__(self, hidden: int, num_layers: int, mlp_size: int, num_heads: int, rank: int = 64,
                 head_rank: int = 32, meta: dict | None = None):
        super().__init__()
        self.hidden, self.num_layers, self.mlp_size, self.num_heads = hidden, num_layers, mlp_size, num_heads
        self.rank, self.head_rank = rank, head_rank
        self.mlp = nn.ModuleList(LowRankClassifier(hidden, rank, mlp_size) for _ in range(num_layers))
        self.heads = nn.ModuleList(LowRankClassifier(hidden, head_rank, num_heads) for _ in range(num_layers))
        self.meta = dict(meta or {})

    @classmethod
    def for_units(cls, units: UnitMap, hidden: int, rank: int = 64, head_rank: int = 32, meta=None) -> "Predictor":
        """An untrained predictor for ``units`` (``meta`` records the units, checked on use)."""
        return cls(hidden, units.num_layers, units.mlp_size, units.num_heads, rank, head_rank,
                   {"units": _units_dict(units), **(meta or {})})

    def mlp_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` (input of the MLP's first projection) -> ``[..., N]``."""
        return self.mlp[layer](hidden.float())

    def head_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` (input of the attention's first projection) -> ``[..., H]``."""
        return self.heads[layer](hidden.float())

    def cost(self, units: UnitMap) -> dict:
        """Multiply-adds per token of the predictors against the dense projections they gate."""
        mlp = self.mlp[0].macs()
        heads = self.heads[0].macs()
        dense_mlp = units.mlp_unit_params * units.mlp_size
        dense_attn = units.head_params * units.num_heads + units.kv_group_params * units.num_kv_heads
        return {"mlp_predictor_macs": mlp, "head_predictor_macs": heads,
                "dense_mlp_macs": dense_mlp, "dense_attention_macs": dense_attn,
                "mlp_cost_ratio": mlp / dense_mlp, "head_cost_ratio": heads / dense_attn,
                "layer_cost_ratio": (mlp + heads) / (dense_mlp + dense_attn),
                "note": "per token and layer; dense attention counts its projections only"}

    def chooser(self, ratio: float, units: UnitMap, layer_ratios=None,
                head_power: float | None = None) -> "PredictorChooser":
        """The chooser at ``ratio`` in every layer, or at ``layer_ratios`` (one per layer, e.g. a
        non-uniform allocation from :func:`layer_ratios_from_masks`; ``ratio`` is then unused).
        Heads keep ``ratio ** head_power`` of a layer's heads (default: the labels' exponent)."""
        head_power = self.meta.get("head_power", 0.5) if head_power is None else float(head_power)
        if head_power < 0:
            raise UserError(f"head power must be >= 0, got {head_power:g}")
        if layer_ratios is None:
            return PredictorChooser(self, BudgetRule(units, check_ratio(ratio), head_power))
        layer_ratios = [check_ratio(r) for r in layer_ratios]
        if len(layer_ratios) != units.num_layers:
            raise UserError(f"{len(layer_ratios)} layer ratios for a model of {units.num_layers} layers")
        return PredictorChooser(self, [BudgetRule(units, r, head_power) for r in layer_ratios])


def layer_ratios_from_masks(masks: UnitMasks, units: UnitMap) -> list[float]:
    """Each layer's parameter-weighted fraction kept by static ``masks`` (``mlp [L, N]``,
    ``heads [L, H]``): a calibrated, possibly non-uniform allocation as per-layer predictor budgets
    whose mean is the masks' executed ratio."""
    frac = layer_param_fractions(masks.mlp.unsqueeze(0), masks.heads.unsqueeze(0), units)[0]
    return [min(1.0, float(f)) for f in frac]


class PredictorChooser(UnitChooser):
    """The runtime's per-layer unit chooser: heads first, then the MLP in the rest of the budget.

    The heads chosen in a layer are remembered until that layer's MLP call, whose token rows they
    size (a call whose rows do not match uses the rule's head count for the budget).
    """

    def __init__(self, predictor: Predictor, rule: BudgetRule | list[BudgetRule]):
        self.predictor = predictor
        self.rules = list(rule) if isinstance(rule, (list, tuple)) else [rule] * predictor.num_layers
        self._heads: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def choose_heads(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        keep = self.rules[layer].heads(self.predictor.head_logits(layer, hidden))
        self._heads[layer] = keep
        return keep

    @torch.no_grad()
    def choose_mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.predictor.mlp_logits(layer, hidden)
        heads = self._heads.pop(layer, None)
        if heads is not None and heads.shape[:-1].numel() == logits.shape[:-1].numel():
            heads = heads.reshape(*logits.shape[:-1], heads.shape[-1])
        else:
            heads = None
        return self.rules[layer].mlp(logits, heads)

    def native(self, kind: str, layer: int) -> NativeChoice:
        """The same choice for one token row, made by the C library (the budget as a table)."""
        net = (self.predictor.mlp if kind == "mlp" else self.predictor.heads)[layer]
        rule = self.rules[layer]
        budget = rule.mlp_budget_table() if kind == "mlp" else torch.tensor([rule.head_keep])
        return NativeChoice(w1=net.down.weight, b1=net.down.bias, w2=net.up.weight, b2=net.up.bias,
                            budget=budget, by_heads=kind == "mlp")

    def cost_params(self) -> int:
        return sum(m.macs() for m in self.predictor.mlp) + sum(m.macs() for m in self.predictor.heads)


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
    from ..scores import get_metric
    from ..core.trace import to_ids, trace_gradients

    units = unit_map(model)
    if units.mlp_size > torch.iinfo(torch.int16).max:
        raise UserError(f"{units.mlp_size} MLP units per layer: more than the int16 ranks can hold")
    metric = get_metric(SCORE_METRIC)
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
    from tqdm import tqdm

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
    predictor.meta = {**(meta or {}), "format": FORMAT, "units": _units_dict(units),
                      "hidden": int(data.attn_in.shape[-1]), "ratios": ratios, "head_power": head_power,
                      "label_selector": LABEL_SELECTOR, "score_metric": SCORE_METRIC,
                      "config": asdict(config), "training_tokens": data.tokens,
                      "final_loss": {k: sum(v) / len(v) for k, v in losses.items()}}
    return predictor


def _label_selector():
    from ..scores import get_metric

    return get_metric(LABEL_SELECTOR)


# -- files ----------------------------------------------------------------------------------------

_UNIT_KEYS = ("model_type", "num_layers", "mlp_size", "num_heads", "num_kv_heads", "head_dim")  # checked on load


def _units_dict(units: UnitMap) -> dict:
    return {k: getattr(units, k) for k in _UNIT_KEYS}


def save_predictor(predictor: Predictor, out: str | Path) -> Path:
    """Write ``out/predictor.safetensors`` atomically (weights + JSON metadata in the header)."""
    from safetensors.torch import save

    meta = {**predictor.meta, "rank": predictor.rank, "head_rank": predictor.head_rank}
    tensors = {k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()}
    path = Path(out) / WEIGHTS_NAME
    atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)}))
    return path


def _weights_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"no predictor at {path}; train one with `attrsparse train-predictor --out DIR`")
    return path


def load_predictor(path: str | Path) -> Predictor:
    """Read a predictor written by :func:`save_predictor` (a directory or the .safetensors file);
    a missing, corrupt or inconsistent file is a :class:`UserError`."""
    from safetensors import safe_open

    file = _weights_path(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise UserError(f"{file} is not a readable predictor file ({type(exc).__name__})") from None
    try:
        meta = json.loads(header[_META_KEY])
        u = meta["units"]
        hidden, rank, head_rank = int(meta["hidden"]), int(meta["rank"]), int(meta["head_rank"])
        layers, mlp_size, heads = int(u["num_layers"]), int(u["mlp_size"]), int(u["num_heads"])
        [check_ratio(r) for r in meta["ratios"]]
    except (KeyError, TypeError, ValueError, UserError):
        raise UserError(f"{file} lacks valid predictor metadata; retrain with `attrsparse train-predictor`") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{file} has predictor format {meta.get('format')}, this attrsparse reads {FORMAT}")
    predictor = Predictor(hidden, layers, mlp_size, heads, rank, head_rank, meta)
    expected = predictor.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing or set(tensors) - set(expected):
        raise UserError(f"{file} does not match its metadata ({len(missing)} tensors missing, "
                        f"{len(set(tensors) - set(expected))} unexpected)")
    for name, value in tensors.items():
        if value.shape != expected[name].shape or not value.is_floating_point():
            raise UserError(f"{file}: '{name}' has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
        if not torch.isfinite(value).all():
            raise UserError(f"{file}: '{name}' holds non-finite values")
    predictor.load_state_dict({k: v.float() for k, v in tensors.items()})
    return predictor.requires_grad_(False).eval()


def check_model(predictor: Predictor, model: nn.Module, name: str = "predictor") -> None:
    """UserError unless ``model`` has the units and weights the predictor was trained on."""
    from .calibrate import check_same_model

    check_same_model(model, predictor.meta.get("units", {}), predictor.meta.get("model", {}), name, "trained")


# -- policy for masked evaluation ---------------------------------------------------------------

class PredictorPolicy(SparsityPolicy):
    """Masks predicted in every layer from the block inputs of the running (sparse) pass.

    Forward pre-hooks on each layer's first attention / MLP projection ask the
    :class:`PredictorChooser` and set that layer's multipliers before its output projections run,
    so later layers see the sparse upstream states (as in deployment).
    """

    mode = "predictor"

    def __init__(self, name: str, ratio: float, predictor: Predictor, layer_ratios: list[float] | None = None,
                 head_power: float | None = None):
        super().__init__(name, ratio)
        self.predictor, self.layer_ratios, self.head_power = predictor, layer_ratios, head_power
        self._checked: set[int] = set()

    def check_model(self, model: nn.Module) -> None:
        if id(model) not in self._checked:
            check_model(self.predictor, model, self.name)
            self._checked.add(id(model))

    def prepare(self, model, calibration=None) -> None:
        self.check_model(model)
        device = model_device(model)  # it reads the model's hidden states where they are
        if next(self.predictor.parameters()).device != device:
            self.predictor.to(device)

    def chooser(self, model: nn.Module) -> PredictorChooser:
        """The runtime's unit chooser (:func:`attrsparse.deploy.runtime.predictor_chooser`)."""
        self.check_model(model)
        return self.predictor.chooser(self.ratio, unit_map(model), self.layer_ratios, self.head_power)

    @torch.no_grad()
    def forward(self, model, ids, attention_mask=None):
        self.prepare(model)
        units = unit_map(model)
        chooser = self.chooser(model)
        b, s = ids.shape
        mlp: list = [None] * units.num_layers
        heads: list = [None] * units.num_layers

        def on_attn(layer):
            def hook(_m, args):
                heads[layer] = chooser.choose_heads(layer, args[0].reshape(b, s, -1))
            return hook

        def on_mlp(layer):
            def hook(_m, args):
                mlp[layer] = chooser.choose_mlp(layer, args[0].reshape(b, s, -1))
            return hook

        handles = [m.register_forward_pre_hook(on_attn(l)) for l, m in enumerate(units.attn_in_modules)]
        handles += [m.register_forward_pre_hook(on_mlp(l)) for l, m in enumerate(units.mlp_in_modules)]
        try:
            with UnitHooks(model) as hooks:
                hooks.mlp_mult, hooks.head_mult = mlp, heads  # filled in by the hooks above
                logits = model_logits(model, ids, attention_mask)
        finally:
            for h in handles:
                h.remove()
        return PolicyOutput(logits, UnitMasks(torch.stack(mlp, dim=2), torch.stack(heads, dim=2)))

    def describe(self) -> dict:
        meta = self.predictor.meta
        return {**super().describe(), "trained_ratios": meta.get("ratios"), "rank": self.predictor.rank,
                "head_rank": self.predictor.head_rank, "labels": meta.get("label_selector"),
                **({"layer_ratios": list(self.layer_ratios)} if self.layer_ratios is not None else {}),
                **({"head_power": self.head_power} if self.head_power is not None else {})}


def load_predictor_policy(path: str | Path, ratio: float | None = None,
                          layer_ratios: list[float] | None = None, head_power: float | None = None) -> PredictorPolicy:
    """The :class:`PredictorPolicy` at ``ratio`` from ``path`` (``make_policy("predictor:PATH")``);
    ``ratio=None`` uses the training ratio when there was only one; ``layer_ratios`` (one per
    layer) replace the uniform ``ratio`` by a per-layer budget; ``head_power`` replaces the
    labels' head/MLP split (:meth:`Predictor.chooser`)."""
    predictor = load_predictor(path)
    if ratio is None:
        trained = predictor.meta["ratios"]
        if len(trained) != 1:
            raise UserError(f"{path} was trained at ratios {', '.join(f'{r:g}' for r in trained)}; choose one with --ratio")
        ratio = trained[0]
    return PredictorPolicy(f"predictor:{path}", check_ratio(ratio), predictor, layer_ratios, head_power)
