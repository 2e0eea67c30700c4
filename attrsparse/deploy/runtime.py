"""Sparse greedy decoding with a KV cache: static sliced models or per-token gathered kernels.

``attrsparse.generate(model_or_spec, prompts, sparsity=...)`` decodes greedily and returns the
texts with the executed activation ratio and the speed:

* ``sparsity=None`` / ``"dense"``: the stock model.
* static masks (a directory written by ``attrsparse calibrate``, ``"static:DIR"``, a
  :class:`~attrsparse.core.units.UnitMasks` ``[L, *]`` or a ``StaticPolicy``): the model is sliced
  in memory (:func:`attrsparse.deploy.export.slice_model`, the same stock layout as the export,
  MLP padding trimmed per layer) and decodes densely with contiguous smaller weights.
* an online selector (``"teal"``, ``"wina"``, ...): the stock model decodes with the policy's rules
  applied to every call (:meth:`attrsparse.policies.SparsityPolicy.apply`), accounted per call;
  no work is skipped (quality, not speed).
* a :class:`~attrsparse.selectors.chooser.UnitChooser` or ``"predictor:PATH"``: per-token masks chosen in every layer *before*
  that layer's attention and MLP run, from the hidden state entering the block; the unit
  projections are swapped for gathered ones (:mod:`attrsparse.deploy.gathered`) by
  :class:`SparseRuntime`. Keys and values are computed for every key/value head, so the cache
  stays complete; this is counted in :attr:`GenerationResult.computed_fraction`. A call whose kept
  fraction (union over its token rows) is above the break-even runs dense and masks instead
  (prefill of a long prompt, or a layer that keeps nearly everything). One-token calls with the C
  backend run per-layer plans prepared in ``__enter__``; a chooser that describes itself to the
  C library (:meth:`UnitChooser.native`: static masks, the trained predictor) is then not called
  from Python at all: the library computes the predictor's logits, the top-k and the gathered
  projections in one call per block.

Accounting: ``executed`` is the masks' parameter-weighted activation ratio over the generated
tokens (every layer; the prompt positions are in ``prompt_executed``); ``computed_fraction`` is
the share of attention + MLP parameters really multiplied per generated token (key/value heads,
dense fallbacks, padding included). Embeddings and the LM head are outside both, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.architectures import find_arch, linear_dims
from ..core.decoding import greedy_loop
from ..core.errors import UserError
from ..core.models import load_model, parse_dtype
from ..core.units import ExecutedRatio, UnitMap, UnitMasks, executed_ratio, unit_map
from ..data.prompts import encode_prompt, fit_prompt, resolve_template, stop_token_ids
from ..policies import DensePolicy, PredictorPolicy, SparsityPolicy, StaticPolicy, make_policy
from ..selectors.chooser import NativeChoice, UnitChooser
from .export import maskable_params, slice_model
from .gathered import Block, GatheredIn, GatheredMLP, GatheredOut, UnitGroup, _col_major, _row_major
from .kernels import SUFFIX, gather_backend, measure_break_even


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    module = root
    for part in parent_path.split(".") if parent_path else []:
        module = getattr(module, part)
    return module, name


class SparseRuntime:
    """Context manager: swaps a model's unit projections for gathered ones driven by ``chooser``.

    ``break_even``: kept fraction above which a call runs dense (``"auto"``: measured once per
    model shape, dtype and thread count by :func:`measure_break_even`; ``0`` = always dense
    with masks, ``1`` = always gathered). ``backend``: ``auto``, ``c`` or ``torch``.

    Between forward calls, :meth:`begin` tells the runtime which token rows are real and which of
    them produce generated tokens; :attr:`executed`, :attr:`prompt_executed` and
    :attr:`computed_fraction` accumulate the accounting.
    """

    _break_even_cache: dict = {}

    def __init__(self, model: nn.Module, chooser: UnitChooser, break_even: float | str = "auto",
                 backend: str | None = None):
        self.model, self.chooser = model, chooser
        self.units: UnitMap = unit_map(model)
        self.spec = find_arch(model.config.model_type)
        self.backend = gather_backend(backend)
        self.break_even = break_even
        self.groups: list[tuple[UnitGroup, UnitGroup]] = []
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._gen_masks: list[UnitMasks] = []
        self._prompt_masks: list[UnitMasks] = []
        self._computed_sum = 0.0
        self._computed_tokens = 0
        self._computed = 0
        self._real = self._generated = None
        self._keeps = {"mlp": [None] * self.units.num_layers, "heads": [None] * self.units.num_layers}
        self._keep_buffers: dict[str, torch.Tensor] = {}  # one-token plans' keep-masks [L, K]
        self._planned = 0  # groups of this call that ran on their plan

    # -- installation --------------------------------------------------------------------------
    def _swap(self, layer: nn.Module, path: str, new_fn) -> nn.Module:
        parent, name = _parent(layer, path)
        original = getattr(parent, name)
        new = new_fn(original)
        setattr(parent, name, new)
        self._swapped.append((parent, name, original))
        return new

    def __enter__(self) -> "SparseRuntime":
        u, spec = self.units, self.spec
        if self.break_even == "auto":
            self.break_even = self._measure_break_even()
        mlps, queries, outs = [], [], []
        for l, layer in enumerate(u.layer_modules):
            mlp = UnitGroup("mlp", l, u.mlp_size, 1)
            heads = UnitGroup("heads", l, u.num_heads, u.head_dim)
            self.groups.append((mlp, heads))
            if spec.mlp_module:  # swap the whole MLP module
                act_path, gated = spec.mlp_act, spec.mlp_gated
                ins = [layer.get_submodule(p) for p in spec.mlp_in]
                down, act = layer.get_submodule(spec.mlp_down), layer.get_submodule(act_path)
                mlps.append(self._swap(layer, spec.mlp_module, lambda m, g=mlp, i=ins, d=down, a=act, gt=gated:
                                       GatheredMLP(m, g, self, i, d, a, gt)))
            else:  # MLP inlined in the decoder layer (OPT): swap its projections
                for path in spec.mlp_in:
                    out_f = linear_dims(layer.get_submodule(path))[1]
                    blocks = [Block(b * u.mlp_size, u.mlp_size, True) for b in range(out_f // u.mlp_size)]
                    self._swap(layer, path, lambda m, g=mlp, b=blocks: GatheredIn(m, g, b, self))
                self._swap(layer, spec.mlp_down, lambda m, g=mlp: GatheredOut(m, g, self))
                mlps.append(None)
            q_width = u.num_heads * u.head_dim
            out_f = linear_dims(layer.get_submodule(spec.attn_qkv[0]))[1]
            blocks = [Block(0, q_width, True)] + ([Block(q_width, out_f - q_width, False)] if out_f > q_width else [])
            queries.append(self._swap(layer, spec.attn_qkv[0], lambda m, g=heads, b=blocks: GatheredIn(m, g, b, self)))
            outs.append(self._swap(layer, spec.attn_out, lambda m, g=heads: GatheredOut(m, g, self)))
        self._prepare_one_token(mlps, queries, outs)
        return self

    def _prepare_one_token(self, mlps: list, queries: list, outs: list) -> None:
        """One-token plans (C backend, fp32/bf16 CPU weights), built once: every group gets a row of
        the keep buffers ``mlp [L, N]`` / ``heads [L, H]`` and a plan; when the chooser describes
        every group natively (:meth:`UnitChooser.native`), the C calls choose the units too."""
        u = self.units
        weight = next(self.model.parameters())
        if not (self.backend.fused and weight.dtype in SUFFIX and weight.device.type == "cpu"):
            return
        keep = self._keep_buffers = {"mlp": torch.zeros(u.num_layers, u.mlp_size, dtype=torch.bool),
                                     "heads": torch.zeros(u.num_layers, u.num_heads, dtype=torch.bool)}
        with_mlp = all(m is not None and m.code is not None for m in mlps)
        natives = [(self.chooser.native("mlp", l), self.chooser.native("heads", l)) for l in range(u.num_layers)]
        native = with_mlp and all(a is not None and b is not None for a, b in natives)
        q_rows = u.num_heads * u.head_dim
        for l, (mlp, heads) in enumerate(self.groups):
            for group, choice in zip((mlp, heads), natives[l] if native else (None, None)):
                row = keep[group.kind][l]
                extra = self._native_args(choice, row, keep["heads"][l])
                if group.kind == "heads":
                    q, o = queries[l], outs[l]
                    group.plan = self.backend.plan(row, u.head_dim, self.limit(group), w_in=q.weight_rm[:q_rows],
                                                   b_in=q.q_bias, w_out=o.weight_cm, b_out=o.bias, **extra)
                elif mlps[l] is not None and mlps[l].code is not None:
                    m = mlps[l]
                    group.plan = self.backend.plan(row, 1, self.limit(group), w_in=m.w_gate, w_up=m.w_up,
                                                   w_out=m.wt_down, b_in=m.b_gate, b_up=m.b_up, b_out=m.b_down,
                                                   act=m.code, **extra)
                group.native, group.keep_row = choice is not None, row.view(1, -1)
        if native and any(g.plan is None for pair in self.groups for g in pair):
            for pair in self.groups:  # a native choice needs every group planned
                for g in pair:
                    g.plan, g.native = None, False

    def _native_args(self, choice: NativeChoice | None, row: torch.Tensor, heads: torch.Tensor) -> dict:
        """Plan arguments of a native choice (a fixed mask is copied into the keep row once)."""
        if choice is None:
            return {}
        if choice.mask is not None:
            row.copy_(choice.mask.reshape(-1))
            return {}
        u = self.units
        budget = choice.budget.reshape(-1).long().contiguous()
        expected = (u.num_heads + 1) * (u.num_kv_heads + 1) if choice.by_heads else 1
        if budget.numel() != expected:
            raise ValueError(f"native choice budget has {budget.numel()} entries, expected {expected}")
        return {"predictor": choice.predictor(), "budget": budget,
                "heads": heads if choice.by_heads else None, "groups": u.num_kv_heads}

    def __exit__(self, *exc) -> None:
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        self._swapped.clear()
        self.groups.clear()

    def _measure_break_even(self) -> float:
        u = self.units
        dtype = next(self.model.parameters()).dtype
        key = (u.model_type, u.num_layers, u.mlp_size, u.num_heads, str(dtype), torch.get_num_threads(),
               self.backend.name)
        if key not in self._break_even_cache:
            weights = [(_row_major(layer.get_submodule(self.spec.mlp_in[0]))[: u.mlp_size].contiguous(),
                        _col_major(layer.get_submodule(self.spec.mlp_down))) for layer in u.layer_modules]
            self._break_even_cache[key] = measure_break_even(weights, self.backend)
        return self._break_even_cache[key]

    # -- per call ------------------------------------------------------------------------------
    def begin(self, real: torch.Tensor, generated: torch.Tensor) -> None:
        """Before a forward call over ``[B, q]`` tokens: ``real`` marks non-padding positions and
        ``generated`` the positions whose output is a generated token (both bool ``[B, q]``)."""
        self._real, self._generated = real.bool(), generated.bool()
        self._keeps = {"mlp": [None] * self.units.num_layers, "heads": [None] * self.units.num_layers}
        self._computed = 0
        self._planned = 0
        for mlp, heads in self.groups:
            mlp.choice.clear()
            heads.choice.clear()

    def choose(self, group: UnitGroup, hidden: torch.Tensor) -> None:
        """Ask the chooser for ``group``'s keep-mask of this call (called by the first gathered
        projection of the block): ``choice.keep [rows, K]``."""
        fn = self.chooser.choose_mlp if group.kind == "mlp" else self.chooser.choose_heads
        keep = fn(group.layer, hidden).reshape(-1, group.count)
        if keep.dtype != torch.bool:
            keep = keep.bool()
        group.choice.keep = keep.contiguous()
        self._keeps[group.kind][group.layer] = group.choice.keep

    def choose_one(self, group: UnitGroup, hidden: torch.Tensor) -> None:
        """One-token call of a planned group: its keep-mask is the plan's buffer row
        ``group.keep_row [1, K]``, filled here by the chooser unless the plan chooses natively."""
        if not group.native:
            fn = self.chooser.choose_mlp if group.kind == "mlp" else self.chooser.choose_heads
            group.keep_row.copy_(fn(group.layer, hidden).reshape(1, -1))
        self._keeps[group.kind][group.layer] = group.keep_row
        self._planned += 1

    def limit(self, group: UnitGroup) -> int:
        """Most units a gathered call may keep; above it the call runs dense (break-even)."""
        return int(float(self.break_even) * group.count)

    def resolve(self, group: UnitGroup) -> None:
        """Generic path: the union of the rows' units, and whether the call runs dense."""
        choice = group.choice
        keep = choice.keep
        idx = (keep[0] if keep.shape[0] == 1 else keep.any(0)).nonzero().squeeze(-1)
        choice.dense = idx.numel() > self.limit(group)
        choice.idx = idx
        choice.features = None if choice.dense else group.feature_index(idx)
        self.count(group, group.count if choice.dense else idx.numel())

    def count(self, group: UnitGroup, kept: int) -> None:
        """Add the parameters a call multiplies: ``kept`` units of ``group`` (keys and values of
        every key/value head with the heads; biases always)."""
        u = self.units
        if group.kind == "mlp":
            self._computed += kept * u.mlp_unit_params + u.mlp_fixed_params
        else:
            self._computed += kept * u.head_params + u.num_kv_heads * u.kv_group_params + u.attn_fixed_params

    def end(self) -> None:
        """After the forward call: keep its masks and computed parameters for the accounting."""
        b, q = self._real.shape
        if b * q == 1 and self._planned == 2 * self.units.num_layers:  # the keep buffers hold the masks
            if bool(self._real):
                generated = bool(self._generated)
                masks = UnitMasks(self._keep_buffers["mlp"].unsqueeze(0).clone(),
                                  self._keep_buffers["heads"].unsqueeze(0).clone())
                (self._gen_masks if generated else self._prompt_masks).append(masks)
                if generated:
                    self._computed_sum += self._computed
                    self._computed_tokens += 1
            return
        gen = self._real & self._generated
        prompt = self._real & ~self._generated
        mlp = torch.stack([k.reshape(b, q, -1) for k in self._keeps["mlp"]], dim=2)
        heads = torch.stack([k.reshape(b, q, -1) for k in self._keeps["heads"]], dim=2)
        for where, store in ((gen, self._gen_masks), (prompt, self._prompt_masks)):
            if bool(where.any()):
                store.append(UnitMasks(mlp[where], heads[where]))
        n_gen = int(gen.sum())
        self._computed_sum += self._computed * n_gen
        self._computed_tokens += n_gen

    @staticmethod
    def _account(masks: list[UnitMasks], units: UnitMap) -> ExecutedRatio:
        if not masks:
            return ExecutedRatio()
        return executed_ratio(UnitMasks(torch.cat([m.mlp for m in masks]), torch.cat([m.heads for m in masks])), units)

    @property
    def executed(self) -> ExecutedRatio:
        """Executed ratio of the masks at the generated-token positions."""
        return self._account(self._gen_masks, self.units)

    @property
    def prompt_executed(self) -> ExecutedRatio:
        """Executed ratio of the masks at the other (prompt) positions."""
        return self._account(self._prompt_masks, self.units)

    @property
    def computed_fraction(self) -> float:
        """Attention + MLP parameters multiplied per generated token / all of them."""
        if not self._computed_tokens:
            return float("nan")
        return self._computed_sum / self._computed_tokens / self.units.maskable_params


# -- decoding ----------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    """Greedy continuations and what they cost.

    ``tokens``: per prompt the generated ids ``[T_b]`` (ending at a stop token when one came);
    ``tokens_per_s``: generated tokens after the first, per second of decode steps (the first
    token comes from the prefill, timed in ``prefill_s``).
    """

    texts: list[str]
    tokens: list[torch.Tensor]
    mode: str
    executed: ExecutedRatio
    computed_fraction: float
    prefill_s: float
    decode_s: float
    decode_tokens: int
    prompt_executed: ExecutedRatio = field(default_factory=ExecutedRatio)
    details: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "texts": self.texts, "new_tokens": [int(t.numel()) for t in self.tokens],
                **self.executed.as_dict(), "computed_fraction": self.computed_fraction,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_tokens": self.decode_tokens, "tokens_per_s": self.tokens_per_s, **self.details}


def greedy_decode(model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int,
                  stop_ids: set[int], pad_id: int = 0, runtime: SparseRuntime | None = None) -> dict:
    """Batched greedy decoding with a ``DynamicCache`` (left padding, per-row stop), telling
    ``runtime`` which token rows of every call are real and which produce generated tokens.

    Returns ``{"tokens": [T_b] per row, "prefill_s", "decode_s", "decode_tokens"}``.
    """
    def before_call(ids, attn, done):
        real = attn[:, -ids.shape[1]:].bool() & ~done.view(-1, 1)
        generated = torch.zeros_like(real)
        generated[:, -1] = True
        runtime.begin(real, generated)

    if runtime is None:
        return greedy_loop(model, prompts, max_new_tokens, stop_ids, pad_id)
    return greedy_loop(model, prompts, max_new_tokens, stop_ids, pad_id, before_call, runtime.end)


def resolve_sparsity(sparsity, ratio, model):
    """-> ("dense", None, info) | ("static", UnitMasks, info) | ("dynamic", UnitChooser, info)
    | ("hooks", SparsityPolicy, info): what :func:`generate` runs for ``sparsity`` (a spec string,
    a policy, masks or a chooser)."""
    if sparsity is None or (isinstance(sparsity, str) and sparsity == "dense"):
        return "dense", None, {}
    if isinstance(sparsity, UnitChooser):
        return "dynamic", sparsity, {"sparsity": type(sparsity).__name__}
    if isinstance(sparsity, UnitMasks):
        return "static", sparsity, {"sparsity": "masks"}
    policy = sparsity if isinstance(sparsity, SparsityPolicy) else make_policy(str(sparsity), ratio)
    info = {"sparsity": policy.name, "ratio": policy.ratio}
    if isinstance(policy, DensePolicy):
        return "dense", None, info
    if isinstance(policy, PredictorPolicy):
        return "dynamic", policy.chooser(model), info
    if isinstance(policy, StaticPolicy):
        return "static", policy._ready(model), info
    return "hooks", policy, info


def _decode_under(model: nn.Module, policy: SparsityPolicy, prompts: list[torch.Tensor], max_new_tokens: int,
                  stop_ids: set[int], pad_id: int) -> tuple[dict, ExecutedRatio, ExecutedRatio]:
    """Greedy decoding of the stock model under ``policy.apply`` (online rules): the result of
    :func:`greedy_loop` and the executed ratios of the generated and the prompt positions."""
    units = unit_map(model)
    gen, prompt = [], []
    state = {}

    def before_call(ids, attn, done):
        real = attn[:, -ids.shape[1]:].bool() & ~done.view(-1, 1)
        state["real"], state["shape"] = real, ids.shape

    with policy.apply(model) as applied:
        def after_call():
            masks = applied.last_masks(*state["shape"])
            real = state["real"].to(masks.mlp.device)
            last = torch.zeros_like(real)
            last[:, -1] = True
            for where, store in ((real & last, gen), (real & ~last, prompt)):
                if bool(where.any()):
                    store.append(UnitMasks(masks.mlp[where], masks.heads[where]))

        res = greedy_loop(model, prompts, max_new_tokens, stop_ids, pad_id, before_call, after_call)
    return res, SparseRuntime._account(gen, units), SparseRuntime._account(prompt, units)


def _encode(tokenizer, prompts, template: str) -> list[torch.Tensor]:
    if template == "raw":
        ids = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
    else:
        resolved = resolve_template(tokenizer, template)
        ids = [encode_prompt(tokenizer, p, resolved) for p in prompts]
    if any(t.numel() == 0 for t in ids):
        raise UserError("a prompt is empty after tokenisation")
    return ids


def generate(model_or_spec, prompts, sparsity=None, *, ratio: float | None = None,
             max_new_tokens: int = 64, dtype: str | None = None, batch_size: int | None = None,
             template: str = "auto", tokenizer=None, stop_at_eos: bool = True,
             break_even: float | str = "auto", backend: str | None = None,
             truncate: str = "none") -> GenerationResult:
    """Greedy decoding under ``sparsity`` (see the module docstring).

    Args:
        model_or_spec: a model spec for :func:`attrsparse.load_model`, a ``(model, tokenizer)``
            pair, or a model (then pass ``tokenizer``).
        prompts: a string or a list of strings (or of 1-D id tensors).
        ratio: which calibrated ratio of a sparsity directory (optional when it holds one).
        batch_size: prompts decoded together (default: all at once).
        template: ``auto`` (chat template when the tokenizer has one), ``chat``, ``paper``, ``qa``
            or ``raw`` (the text as is).
        stop_at_eos: stop each row at its EOS (False: exactly ``max_new_tokens``, for benchmarks).
        truncate: a prompt that does not fit the model's context with ``max_new_tokens`` new
            tokens is refused (``"none"``) or cut on the left with a warning (``"left"``).
    """
    if isinstance(model_or_spec, (str, bytes)) or hasattr(model_or_spec, "__fspath__"):
        model, tokenizer = load_model(str(model_or_spec), dtype=dtype or "float32")
    elif isinstance(model_or_spec, tuple):
        model, tokenizer = model_or_spec
    else:
        model = model_or_spec
    model_dtype = next(model.parameters()).dtype
    if dtype is not None and parse_dtype(dtype) != model_dtype:
        raise UserError(f"the model is {str(model_dtype).removeprefix('torch.')}, not {dtype}: "
                        "load it in that dtype (or pass a model spec)")
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    single = isinstance(prompts, (str, torch.Tensor))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise UserError("no prompts given")
    if all(isinstance(p, torch.Tensor) for p in prompts):
        ids = [p.reshape(-1).long() for p in prompts]
    else:
        if tokenizer is None:
            raise UserError("text prompts need a tokenizer")
        ids = _encode(tokenizer, prompts, template)
    ids = [fit_prompt(p, model, max_new_tokens, truncate, f"prompt {i + 1}" if len(ids) > 1 else "the prompt")
           for i, p in enumerate(ids)]
    stop = stop_token_ids(tokenizer, model) if (stop_at_eos and tokenizer is not None) else set()
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    mode, what, info = resolve_sparsity(sparsity, ratio, model)
    units = unit_map(model)
    runner, runtime, computed = model, None, 1.0
    if mode == "static":
        runner = slice_model(model, what, exact_mlp=True)
        computed = maskable_params(runner) / units.maskable_params
    step = batch_size or len(ids)
    results, executed, prompt_executed = [], ExecutedRatio(), ExecutedRatio()
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    computed_sum = computed_n = 0.0
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        if mode == "dynamic":
            with SparseRuntime(model, what, break_even=break_even, backend=backend) as runtime:
                res = greedy_decode(model, chunk, max_new_tokens, stop, pad_id, runtime)
            executed = executed.add(runtime.executed)
            prompt_executed = prompt_executed.add(runtime.prompt_executed)
            computed_sum += runtime.computed_fraction * runtime.executed.tokens
            computed_n += runtime.executed.tokens
            info["break_even"] = runtime.break_even
            info["kernel_backend"] = runtime.backend.name
            info["chooser_fraction"] = what.cost_params() / units.maskable_params  # predictor weights
        elif mode == "hooks":  # an online policy on the stock model: accounted per call
            res, gen, prompt = _decode_under(model, what, chunk, max_new_tokens, stop, pad_id)
            executed, prompt_executed = executed.add(gen), prompt_executed.add(prompt)
        else:
            res = greedy_decode(runner, chunk, max_new_tokens, stop, pad_id)
            masks = what if mode == "static" else UnitMasks.dense(units)
            n = sum(t.numel() for t in res["tokens"])
            executed = executed.add(executed_ratio(UnitMasks(masks.mlp.expand(n, *masks.mlp.shape),
                                                             masks.heads.expand(n, *masks.heads.shape)), units))
        results.extend(res["tokens"])
        prefill_s += res["prefill_s"]
        decode_s += res["decode_s"]
        decode_tokens += res["decode_tokens"]
    if mode == "dynamic":
        computed = computed_sum / computed_n if computed_n else float("nan")
    texts = [tokenizer.decode(t, skip_special_tokens=True) if tokenizer is not None else "" for t in results]
    return GenerationResult(texts, results, mode, executed, computed, prefill_s, decode_s, decode_tokens,
                            prompt_executed, {**info, "dtype": str(model_dtype).removeprefix("torch."),
                                              "threads": torch.get_num_threads()})
