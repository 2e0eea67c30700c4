"""Slice a stock Hugging Face model down to the units of static masks, and save it.

The sliced model is the same stock class built from an edited config, so plain
``AutoModelForCausalLM.from_pretrained`` loads the export without attrsparse:

* MLP: rows of every input projection (gate/up, fused gate_up, fc1, GPT-2 ``c_fc``) and columns of
  the down-projection of the kept units; ``intermediate_size`` (``n_inner``, ``ffn_dim``) updated.
* Attention (Llama, Qwen2/3, Gemma 1/2/3, Phi, Phi-3): query rows and output columns of the kept
  heads, key/value rows of the kept key/value heads; ``num_attention_heads``,
  ``num_key_value_heads`` and ``head_dim`` (explicit: ``hidden / heads`` changes, the head
  dimension and RoPE do not) updated. Stock attention repeats key/value head ``j`` for query heads
  ``j*g' .. j*g'+g'-1``, so the kept heads are laid out group by group with the same number
  ``g'`` per kept group. GPT-2 and OPT derive the head size from ``hidden / heads``: their heads
  are not sliced; the dropped heads' output columns are zeroed instead (same outputs, no saving).
* Stock configs have one size for every layer. A layer that keeps fewer MLP units, key/value
  groups or heads per group than the largest one is **padded** with dropped units whose output
  columns are zero (the outputs stay exactly the masked model's); the padding is reported.
  Calibrated uniform allocations (:mod:`attrsparse.deploy.calibrate`) need no padding.
  ``slice_model(..., exact_mlp=True)`` trims the MLP padding per layer in memory (for the runtime;
  such a model is not reloadable from its config).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.architectures import find_arch, linear_dims
from ..core.artifacts import MANIFEST, write_manifest
from ..core.errors import UserError
from ..core.units import UnitMap, UnitMasks, executed_ratio, unit_map

EXPORT_INFO = "attrsparse_export.json"


@dataclass
class LayerPlan:
    """Kept units of one layer in export order (kept first, then zero-output padding)."""

    mlp: torch.Tensor  # [N'] unit indices
    mlp_kept: int  # the first mlp_kept of them are kept, the rest is padding
    kv: torch.Tensor  # [KV'] key/value heads
    heads: torch.Tensor  # [KV' * g'] query heads, group by group in the order of ``kv``
    heads_kept: torch.Tensor  # [KV' * g'] bool, False = padding


@dataclass
class SlicePlan:
    layers: list[LayerPlan]
    mlp_size: int  # N'
    kv_heads: int  # KV'
    heads_per_group: int  # g'
    heads_sliced: bool

    @property
    def num_heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    @property
    def padded_units(self) -> dict:
        """Units stored with zero output columns: MLP and head padding (sliced heads), or the
        dropped heads that stay in place (heads not sliced)."""
        dropped = sum(int((~p.heads_kept).sum()) for p in self.layers)
        return {"mlp": sum(self.mlp_size - p.mlp_kept for p in self.layers),
                "heads": dropped if self.heads_sliced else 0,
                **({} if self.heads_sliced else {"zeroed_heads": dropped})}


def _pad(kept: torch.Tensor, dropped: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([kept, dropped[: size - kept.numel()]])


def plan_slices(masks: UnitMasks, units: UnitMap, heads_sliced: bool = True) -> SlicePlan:
    """Export layout of static masks ``mlp [L, N]``, ``heads [L, H]`` (see the module docstring)."""
    mlp, heads = masks.mlp.bool(), masks.heads.bool()
    expect = (units.num_layers, units.mlp_size), (units.num_layers, units.num_heads)
    if tuple(mlp.shape) != expect[0] or tuple(heads.shape) != expect[1]:
        raise UserError(f"static masks of shape {tuple(mlp.shape)}/{tuple(heads.shape)} do not fit "
                        f"this model ({expect[0]}/{expect[1]})")
    n_mlp = max(1, int(mlp.sum(-1).max()))
    g = units.group_size
    groups = heads.reshape(units.num_layers, units.num_kv_heads, g)
    if heads_sliced:
        kv_n = max(1, int(groups.any(-1).sum(-1).max()))
        per_group = max(1, int(groups.sum(-1).max()))
    else:
        kv_n, per_group = units.num_kv_heads, g
    layers = []
    for l in range(units.num_layers):
        keep = mlp[l]
        order = _pad(keep.nonzero().squeeze(-1), (~keep).nonzero().squeeze(-1), n_mlp)
        gk = groups[l].any(-1) if heads_sliced else torch.ones(units.num_kv_heads, dtype=torch.bool)
        kv = _pad(gk.nonzero().squeeze(-1), (~gk).nonzero().squeeze(-1), kv_n)
        head_ids, head_kept = [], []
        for j in kv.tolist():
            in_group = groups[l, j]
            local = _pad(in_group.nonzero().squeeze(-1), (~in_group).nonzero().squeeze(-1), per_group)
            head_ids.append(local + j * g)
            head_kept.append(in_group[local])
        layers.append(LayerPlan(order, int(keep.sum()), kv, torch.cat(head_ids), torch.cat(head_kept)))
    return SlicePlan(layers, n_mlp, kv_n, per_group, heads_sliced)


# -- tensor slicing ----------------------------------------------------------------------------

def _rows(block: int, idx: torch.Tensor) -> torch.Tensor:
    """Feature indices of units ``idx`` with ``block`` features each (head rows)."""
    return (idx.unsqueeze(-1) * block + torch.arange(block)).reshape(-1)


def _out_features(module: nn.Module, weight: torch.Tensor, bias, rows: torch.Tensor):
    if isinstance(module, nn.Linear):
        return weight[rows], None if bias is None else bias[rows]
    return weight[:, rows], None if bias is None else bias[rows]  # Conv1D [in, out]


def _in_features(module: nn.Module, weight: torch.Tensor, cols: torch.Tensor, zero: torch.Tensor):
    """Input columns ``cols`` of a projection; columns where ``zero`` is True are set to 0."""
    w = (weight[:, cols] if isinstance(module, nn.Linear) else weight[cols]).clone()
    if bool(zero.any()):
        if isinstance(module, nn.Linear):
            w[:, zero] = 0
        else:
            w[zero] = 0
    return w


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def sliced_state_dict(model: nn.Module, plan: SlicePlan) -> dict[str, torch.Tensor]:
    """The model's state dict with every unit projection sliced by ``plan``."""
    spec, units = find_arch(model.config.model_type), unit_map(model)
    state = dict(model.state_dict())
    d, n, h, kvh = units.head_dim, units.mlp_size, units.num_heads, units.num_kv_heads

    def put(prefix: str, module: nn.Module, weight: torch.Tensor, bias=None) -> None:
        state[f"{prefix}.weight"] = weight.contiguous()
        if bias is not None:
            state[f"{prefix}.bias"] = bias.contiguous()

    for l, lp in enumerate(plan.layers):
        base = f"{spec.layers}.{l}"
        layer = units.layer_modules[l]
        for path in spec.mlp_in:
            module = _get(layer, path)
            blocks = linear_dims(module)[1] // n
            rows = torch.cat([b * n + lp.mlp for b in range(blocks)])
            put(f"{base}.{path}", module, *_out_features(module, module.weight, module.bias, rows))
        down = _get(layer, spec.mlp_down)
        pad = torch.arange(plan.mlp_size) >= lp.mlp_kept
        put(f"{base}.{spec.mlp_down}", down, _in_features(down, down.weight, lp.mlp, pad))
        out = _get(layer, spec.attn_out)
        head_cols = _rows(d, lp.heads)
        put(f"{base}.{spec.attn_out}", out,
            _in_features(out, out.weight, head_cols, ~lp.heads_kept.repeat_interleave(d)))
        if not plan.heads_sliced:
            continue
        q_rows, kv_rows = head_cols, _rows(d, lp.kv)
        if len(spec.attn_qkv) == 3:
            for path, rows in zip(spec.attn_qkv, (q_rows, kv_rows, kv_rows)):
                module = _get(layer, path)
                put(f"{base}.{path}", module, *_out_features(module, module.weight, module.bias, rows))
        else:  # fused [q | k | v] (Phi-3)
            module = _get(layer, spec.attn_qkv[0])
            rows = torch.cat([q_rows, h * d + kv_rows, h * d + kvh * d + kv_rows])
            put(f"{base}.{spec.attn_qkv[0]}", module, *_out_features(module, module.weight, module.bias, rows))
    return state


def sliced_config(model: nn.Module, plan: SlicePlan):
    config = copy.deepcopy(model.config)
    spec, units = find_arch(config.model_type), unit_map(model)
    setattr(config, spec.mlp_size_key, plan.mlp_size)
    if plan.heads_sliced:
        config.num_attention_heads = plan.num_heads
        config.num_key_value_heads = plan.kv_heads
        config.head_dim = units.head_dim
    if hasattr(config, "quantization_config"):  # GGUF-loaded models (see models-and-data.md)
        del config.quantization_config
    return config


def _trim_mlp(model: nn.Module, plan: SlicePlan) -> None:
    """Drop each layer's MLP padding in place (per-layer sizes differ afterwards)."""
    from transformers.pytorch_utils import Conv1D

    spec = find_arch(model.config.model_type)
    layers = _get(model, spec.layers)
    for l, lp in enumerate(plan.layers):
        k = lp.mlp_kept
        if k == plan.mlp_size:
            continue
        for path in (*spec.mlp_in, spec.mlp_down):
            parent_path, _, name = path.rpartition(".")
            parent = _get(layers[l], parent_path) if parent_path else layers[l]
            old = getattr(parent, name)
            in_f, out_f, has_bias = linear_dims(old)
            if path == spec.mlp_down:
                keep = torch.arange(k)
                new_in, new_out = k, out_f
            else:
                keep = torch.cat([b * plan.mlp_size + torch.arange(k) for b in range(out_f // plan.mlp_size)])
                new_in, new_out = in_f, keep.numel()
            if isinstance(old, nn.Linear):
                new = nn.Linear(new_in, new_out, bias=has_bias, dtype=old.weight.dtype)
                new.weight.data = (old.weight[:, keep] if path == spec.mlp_down else old.weight[keep]).contiguous()
            else:
                new = Conv1D(new_out, new_in).to(old.weight.dtype)
                new.weight.data = (old.weight[keep] if path == spec.mlp_down else old.weight[:, keep]).contiguous()
            if has_bias:
                new.bias.data = old.bias.clone() if path == spec.mlp_down else old.bias[keep].clone()
            setattr(parent, name, new.requires_grad_(False))


def slice_model(model: nn.Module, masks: UnitMasks, *, exact_mlp: bool = False) -> nn.Module:
    """A new stock model holding only the units of static ``masks`` (``[L, N]``, ``[L, H]``).

    Its logits equal the masked model's (``StaticPolicy``) up to float rounding.
    """
    from transformers import AutoModelForCausalLM

    units = unit_map(model)
    spec = find_arch(model.config.model_type)
    plan = plan_slices(masks, units, heads_sliced=spec.heads_sliceable)
    config = sliced_config(model, plan)
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        sliced = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype,
                                                  **({"attn_implementation": attn} if attn else {}))
    sliced.tie_weights()  # no_init_weights skips init_weights, which ties the embeddings
    missing, unexpected = sliced.load_state_dict(sliced_state_dict(model, plan), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"sliced state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(model, "generation_config", None) is not None:
        sliced.generation_config = copy.deepcopy(model.generation_config)
    sliced.eval().requires_grad_(False)
    if exact_mlp:
        _trim_mlp(sliced, plan)
    sliced._attrsparse_slice_plan = plan
    return sliced


def maskable_params(model: nn.Module) -> int:
    """Parameters of every layer's attention and MLP unit projections (after slicing too)."""
    spec = find_arch(model.config.model_type)
    total = 0
    for layer in _get(model, spec.layers):
        for path in (*spec.mlp_in, spec.mlp_down, *spec.attn_qkv, spec.attn_out):
            total += sum(p.numel() for p in _get(layer, path).parameters())
    return total


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _written_before(out: Path) -> set[str]:
    """The files an earlier export in ``out`` wrote (listed in its info), never a path outside it."""
    try:
        listed = json.loads((out / EXPORT_INFO).read_text()).get("files") or []
    except (OSError, ValueError, AttributeError):
        return set()
    root = out.resolve()
    return {f for f in listed if isinstance(f, str) and (out / f).resolve().is_relative_to(root)}


def _place(tmp: Path, out: Path, last: tuple[str, ...]) -> None:
    """Move the export in ``tmp`` into ``out``: a new folder is renamed into place; over an earlier
    export, file by file (``last`` at the end), then the earlier export's files that this one does
    not write are removed. Files the tool did not write are never touched."""
    for name in _files(tmp):
        with open(tmp / name, "rb+") as fh:
            os.fsync(fh.fileno())  # on disk before any rename
    if not out.exists():
        os.replace(tmp, out)
        return
    before, now = _written_before(out), _files(tmp)
    for name in sorted(now, key=lambda n: n in last):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)
    for name in sorted(before - set(now)):
        (out / name).unlink(missing_ok=True)


def export_model(model: nn.Module, tokenizer, masks: UnitMasks, out: str | Path, *,
                 info: dict | None = None, overwrite: bool = True,
                 extra_files: dict[str, Path] | None = None) -> dict:
    """Save the sliced model (``save_pretrained``) + tokenizer + ``attrsparse_export.json``.

    Writes into a temporary sibling directory, then renames it into place, or over an earlier
    export replaces its files one by one and removes those of its files (listed under ``files`` in
    its info) that the new export does not write: files a user put there stay. ``extra_files``
    (``{relative name: source}``) are copied in too. Returns the info dict (parameter counts
    before/after, executed ratio of the masks, padding, size on disk, the files written, and
    whatever ``info`` adds, e.g. the sparsity source and quality).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_INFO).exists():
        raise UserError(f"{out} exists and is not an attrsparse export; choose an empty --out directory")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; remove it or pass overwrite")
    units = unit_map(model)
    sliced = slice_model(model, masks)
    plan: SlicePlan = sliced._attrsparse_slice_plan
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in sliced.parameters())
    acc = executed_ratio(masks, units)
    report = {
        "format": "attrsparse-export/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "params_before": params_before, "params_after": params_after,
        "maskable_params_before": units.maskable_params,
        "maskable_params_after": maskable_params(sliced),
        "stored_maskable_ratio": maskable_params(sliced) / units.maskable_params,
        **{k: v for k, v in acc.as_dict().items() if k != "executed_tokens"},
        "mlp_size": plan.mlp_size, "num_attention_heads": plan.num_heads,
        "num_key_value_heads": plan.kv_heads, "heads_sliced": plan.heads_sliced,
        "padding_units": plan.padded_units,
        **(info or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        sliced.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, source in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, tmp / name)
        report["size_on_disk_bytes"] = _dir_size(tmp)
        report["files"] = sorted({*_files(tmp), EXPORT_INFO, MANIFEST})  # what a later export may remove
        (tmp / EXPORT_INFO).write_text(json.dumps(report, indent=1) + "\n")
        write_manifest(tmp, "export", model, (info or {}).get("source_model"))  # the source model
        _place(tmp, out, last=(MANIFEST, EXPORT_INFO))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
