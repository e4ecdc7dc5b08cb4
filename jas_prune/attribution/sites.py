"""Where the engine reads and scales units: one *site* per (block, unit kind).

An FFN site is the neuron vector (the output of ``FFNLayer.act``, one channel per unit). A head
site is the concatenated head outputs entering the attention output projection (the input of
``HeadLayer.proj``): ``H`` units of ``d`` channels each. The engine works on channels (it clamps
and differentiates the site tensor) and on units (it scores, ranks and keeps paths of units); a
:class:`SiteOps` maps between the two.

**A head as a unit.** Scaling head ``h`` by ``α`` multiplies its ``d`` channels by ``α``, so the
derivative of F with respect to that scale is ``⟨v_h, g_h⟩`` (``g_h = ∂F/∂v_h``). The head's
*value* ``v̄_h`` is the norm ``‖v_h‖`` and its *gradient* the derivative along its own clean
direction ``⟨v_h/‖v_h‖, g_h⟩`` (summed over token positions for ``scope: all``), so that
``v̄·g = ⟨v, g⟩`` as for a neuron, and the ``paper`` and ``ig`` formulas read exactly as for FFN
neurons. An FFN neuron is the case ``d = 1`` with direction 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Site", "SiteOps", "HEADS", "FFN"]

HEADS, FFN = 0, 1  # the order of the unit kinds inside a block (attention runs first)
_KIND = {HEADS: "heads", FFN: "ffn"}


@dataclass(frozen=True, order=True)
class Site:
    """A (block, unit kind) pair; sorts in forward order (block, then heads before FFN)."""

    block: int
    slot: int = FFN

    @property
    def kind(self) -> str:
        return _KIND[self.slot]


@dataclass(frozen=True)
class SiteOps:
    """How to reach one site's units.

    Attributes:
        site: the site.
        module: ``FFNLayer.act`` (forward output) or ``HeadLayer.proj`` (forward input).
        units: number of units ``n``.
        group: channels per unit (1 for FFN neurons, ``head_dim`` for heads).
    """

    site: Site
    module: nn.Module
    units: int
    group: int = 1

    @property
    def grouped(self) -> bool:
        """Heads: several channels per unit, scored along their direction."""
        return self.site.slot == HEADS

    def hook(self, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
        """Run ``fn`` on the site tensor ``[B, T, C]`` in every forward; a returned tensor replaces it."""
        if self.site.slot == FFN:
            return self.module.register_forward_hook(lambda _m, _i, out: fn(out))

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            new = fn(args[0])
            return None if new is None else (new,) + tuple(args[1:])

        # first among the projection's pre-hooks: the engine's forward-mode wrapper of nn.Linear
        # must see the replaced input
        return self.module.register_forward_pre_hook(pre, prepend=True)

    # -- channels <-> units ------------------------------------------------------------------
    def expand(self, per_unit: Tensor) -> Tensor:
        """``[..., n]`` per unit -> ``[..., n·group]`` per channel."""
        return per_unit if not self.grouped else per_unit.repeat_interleave(self.group, dim=-1)

    def unit_sum(self, per_channel: Tensor) -> Tensor:
        """``[..., n·group]`` -> ``[..., n]``: each unit's channels summed."""
        if not self.grouped:
            return per_channel
        return per_channel.unflatten(-1, (self.units, self.group)).sum(-1)

    def norms(self, clean: Tensor) -> Tensor:
        """Each unit's value per position: ``‖v_h‖`` (heads) or ``v`` itself (neurons)."""
        if not self.grouped:
            return clean
        return clean.unflatten(-1, (self.units, self.group)).norm(dim=-1)

    def direction(self, clean: Tensor) -> Tensor | None:
        """Per channel, the unit's clean direction ``v_h/‖v_h‖`` (0 where the head is 0); None
        for neurons (direction 1)."""
        if not self.grouped:
            return None
        n = self.expand(self.norms(clean))
        return torch.where(n > 0, clean / n.clamp_min(torch.finfo(clean.dtype).tiny), torch.zeros_like(clean))
