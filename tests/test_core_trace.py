"""One-pass gradients (attrsparse.core.trace) against the step-by-step reference and finite differences.

Semantics under test (paper §5.4): for target token t, ``loss_t = CE(logits at the step that
predicts target[t], target[t])`` in incremental decoding, the keys/values of earlier positions
being constants from the cache; ``g = d loss_t / d x`` for the unit outputs ``x`` of that step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS
from transformers import DynamicCache

from attrsparse import trace_gradients, unit_map
from attrsparse.core.hooks import capture_units
from attrsparse.core.reference import reference_trace

PROMPTS = {1: [1], 5: [1, 5, 9, 17, 33]}
TARGET = [7, 8, 40, 3, 11, 12]
FIELDS = ("mlp_x", "mlp_g", "head_x", "head_g", "losses")


def _assert_trace_close(a, b, atol=1e-5, rtol=1e-5):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("prompt_len", [1, 5])
@pytest.mark.parametrize("name", ARCHS)
def test_one_pass_equals_reference(make_tiny, name, prompt_len):
    model = make_tiny(name)
    units = unit_map(model)
    prompt = torch.tensor(PROMPTS[prompt_len])
    target = torch.tensor(TARGET)
    fast = trace_gradients(model, prompt, target).row(0)
    t, l, n, h, d = len(TARGET), units.num_layers, units.mlp_size, units.num_heads, units.head_dim
    assert fast.mlp_x.shape == (t, l, n) and fast.head_g.shape == (t, l, h, d)
    assert fast.losses.shape == (t,)
    assert fast.mlp_g.abs().max() > 1e-3 and fast.head_g.abs().max() > 1e-3  # non-trivial
    _assert_trace_close(fast, reference_trace(model, prompt, target))
    _assert_trace_close(fast, reference_trace(model, prompt, target, per_layer=True))


def test_batched_rows_are_identical(make_tiny):
    model = make_tiny("llama")
    one = trace_gradients(model, PROMPTS[5], TARGET)
    two = trace_gradients(model, PROMPTS[5], TARGET, rows=2)
    for name in FIELDS:
        torch.testing.assert_close(getattr(two, name)[1], getattr(one, name)[0], atol=1e-6, rtol=1e-6)


def test_gemma_sliding_window_is_exercised(make_tiny):
    """The tiny Gemma's window (3) is shorter than the traced sequence, so it changes the losses."""
    model = make_tiny("gemma3_text")
    assert model.config.sliding_window < len(PROMPTS[5]) + len(TARGET) - 1
    windowed = trace_gradients(model, PROMPTS[5], TARGET).losses
    model.config.sliding_window = 64
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 64 if layer.self_attn.sliding_window else None
    try:
        full = trace_gradients(model, PROMPTS[5], TARGET).losses
    finally:
        model.config.sliding_window = 3
    assert (windowed - full).abs().max() > 1e-3


@pytest.mark.parametrize("name", ARCHS)
def test_per_token_gradient_equals_plain_autograd(make_tiny, name):
    """g_t equals d loss_t / d x_t in a plain teacher-forced pass (one backward per token):
    x_t reaches loss_t only through position t's own computation."""
    model = make_tiny(name)
    prompt, target = torch.tensor(PROMPTS[5]), torch.tensor(TARGET)
    fast = trace_gradients(model, prompt, target).row(0)
    ids = torch.cat([prompt, target[:-1]]).unsqueeze(0)
    p = prompt.numel()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture_units(model) as cap:
        logits = model(inputs_embeds=emb).logits[0]
        mlp, heads = list(cap.mlp_inputs), list(cap.head_inputs)
    for t in range(len(TARGET)):
        loss = F.cross_entropy(logits[p - 1 + t].float().unsqueeze(0), target[t:t + 1])
        grads = torch.autograd.grad(loss, mlp + heads, retain_graph=True)
        mlp_g = torch.stack([g[0, p - 1 + t] for g in grads[: len(mlp)]])
        head_g = torch.stack([g[0, p - 1 + t] for g in grads[len(mlp):]])
        torch.testing.assert_close(fast.mlp_g[t], mlp_g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.head_g[t], head_g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.losses[t], loss, atol=1e-5, rtol=1e-5)


# -- finite differences in the incremental-decoding semantics -----------------------------------

def incremental_loss(model, prompt, target, t, kind=None, layer=0, channel=0, delta=0.0):
    """loss_t by incremental decoding with a DynamicCache (prefill ``prompt[:-1]`` dense, then one
    token per step); at step t only, ``delta`` is added to channel ``channel`` of layer ``layer``'s
    down-projection input (kind "mlp") or output-projection input (kind "head")."""
    units = unit_map(model)
    module = (units.down_modules if kind == "mlp" else units.out_modules)[layer]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if len(prompt) > 1:
            model(input_ids=torch.tensor([prompt[:-1]]), cache=cache, use_cache=True)
        tokens = [prompt[-1]] + list(target[:t])
        for step, token in enumerate(tokens):
            handle = None
            if step == t and kind is not None:
                def add(mod, args):
                    x = args[0].clone()
                    x[..., channel] += delta
                    return (x,) + tuple(args[1:])
                handle = module.register_forward_pre_hook(add)
            try:
                logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            finally:
                if handle is not None:
                    handle.remove()
    return F.cross_entropy(logits[0, -1:].double(), torch.tensor([target[t]])).item()


def exact_float64(model):
    """Make a float64 model float64 throughout, so central differences are accurate to ~1e-9:
    eager attention takes its softmax in float32 (use SDPA), and the RMSNorms of Llama, Qwen2,
    Gemma3 and Phi3 compute in float32 (replace their forward, on this instance only)."""
    model.set_attn_implementation("sdpa")
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            scale = (lambda m: 1.0 + m.weight) if name.startswith("Gemma") else (lambda m: m.weight)

            def forward(x, m=module, eps=eps, scale=scale):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale(m)
            module.forward = forward
    return model


@pytest.mark.parametrize("name, kind, prompt_len", [
    (a, k, 5) for a in ARCHS for k in ("mlp", "head")] + [("llama", "mlp", 1), ("llama", "head", 1)])
def test_gradients_equal_central_finite_differences(make_tiny, name, kind, prompt_len):
    model = exact_float64(make_tiny(name, dtype=torch.float64))
    units = unit_map(model)
    prompt, target = PROMPTS[prompt_len], TARGET
    trace = trace_gradients(model, torch.tensor(prompt), torch.tensor(target)).row(0)
    # loss_t of the fast path equals the incremental loss with no perturbation
    for t in (0, 3):
        assert trace.losses[t].item() == pytest.approx(incremental_loss(model, prompt, target, t), abs=1e-5)
    eps = 1e-4
    gen = torch.Generator().manual_seed(0)
    for t in (0, 5):
        for layer in range(units.num_layers):
            if kind == "mlp":
                g = trace.mlp_g[t, layer]  # [N]
                picks = [int(g.abs().argmax()), int(torch.randint(units.mlp_size, (1,), generator=gen))]
                flat = g
            else:
                flat = trace.head_g[t, layer].reshape(-1)  # [H*D], channel = h*D + d
                picks = [int(flat.abs().argmax()), int(torch.randint(flat.numel(), (1,), generator=gen))]
            for ch in picks:
                up = incremental_loss(model, prompt, target, t, kind, layer, ch, eps)
                down = incremental_loss(model, prompt, target, t, kind, layer, ch, -eps)
                fd = (up - down) / (2 * eps)
                # the trace is float32; FD in float64 is accurate to ~1e-8
                assert flat[ch].item() == pytest.approx(fd, abs=2e-5, rel=1e-4), (t, layer, ch)


def test_bf16_trace_runs_and_is_close_to_fp32(make_tiny):
    """bf16 is a speed option: same shapes, scores close to fp32 (loose bf16 tolerance)."""
    model = make_tiny("llama")
    prompt, target = torch.tensor(PROMPTS[5]), torch.tensor(TARGET)
    exact = trace_gradients(model, prompt, target).row(0)
    low = trace_gradients(model.to(torch.bfloat16), prompt, target).row(0)
    assert low.mlp_g.dtype == torch.float32 and low.mlp_g.shape == exact.mlp_g.shape
    rel = (low.mlp_g - exact.mlp_g).norm() / exact.mlp_g.norm()
    assert rel < 0.1
    torch.testing.assert_close(low.losses, exact.losses, atol=0.1, rtol=0.05)
