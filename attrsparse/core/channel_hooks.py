"""Forward hooks that sparsify the input channels of every decoder-layer linear (its sites).

:class:`ChannelHooks` puts a pre-hook on every consumer of every site (:mod:`.sites`): each call's
input goes through the rule's :meth:`ChannelRule.transform`, which returns the input the consumer
really sees (dropped channels set to their fill value, 0 by default) and the weights it read for
every token row. A consumer whose rule adds a term to its output (R-Sparse's low-rank path of the
dropped part) gets a forward hook too. Shared inputs (q/k/v, gate/up) reach every consumer as the
same tensor, so a rule decides once per site and call and its consumers reuse the decision.

Setting a dropped channel to a fill value ``f_j`` is exactly the compensation of the channel-sparsity
literature: ``W x' = sum_{j kept} W[:, j] (x_j - f_j) + W f``, and ``W f`` is a bias computed once,
so a skipped channel still reads no weight column.

The hooks count, per forward call, the weights every token row read over all sites (``read``,
``[rows]`` in the order of the call's flattened leading dims); :class:`~.accounting.ReadRatio` turns
them into read ratios.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .sites import SITE_NAMES, site_map


class ChannelRule:
    """What decides a site's channels; subclasses live in :mod:`attrsparse.selectors.channels`."""

    def transform(self, layer: int, site: str, consumer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., in]`` -> (the input consumer ``consumer`` sees, weights it read per row ``[...]``)."""
        raise NotImplementedError

    def extra(self, layer: int, site: str, consumer: int, x: torch.Tensor) -> torch.Tensor | None:
        """A term added to the consumer's output (None: nothing); ``x`` is the original input."""
        return None

    def keep(self, layer: int, site: str, consumer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The channels of ``x`` the consumer reads (bool ``[..., in]``); None: all of them."""
        return None

    def fill(self, layer: int, site: str) -> torch.Tensor | None:
        """The value a dropped channel of the site stands for (None: 0)."""
        return None

    @contextmanager
    def live_state(self, model: nn.Module) -> Iterator[None]:
        """State the rule reads during a pass (e.g. captured activations); default: none."""
        yield None


class ChannelHooks:
    """Pre-hooks on the consumers of every decoder-layer site, driven by a :class:`ChannelRule`.

    ``read`` holds the weights read per token row of the last forward call (reset by the model's
    own pre-hook at the start of every call). With ``gathered=True`` (slow; tests) every consumer's
    output is recomputed from the kept columns alone, one token row at a time, plus the bias
    ``W f`` of the dropped channels' fill computed when the hooks are installed: weights of skipped
    channels are then never read, so they may be anything (NaN included).
    """

    def __init__(self, model: nn.Module, rule: ChannelRule, gathered: bool = False):
        self.model, self.rule, self.gathered = model, rule, gathered
        self._comp: dict = {}
        self.sites = site_map(model)
        self.read: torch.Tensor | None = None
        self._handles: list = []

    def _pre(self, layer: int, site: str, consumer: int):
        def hook(module, args):
            x = args[0]
            new, read = self.rule.transform(layer, site, consumer, x)
            read = read.reshape(-1).to(torch.float64)
            self.read = read if self.read is None else self.read + read
            return (new,) + tuple(args[1:])
        return hook

    def _post(self, layer: int, site: str, consumer: int):
        def hook(module, args, output):
            x = getattr(module, "_attrsparse_channel_input", None)
            if x is None:
                return output
            if self.gathered:
                output = self._gather(module, layer, site, consumer, x, output)
            extra = self.rule.extra(layer, site, consumer, x)
            return output if extra is None else output + extra.to(output.dtype)
        return hook

    def _gather(self, module, layer, site, consumer, x, output):
        keep = self.rule.keep(layer, site, consumer, x)
        if keep is None:
            return output
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # [out, in]
        fill = self.rule.fill(layer, site)
        shifted = x if fill is None else x - fill.to(x.dtype)
        rows, keep = shifted.reshape(-1, x.shape[-1]), keep.reshape(-1, x.shape[-1])
        out = torch.stack([weight[:, k] @ r[k] for r, k in zip(rows, keep)])  # kept columns only
        out = out + self._comp[(layer, site, consumer)]
        return out.reshape(*x.shape[:-1], -1).to(output.dtype)

    def _compensation(self) -> None:
        """``W f + b`` of every consumer, before any weight could be poisoned (gathered mode)."""
        for l, layer in enumerate(self.sites.layers):
            for name in SITE_NAMES:
                fill = self.rule.fill(l, name)
                for c, module in enumerate(layer[name].modules):
                    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
                    comp = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                    if fill is not None:
                        comp = weight @ fill.to(weight.dtype)
                    if getattr(module, "bias", None) is not None:
                        comp = comp + module.bias
                    self._comp[(l, name, c)] = comp.detach()

    def _keep_input(self, module, args):
        module._attrsparse_channel_input = args[0]

    def install(self) -> "ChannelHooks":
        def reset(module, args, kwargs):
            self.read = None

        self._handles.append(self.model.register_forward_pre_hook(reset, with_kwargs=True))
        if self.gathered:
            self._compensation()
        for l, layer in enumerate(self.sites.layers):
            for name in SITE_NAMES:
                for c, module in enumerate(layer[name].modules):
                    if self.gathered or getattr(self.rule, "adds_output", False):
                        self._handles.append(module.register_forward_pre_hook(self._keep_input))
                        self._handles.append(module.register_forward_hook(self._post(l, name, c)))
                    self._handles.append(module.register_forward_pre_hook(self._pre(l, name, c)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.sites.layers:
            for site in layer.values():
                for module in site.modules:
                    module.__dict__.pop("_attrsparse_channel_input", None)

    def __enter__(self) -> "ChannelHooks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
