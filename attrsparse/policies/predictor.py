"""Predictor policies: masks predicted in every layer from the block inputs of the running pass,
and the predictor file.

**File** (``DIR/predictor.safetensors``, written by ``attrsparse train-predictor``): the weights of a
:class:`~attrsparse.selectors.predictor.Predictor`, with the JSON metadata in the safetensors header
(model fingerprint, units, ranks, training ratios, label selector, calibration source); the
directory's manifest (``attrsparse.json``, kind ``predictor``) is written last.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..core.architectures import model_device
from ..core.artifacts import check_same_model
from ..core.errors import UserError, check_ratio
from ..core.hooks import UnitHooks
from ..core.io import atomic_write_bytes
from ..core.units import UnitMasks, unit_map
from ..selectors.predictor import Predictor, PredictorChooser
from .base import Applied, SparsityPolicy

WEIGHTS_NAME = "predictor.safetensors"
REPORT_NAME = "predictor.json"
FORMAT = 1
_META_KEY = "attrsparse_predictor"


def save_predictor(predictor: Predictor, out: str | Path) -> Path:
    """Write ``out/predictor.safetensors`` atomically (weights + JSON metadata in the header)."""
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
    check_same_model(model, predictor.meta.get("units", {}), predictor.meta.get("model", {}), name, "trained")


class _PredictorApplied(Applied):
    def __init__(self, model, mlp: list, heads: list):
        super().__init__(model)
        self.mlp, self.heads = mlp, heads

    def last_masks(self, batch, q):
        return UnitMasks(torch.stack([m.reshape(batch, q, -1) for m in self.mlp], dim=2),
                         torch.stack([h.reshape(batch, q, -1) for h in self.heads], dim=2))


class PredictorPolicy(SparsityPolicy):
    """Masks predicted in every layer from the block inputs of the running (sparse) pass.

    Forward pre-hooks on each layer's first attention / MLP projection ask the
    :class:`~attrsparse.selectors.predictor.PredictorChooser` and set that layer's multipliers
    before its output projections run, so later layers see the sparse upstream states (as in
    deployment).
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
        """The runtime's unit chooser (:class:`attrsparse.deploy.runtime.SparseRuntime`)."""
        self.check_model(model)
        return self.predictor.chooser(self.ratio, unit_map(model), self.layer_ratios, self.head_power)

    @contextmanager
    def apply(self, model):
        self.prepare(model)
        units = unit_map(model)
        chooser = self.chooser(model)
        mlp: list = [None] * units.num_layers
        heads: list = [None] * units.num_layers
        with UnitHooks(model) as hooks:
            def rows(layer: int, x: torch.Tensor) -> torch.Tensor:
                """``x`` as ``[B, q, d]`` (OPT flattens the MLP input to ``[B*q, d]``)."""
                shape = hooks.layer_shape(layer)
                return x.view(*shape, -1) if x.dim() == 2 and shape is not None else x

            def on_attn(layer):
                def hook(_m, args):
                    heads[layer] = chooser.choose_heads(layer, rows(layer, args[0]))
                return hook

            def on_mlp(layer):
                def hook(_m, args):
                    mlp[layer] = chooser.choose_mlp(layer, rows(layer, args[0]))
                return hook

            handles = [m.register_forward_pre_hook(on_attn(l)) for l, m in enumerate(units.attn_in_modules)]
            handles += [m.register_forward_pre_hook(on_mlp(l)) for l, m in enumerate(units.mlp_in_modules)]
            hooks.mlp_mult, hooks.head_mult = mlp, heads  # filled in by the hooks above
            try:
                yield _PredictorApplied(model, mlp, heads)
            finally:
                for h in handles:
                    h.remove()

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
