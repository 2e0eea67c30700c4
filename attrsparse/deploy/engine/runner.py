"""Run a packed engine file: C maps the weights, ctypes drives one C call per token.

Imports neither torch nor numpy, so a process running it holds little beyond the weights (see
:mod:`.worker` for a process that avoids attrsparse's package imports too)::

    with Engine(path, threads=2) as eng:
        out = eng.generate(prompt_ids, max_new_tokens=128)      # screened greedy head
        out.tokens, out.decode_tokens_per_s, out.read_ratio, out.total_read_ratio
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ...core.errors import UserError
from .cdefs import (
    MAX_PROJ,
    MODE_GREEDY_CHECK,
    MODE_GREEDY_FULL,
    MODE_GREEDY_SCREENED,
    MODE_NONE,
    MODE_SAMPLE,
    RULE_PER_PROJECTION,
    RULE_SHARED,
    EngLayer,
    EngModel,
    EngStep,
    engine_library,
)
from .fmt import DTYPE_BYTES, DTYPE_CODE, PRECISION_DTYPE, dense_counts, read_header
from .sites import HEAD_PROJECTION, PROJECTIONS, SITE_PROJECTIONS, SITES, ChannelRules, SiteRule, as_list, physical_bias

LOAD_MODES = {"mmap": 0, "copy": 1}
KV_CACHES = ("fp32", "bf16")


def default_kv_cache(precision: str) -> str:
    """The KV cache an engine file gets unless told: fp32 for fp32 weights (the engine then computes
    transformers' logits), bf16 for bf16 and int8 weights (half the cache's memory; as llama.cpp
    keeps its cache in F16 by default)."""
    return "fp32" if precision == "fp32" else "bf16"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio_summary(values: list[float]) -> dict:
    """Mean, p10 and p90 of per-token ratios (``{}`` for none), as every read ratio is reported."""
    if not values:
        return {}
    return {"mean": sum(values) / len(values), "p10": percentile(values, 10), "p90": percentile(values, 90)}


@dataclass
class Generation:
    """Tokens of one :meth:`Engine.generate` call and what they cost."""

    tokens: list[int]
    times: list[float]                 # perf_counter when each generated token was known
    linear_reads: list[int]            # per generated token: weight elements read by the decoder linears
    head_bytes: list[int]              # per generated token: bytes of head weights read
    candidates: list[int]              # per generated token: head rows computed exactly
    dense_linear: int
    dense_head_bytes: int
    bytes_per_weight: int
    prompt_s: float = 0.0
    checks: list[int] = field(default_factory=list)  # mode "check": the full head's argmax per token
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """(n - 1) / (time of the last token - time of the first): prompt processing excluded."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def _ratios(self, total: bool) -> list[float]:
        out = []
        for lin, head in zip(self.linear_reads, self.head_bytes):
            if total:
                out.append((lin * self.bytes_per_weight + head)
                           / (self.dense_linear * self.bytes_per_weight + self.dense_head_bytes))
            else:
                out.append(lin / self.dense_linear)
        return out

    def ratio_stats(self, total: bool = False) -> dict:
        """Mean, p10 and p90 over tokens of the read ratio (decoder linears) or, with ``total``,
        of the bytes read including the LM head."""
        xs = self._ratios(total)
        return ratio_summary(xs)

    @property
    def read_ratio(self) -> float:
        return self.ratio_stats()["mean"]

    @property
    def total_read_ratio(self) -> float:
        return self.ratio_stats(total=True)["mean"]

    @property
    def head_cost(self) -> float:
        """Mean bytes of head weights read per token ÷ the dense head's bytes."""
        return sum(self.head_bytes) / len(self.head_bytes) / self.dense_head_bytes


class Engine:
    """A packed model mapped in memory with one decoding state (KV cache of ``max_ctx`` positions).

    ``load``: ``"mmap"`` maps the file (shared page cache), ``"copy"`` reads it into private
    memory with transparent huge pages requested (fewer TLB misses). A mapped file with a head
    screen does not populate the head (``lazy_bytes``; see ``_head_range``).

    ``kv_cache``: ``"fp32"`` or ``"bf16"`` storage of the past positions' keys and values
    (:func:`default_kv_cache` when None); with bf16 each key and value is rounded to nearest even
    when stored, and the current position attends to its own fp32 key and value.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, max_ctx: int = 512,
                 load: str = "mmap", seed: int = 0, rules: ChannelRules | None = None,
                 kv_cache: str | None = None):
        if load not in LOAD_MODES:
            raise UserError(f"load must be one of {', '.join(LOAD_MODES)}, got {load!r}")
        if kv_cache is not None and kv_cache not in KV_CACHES:
            raise UserError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        self.path = Path(path)
        self.header = read_header(self.path)
        self.config = self.header["config"]
        self.kv_cache = kv_cache or default_kv_cache(self.config["precision"])
        self.threads = max(1, int(threads or os.cpu_count() or 1))
        self.max_ctx = int(max_ctx)
        self._lib = engine_library()
        self._load = LOAD_MODES[load]
        size = ctypes.c_int64(0)
        self._head_off, head_bytes = self._head_range()
        self.lazy_bytes = head_bytes if self._load == LOAD_MODES["mmap"] and "screen" in self.header["tensors"] else 0
        self._base = self._lib.eng_map(str(self.path).encode(), ctypes.byref(size), self._load, self._head_off,
                                       self.lazy_bytes)
        if not self._base:
            raise UserError(f"cannot map engine file {self.path}")
        self._head_fd = os.open(self.path, os.O_RDONLY) if self.lazy_bytes else -1
        self._size = size.value
        self._keep: list = []        # ctypes buffers the C side points at
        self._rule_buffers: list = []
        self._model = self._build_model()
        self._state = self._lib.eng_state_new(ctypes.byref(self._model), self.max_ctx, self.threads, seed,
                                              DTYPE_CODE[self.kv_cache])
        if not self._state:
            self.close()
            raise MemoryError("cannot allocate the engine state")
        counts = dense_counts(self.config)
        self.dense_linear = counts["linear_params"]
        self.bytes_per_weight = DTYPE_BYTES[PRECISION_DTYPE[self.config["precision"]]]
        self.dense_head_bytes = counts["head_params"] * DTYPE_BYTES[self.config["head_dtype"]]
        self.set_rules(rules)

    # ---------------------------------------------------------------- setup
    def _ptr(self, name: str | None) -> int | None:
        if name is None:
            return None
        return self._base + self.header["data_start"] + self.header["tensors"][name]["offset"]

    def _build_model(self) -> EngModel:
        c = self.config
        m = EngModel()
        for key in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab"):
            setattr(m, key, c[key])
        m.wtype = DTYPE_CODE[c["precision"]]
        m.head_type = DTYPE_CODE[{"f32": "fp32", "bf16": "bf16", "i8": "int8"}[c["head_dtype"]]]
        m.emb_type = DTYPE_CODE[{"f32": "fp32", "bf16": "bf16", "i8": "int8"}[c["embed_dtype"]]]
        m.act, m.eps, m.emb_scale, m.attn_scale = c["act"], c["eps"], c["emb_scale"], c["attn_scale"]
        m.attn_softcap, m.final_softcap = c["attn_softcap"] or 0.0, c["final_softcap"] or 0.0
        t = self.header["tensors"]
        m.embed, m.embed_scale = self._ptr("embed"), self._ptr("embed.scale" if "embed.scale" in t else None)
        m.head, m.head_scale = self._ptr("head"), self._ptr("head.scale" if "head.scale" in t else None)
        if "screen" in t:
            m.screen, m.screen_scale, m.screen_bound = (self._ptr("screen"), self._ptr("screen.scale"),
                                                        self._ptr("screen.bound"))
        m.final_norm = self._ptr("final_norm")
        m.head_fd = self._head_fd  # -1: head rows read from the mapping
        m.head_off = self._head_off
        layers = (EngLayer * c["n_layers"])()
        for i, spec in enumerate(self.header["layers"]):
            L = layers[i]
            for k in range(4):
                L.w[k] = self._ptr(spec["w"][k])
                L.wscale[k] = self._ptr(spec["wscale"][k])
                L.wbias[k] = self._ptr(spec["wbias"][k])
                L.norm[k] = self._ptr(spec["norm"][k])
            L.q_norm, L.k_norm = self._ptr(spec["q_norm"]), self._ptr(spec["k_norm"])
            L.inv_freq, L.rope_scale, L.window = self._ptr(spec["inv_freq"]), spec["rope_scale"], spec["window"]
        self._keep.append(layers)
        m.layers = ctypes.addressof(layers)
        self._layers = layers
        self._head_lin = None
        if self.input_major_head:  # the head as an input-sparse linear (engine.h: head_lin)
            self._head_lin = EngLayer()
            self._head_lin.w[0], self._head_lin.wscale[0] = m.head, m.head_scale
            m.head_lin = ctypes.addressof(self._head_lin)
        return m

    @property
    def input_major_head(self) -> bool:
        """Whether the file stores the head input-major (``pack(..., head_layout="input")``): it
        then runs as an input-sparse linear under :attr:`ChannelRules.head`, with no screen."""
        return self.config.get("head_layout", "rows") == "input"

    def _head_range(self) -> tuple[int, int]:
        """``(offset, bytes)`` of the head in the file. With a screen, greedy decoding reads a few
        exact head rows per token (docs/engine.md), so a mapped file (``load="mmap"``) does not
        populate the head (``lazy_bytes``), and the engine reads those rows (and a tied embedding's)
        with ``pread`` from its own descriptor: the process holds none of the head. Modes that read
        the whole head (full, sample, check) map its pages as they read them."""
        head = self.header["tensors"]["head"]
        return self.header["data_start"] + head["offset"], math.prod(head["shape"]) * DTYPE_BYTES[head["dtype"]]

    def _floats(self, values) -> int:
        """The address of ``values`` as float32 (a float32 array is used as it is, not copied)."""
        buf = values if isinstance(values, array) and values.typecode == "f" else array("f", [float(v) for v in as_list(values)])
        self._rule_buffers.append(buf)
        return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0

    def set_rules(self, rules: ChannelRules | None) -> None:
        """Install channel rules (None: all sites dense). Takes effect from the next step.

        A site whose projections all make the same test (the same threshold and scale) runs the
        shared rule: one decision for the site. Otherwise (per-projection ``thresholds`` /
        ``scales``) every projection of the site decides on its own and reads only its kept rows."""
        if rules is not None:
            rules.validate(self.config)
            if rules.head is not None and not self.input_major_head:
                raise UserError(f"the channel rules have a rule for the LM head, but {self.path.name} stores its "
                                "head by vocabulary rows; pack it with head_layout='input'")
        buffers_before = self._rule_buffers
        self._rule_buffers = []
        for layer in range(self.config["n_layers"]):
            for s, site in enumerate(SITES):
                rule = rules.get(layer, site) if rules is not None else None
                self._install(self._layers[layer].site[s], rule, SITE_PROJECTIONS[site],
                              None if rule is None else physical_bias(rule, site, self.config))
        if self._head_lin is not None:
            head = rules.head if rules is not None else None
            self._install(self._head_lin.site[0], head, (HEAD_PROJECTION,),
                          None if head is None or not head.bias else head.bias[HEAD_PROJECTION])
        del buffers_before  # the C side no longer points at them
        self.rules = rules

    def _install(self, target, rule: SiteRule | None, projections: tuple[str, ...], bias) -> None:
        """Set the C site ``target`` to ``rule`` (None: dense) for a site feeding ``projections``;
        ``bias``: its compensation in physical output order, or None."""
        target.scale = target.center = target.keep = target.bias = None
        target.threshold, target.rule = 0.0, 0
        for p in range(MAX_PROJ):
            target.pscale[p], target.pthreshold[p], target.prule[p] = None, 0.0, 0
        if rule is None or rule.is_dense():
            return
        tests = []
        for proj in projections:
            threshold, scale = rule.projection_test(proj)
            tests.append((threshold, None if scale is None or threshold is None
                          else scale if isinstance(scale, array) else array("f", [float(v) for v in as_list(scale)])))
        if all(test == tests[0] for test in tests):  # one decision for the site
            threshold, scale = tests[0]
            if threshold is not None:
                target.rule, target.threshold = RULE_SHARED, threshold
            if scale is not None:
                target.scale = self._floats(scale)
        else:
            target.rule = RULE_PER_PROJECTION
            for p, (threshold, scale) in enumerate(tests):
                if threshold is not None:
                    target.prule[p], target.pthreshold[p] = 1, threshold
                if scale is not None:
                    target.pscale[p] = self._floats(scale)
        if rule.center is not None:
            target.center = self._floats(rule.center)
        if rule.keep is not None:
            keep = array("B", [1 if k else 0 for k in as_list(rule.keep)] + [0] * 16)
            self._rule_buffers.append(keep)
            target.keep = ctypes.addressof(ctypes.c_char.from_buffer(keep))
        if bias is not None:
            target.bias = self._floats(bias)

    # ---------------------------------------------------------------- running
    def reset(self, seed: int = 0) -> None:
        """Empty the KV cache (position 0) and reseed the sampler."""
        self._lib.eng_state_reset(self._state, seed)

    @property
    def position(self) -> int:
        return self._lib.eng_state_pos(self._state)

    def step(self, token: int, *, mode: str | None = "greedy", temperature: float = 1.0, top_p: float = 1.0,
             logits: bool = False, threads: int | None = None) -> EngStep:
        """Run one token. ``mode``: None (no head: prompt tokens), ``"greedy"`` (screened when the
        file has a screen), ``"full"`` (greedy over the full head), ``"sample"``, ``"check"``
        (the screened token, and the full head's argmax in ``.check``: verification). With
        ``logits`` the full head runs and ``self.last_logits`` holds them (a ctypes float array).
        With an input-major head (:attr:`input_major_head`) every mode runs the head under its
        rule (:attr:`ChannelRules.head`; none: all channels), and ``"check"`` gives the argmax of
        the head with every channel kept in ``.check``."""
        modes = {None: MODE_NONE, "greedy": MODE_GREEDY_SCREENED, "screened": MODE_GREEDY_SCREENED,
                 "full": MODE_GREEDY_FULL, "sample": MODE_SAMPLE, "check": MODE_GREEDY_CHECK}
        if mode not in modes:
            raise UserError(f"mode must be one of greedy, full, sample, check or None, got {mode!r}")
        a = EngStep(token=int(token), threads=int(threads or self.threads), mode=modes[mode],
                    temperature=float(temperature), top_p=float(top_p))
        if logits:
            self.last_logits = (ctypes.c_float * self.config["vocab"])()
            a.logits = ctypes.addressof(self.last_logits)
            if a.mode == MODE_NONE:
                a.mode = MODE_GREEDY_FULL
        if not hasattr(self, "_kept"):
            self._kept = (ctypes.c_int32 * (self.config["n_layers"] * len(PROJECTIONS)))()
        a.kept = ctypes.addressof(self._kept)
        rc = self._lib.eng_step(ctypes.byref(self._model), self._state, ctypes.byref(a))
        if rc == -2:
            raise UserError(f"the engine's context ({self.max_ctx} positions) is full")
        if rc == -3:
            raise UserError(f"token id {token} is outside the vocabulary ({self.config['vocab']})")
        return a

    def kept(self) -> list[list[int]]:
        """Input channels each projection read at the last step, per layer in the order of
        :data:`~.sites.PROJECTIONS` (q, k, v, o, gate, up, down). Under a shared site rule q, k and v
        (gate and up) hold the same count; the step's ``linear_reads`` is the sum over projections
        of these counts times the projection's outputs."""
        n = len(PROJECTIONS)
        return [list(self._kept[n * i:n * (i + 1)]) for i in range(self.config["n_layers"])]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, mode: str = "greedy",
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop_ids=(),
                 threads: int | None = None) -> Generation:
        """Decode from an empty cache: the prompt one token at a time (no head until its last
        token), then ``max_new_tokens`` tokens (fewer when a stop id comes)."""
        if not prompt_ids:
            raise UserError("the prompt must hold at least one token")
        if len(prompt_ids) + max_new_tokens > self.max_ctx:
            raise UserError(f"prompt ({len(prompt_ids)}) + new tokens ({max_new_tokens}) exceed the engine's "
                            f"context of {self.max_ctx}; open the Engine with a larger max_ctx")
        self.reset(seed)
        out = Generation([], [], [], [], [], self.dense_linear, self.dense_head_bytes, self.bytes_per_weight)
        start = time.perf_counter()
        for tok in prompt_ids[:-1]:
            self.step(tok, mode=None, threads=threads)
        token, stops = prompt_ids[-1], set(stop_ids)
        for i in range(max_new_tokens):
            a = self.step(token, mode=mode, temperature=temperature, top_p=top_p, threads=threads)
            now = time.perf_counter()
            if i == 0:
                out.prompt_s = now - start
            token = int(a.next)
            out.tokens.append(token)
            out.times.append(now)
            out.linear_reads.append(int(a.linear_reads))
            out.head_bytes.append(int(a.head_bytes))
            out.candidates.append(int(a.candidates))
            if mode == "check":
                out.checks.append(int(a.check))
            if token in stops:
                break
        return out

    # ---------------------------------------------------------------- sizes and cleanup
    @property
    def file_bytes(self) -> int:
        return self._size

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights in this file (the screening copy of the head excluded)."""
        return self.header["weight_bytes"]

    def close(self) -> None:
        if getattr(self, "_state", None):
            self._lib.eng_state_free(self._state)
            self._state = None
        if getattr(self, "_base", None):
            self._lib.eng_unmap(self._base, self._size, self._load)
            self._base = None
        if getattr(self, "_head_fd", -1) >= 0:
            os.close(self._head_fd)
            self._head_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the library may be gone
            self.close()
