"""Pack a transformers model into an engine file (needs torch; the runner does not).

``pack(model, "fp32" | "bf16" | "int8")`` writes ``<cache root>/engine/<model_type>-<precision>-<key>.aspe``
once (``key``: sha256 of the weights, precision, options and format version; written to a
temporary name, then renamed) and returns its path; a later call with the same weights returns
the existing file after checking its header.

``head_layout="input"`` stores the LM head input-major (``[hidden, vocab]``, like the linears), so
that it runs as an input-sparse linear under a channel rule (``ChannelRules.head``); such a file has
no screen. The default, ``"rows"``, stores it by vocabulary rows (the screened greedy head).

Supported: Llama (SmolLM2), Qwen2 (q/k/v biases), Gemma 3 text. Anything else raises
:class:`UnsupportedArchitectureError` (callers fall back to transformers with a note).
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ...core.architectures import find_arch
from ...core.errors import UnsupportedArchitectureError, UserError
from ...core.paths import cache_root
from .cdefs import ACTIVATIONS
from .fmt import (
    DTYPE_BYTES,
    FORMAT_VERSION,
    PRECISION_DTYPE,
    PRECISIONS,
    align,
    encode_header,
    read_header,
)

ENGINE_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
HEAD_LAYOUTS = ("rows", "input")
_UNIT = 2.0 ** -24  # fp32 unit roundoff


# ---------------------------------------------------------------- weight conversions (also used by tests)

def input_major(weights: list[torch.Tensor], order: list[int] | None = None) -> torch.Tensor:
    """W^T of ``cat(weights)`` (each ``[out, in]``) as ``[in, P]`` fp32, outputs permuted by ``order``."""
    w = torch.cat([x.detach().float() for x in weights], 0)
    if order is not None:
        w = w[torch.tensor(order)]
    return w.t().contiguous()


def quantize(w: torch.Tensor, precision: str, dim: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(stored, scale, dequantised)`` of fp32 ``w`` in ``precision``. int8 has one scale per slice
    along ``dim`` reduced over the other axis (per output channel: ``dim=1`` for an input-major
    ``[in, P]`` weight, ``dim=0`` for a ``[vocab, hidden]`` head): ``w ≈ q * scale``."""
    w = w.detach().float().contiguous()
    if precision == "fp32":
        return w, None, w
    if precision == "bf16":
        b = w.to(torch.bfloat16)
        return b.view(torch.int16), None, b.float()
    if precision != "int8":
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    scale = w.abs().amax(dim=1 - dim) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (1, -1) if dim == 1 else (-1, 1)
    q = torch.round(w / scale.view(shape)).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous(), q.float() * scale.view(shape)


def screen_tensors(head: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The screening copy of a head ``[V, d]`` (its dequantised stored values): int8 rows ``q``,
    per-row scales ``s`` and bounds ``c`` with ``|exact_v - approx_v| <= c_v * ||h||`` for every h,
    where exact_v is the engine's fp32 logit and approx_v = fl(fl(q_v · h) * s_v):

    c_v = (||W_v - s_v q_v|| + 3 γ (||W_v|| + ||s_v q_v||)) (1 + 2^-20), γ = (d+2)u / (1-(d+2)u),

    rounded up to fp32 (Cauchy-Schwarz for the quantisation residual, the classical γ_n bound for
    both dot products' rounding, slack for the bound's own float arithmetic; docs/engine.md)."""
    V, d = head.shape
    gamma = (d + 2) * _UNIT / (1 - (d + 2) * _UNIT)
    qs, ss, cs = [], [], []
    for start in range(0, V, chunk):
        w = head[start:start + chunk].double()
        s = (w.abs().amax(1) / 127.0).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(w / s.double()[:, None]).clamp_(-127, 127)
        approx = q * s.double()[:, None]
        c = ((w - approx).norm(dim=1) + 3 * gamma * (w.norm(dim=1) + approx.norm(dim=1))) * (1 + 2.0 ** -20)
        c32 = c.float()
        c32 = torch.where(c32.double() < c, torch.nextafter(c32, torch.full_like(c32, math.inf)), c32)
        qs.append(q.to(torch.int8))
        ss.append(s)
        cs.append(c32)
    return torch.cat(qs), torch.cat(ss), torch.cat(cs)


# ---------------------------------------------------------------- model inspection

def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def engine_arch(model: nn.Module) -> str:
    """The engine's name for the model's architecture, or :class:`UnsupportedArchitectureError`."""
    config = model.config
    kind = ENGINE_TYPES.get(getattr(config, "model_type", ""))
    if kind is None:
        raise UnsupportedArchitectureError(
            f"the native engine runs {', '.join(ENGINE_TYPES)} models, not {config.model_type!r}; "
            "use transformers for this one")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(f"the native engine has no activation {act!r}; use transformers")
    rotary = _get(model, "model.rotary_emb")
    rope_types = rotary.rope_type.values() if isinstance(rotary.rope_type, dict) else [rotary.rope_type]
    if any(t in ("dynamic", "longrope") for t in rope_types):
        raise UnsupportedArchitectureError("the native engine needs a fixed RoPE table (no dynamic/longrope "
                                           "scaling); use transformers")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError("bidirectional attention is not a decoder; use transformers")
    return kind


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the native engine runs ``model``, else the one-line reason (for the caller's note
    when it falls back to transformers)."""
    try:
        engine_arch(model)
    except UnsupportedArchitectureError as exc:
        return str(exc)
    return None


def fingerprint(model: nn.Module, precision: str, screen: bool, head_layout: str = "rows") -> str:
    """sha256 of the format version, precision, options, config and every parameter's bytes."""
    options = f"{screen}" if head_layout == "rows" else f"{screen}|head={head_layout}"  # rows: the keys of before
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{precision}|{options}|".encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        digest.update(name.encode())
        t = p.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def _rope(model: nn.Module, layer_type: str | None) -> tuple[torch.Tensor, float]:
    rotary = _get(model, "model.rotary_emb")
    if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq"):
        return getattr(rotary, f"{layer_type}_inv_freq"), float(getattr(rotary, f"{layer_type}_attention_scaling"))
    return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


# ---------------------------------------------------------------- the plan and the file

class _Plan:
    """Tensors in file order: name -> (dtype, shape, producer of a contiguous tensor)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, list[int], Callable[[], torch.Tensor]]] = []
        self.alias: dict[str, str] = {}

    def add(self, name: str, dtype: str, shape: list[int], make: Callable[[], torch.Tensor]) -> str:
        self.items.append((name, dtype, [int(s) for s in shape], make))
        return name

    def table(self) -> tuple[dict, int]:
        tensors, offset = {}, 0
        for name, dtype, shape, _ in self.items:
            tensors[name] = {"offset": offset, "dtype": dtype, "shape": shape}
            offset = align(offset + math.prod(shape) * DTYPE_BYTES[dtype])
        for alias, name in self.alias.items():
            tensors[alias] = tensors[name]
        return tensors, offset


def _vector(plan: _Plan, name: str, t: torch.Tensor | None, plus_one: bool = False) -> str | None:
    if t is None:
        return None
    v = t.detach().float() + (1.0 if plus_one else 0.0)
    return plan.add(name, "f32", [v.numel()], lambda: v.contiguous())


def _weight(plan: _Plan, name: str, make_wt: Callable[[], torch.Tensor], shape: list[int], precision: str,
            dim: int) -> tuple[str, str | None]:
    """Adds ``name`` (and ``name.scale`` for int8); the conversion runs once, when written."""
    cache: dict[str, tuple] = {}

    def converted():
        if "v" not in cache:
            cache["v"] = quantize(make_wt(), precision, dim)
        return cache["v"]

    def stored():
        out = converted()[0]
        if precision != "int8":
            cache.clear()
        return out

    def scale():
        out = converted()[1]
        cache.clear()
        return out

    plan.add(name, PRECISION_DTYPE[precision], shape, stored)
    if precision != "int8":
        return name, None
    return name, plan.add(name + ".scale", "f32", [shape[dim]], scale)


def _layer(plan: _Plan, model: nn.Module, spec, i: int, layer: nn.Module, precision: str, kind: str,
           rope_names: dict) -> dict:
    attn = _get(layer, spec.attn_out.rsplit(".", 1)[0])
    q, k, v = (_get(layer, p) for p in spec.attn_qkv)
    gate, up = (_get(layer, p) for p in spec.mlp_in)
    o, down = _get(layer, spec.attn_out), _get(layer, spec.mlp_down)
    groups = [[q, k, v], [o], [gate, up], [down]]  # columns q | k | v and gate | up (engine.h)
    out: dict = {"w": [], "wscale": [], "wbias": [], "norm": []}
    for g, mods in enumerate(groups):
        n_in, n_out = mods[0].weight.shape[1], sum(m.weight.shape[0] for m in mods)
        name, scale = _weight(plan, f"L{i}.w{g}", lambda mods=mods: input_major([m.weight for m in mods]),
                              [n_in, n_out], precision, dim=1)
        out["w"].append(name)
        out["wscale"].append(scale)
        biases = [m.bias for m in mods]
        if any(b is not None for b in biases):
            b = torch.cat([x.detach().float() if x is not None else torch.zeros(m.weight.shape[0])
                           for x, m in zip(biases, mods)])
            out["wbias"].append(_vector(plan, f"L{i}.b{g}", b))
        else:
            out["wbias"].append(None)
    gemma = kind == "gemma3"
    names = (["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
             if gemma else ["input_layernorm", None, "post_attention_layernorm", None])
    for n, attr in enumerate(names):
        out["norm"].append(_vector(plan, f"L{i}.norm{n}", getattr(layer, attr).weight, gemma) if attr else None)
    out["q_norm"] = _vector(plan, f"L{i}.q_norm", attn.q_norm.weight, gemma) if hasattr(attn, "q_norm") else None
    out["k_norm"] = _vector(plan, f"L{i}.k_norm", attn.k_norm.weight, gemma) if hasattr(attn, "k_norm") else None
    layer_types = getattr(model.config, "layer_types", None)
    layer_type = layer_types[i] if layer_types else None
    if layer_type not in rope_names:
        inv, scale = _rope(model, layer_type)
        rope_names[layer_type] = (_vector(plan, f"rope.{layer_type or 'default'}", inv), scale)
    out["inv_freq"], out["rope_scale"] = rope_names[layer_type]
    out["window"] = int(getattr(attn, "sliding_window", None) or 0)
    return out


def _describe(model: nn.Module, kind: str, precision: str) -> dict:
    c = model.config
    spec = find_arch(c.model_type)
    layers = _get(model, spec.layers)
    attn0 = _get(layers[0], spec.attn_out.rsplit(".", 1)[0])
    q = _get(layers[0], spec.attn_qkv[0])
    head_dim = int(getattr(attn0, "head_dim", 0) or q.weight.shape[0] // c.num_attention_heads)
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    emb = model.get_input_embeddings()
    return {"arch": kind, "model_type": c.model_type, "precision": precision, "n_layers": len(layers),
            "hidden": c.hidden_size, "n_heads": c.num_attention_heads, "n_kv": c.num_key_value_heads,
            "head_dim": head_dim, "inter": _get(layers[0], spec.mlp_in[0]).weight.shape[0],
            "vocab": emb.weight.shape[0], "act": ACTIVATIONS[act], "eps": float(c.rms_norm_eps),
            "emb_scale": float(getattr(emb, "scalar_embed_scale", 1.0)), "attn_scale": float(attn0.scaling),
            "attn_softcap": getattr(c, "attn_logit_softcapping", None),
            "final_softcap": getattr(c, "final_logit_softcapping", None),
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}


def _build_plan(model: nn.Module, precision: str, screen: bool, head_layout: str = "rows") -> tuple[_Plan, dict, list[dict]]:
    kind = engine_arch(model)
    config = _describe(model, kind, precision)
    spec = find_arch(model.config.model_type)
    plan = _Plan()
    head_w = model.get_output_embeddings().weight
    emb_w = model.get_input_embeddings().weight
    tied = head_w.data_ptr() == emb_w.data_ptr()
    dtype = PRECISION_DTYPE[precision]
    V, d = head_w.shape
    head_cache: dict = {}

    def head_deq():
        if "q" not in head_cache:
            head_cache["q"] = quantize(head_w, precision, dim=0)
        return head_cache["q"]

    if head_layout == "input":  # [d, V]: the same values and per-vocabulary scales, transposed
        plan.add("head", dtype, [d, V], lambda: head_deq()[0].T.contiguous())
    else:
        plan.add("head", dtype, [V, d], lambda: head_deq()[0])
    if precision == "int8":
        plan.add("head.scale", "f32", [V], lambda: head_deq()[1])
    if screen:
        def screened(i):
            if "screen" not in head_cache:
                head_cache["screen"] = screen_tensors(head_deq()[2])
            return head_cache["screen"][i]
        plan.add("screen", "i8", [V, d], lambda: screened(0))
        plan.add("screen.scale", "f32", [V], lambda: screened(1))
        plan.add("screen.bound", "f32", [V], lambda: screened(2))
    if tied:
        plan.alias["embed"] = "head"
        if precision == "int8":
            plan.alias["embed.scale"] = "head.scale"
    else:
        _weight(plan, "embed", lambda: emb_w, [V, d], precision, dim=0)
    norm = _get(model, "model.norm").weight
    _vector(plan, "final_norm", norm, kind == "gemma3")
    rope_names: dict = {}
    layers = [_layer(plan, model, spec, i, layer, precision, kind, rope_names)
              for i, layer in enumerate(_get(model, spec.layers))]
    config.update(head_dtype=dtype, embed_dtype=dtype, tied=tied, head_layout=head_layout)
    return plan, config, layers


def engine_dir(directory: str | os.PathLike | None = None) -> Path:
    folder = Path(directory) if directory is not None else cache_root() / "engine"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def pack(model: nn.Module, precision: str = "fp32", *, screen: bool | None = None, head_layout: str = "rows",
         directory: str | os.PathLike | None = None, source: dict | None = None) -> Path:
    """Write (once) and return the engine file of ``model`` in ``precision`` (module docstring).

    ``screen``: store the int8 screening copy of the head for the exact screened greedy argmax;
    default: for fp32 and bf16 heads stored by rows (an int8 head is as small as its screen would
    be). ``head_layout``: ``"rows"`` or ``"input"`` (the input-sparse head; no screen)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if head_layout not in HEAD_LAYOUTS:
        raise UserError(f"head_layout must be one of {', '.join(HEAD_LAYOUTS)}, got {head_layout!r}")
    if screen and head_layout == "input":
        raise UserError("an input-major head has no screen (the screen bounds rows of a head stored by rows)")
    if screen is None:
        screen = precision != "int8" and head_layout == "rows"
    engine_arch(model)
    key = fingerprint(model, precision, screen, head_layout)
    suffix = "" if head_layout == "rows" else "-hin"
    path = engine_dir(directory) / f"{model.config.model_type}-{precision}{suffix}-{key[:16]}.aspe"
    if path.exists():
        try:
            if read_header(path).get("fingerprint") == key:
                return path
        except UserError:
            pass  # stale or partial: rewrite below
    plan, config, layers = _build_plan(model, precision, screen, head_layout)
    tensors, data_bytes = plan.table()
    screen_names = {"screen", "screen.scale", "screen.bound"}
    seen, weight_bytes = set(), 0
    for name, info in tensors.items():
        if name not in screen_names and info["offset"] not in seen:
            seen.add(info["offset"])
            weight_bytes += math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
    header = {"format": FORMAT_VERSION, "fingerprint": key, "config": config, "layers": layers,
              "tensors": tensors, "data_bytes": data_bytes, "weight_bytes": weight_bytes,
              "source": source or {}}
    raw = encode_header(header)
    start = align(len(raw))
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(raw + b"\0" * (start - len(raw)))
            for name, dtype, shape, make in plan.items:
                t = make().detach().cpu().contiguous()
                nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
                if t.numel() * t.element_size() != nbytes:
                    raise AssertionError(f"{name}: {t.numel() * t.element_size()} bytes, planned {nbytes}")
                fh.write(t.view(torch.uint8).numpy().data if nbytes else b"")
                fh.write(b"\0" * (align(nbytes) - nbytes))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
