"""One streamed pass of images through the model, for a fixed list of neurons.

For every neuron it keeps, batch by batch: the k images that activate it most (a running top-k:
value, position in the sample list, and the neuron's activation at every patch token of that
image, the heatmap), and per class the count, sum, sum of squares, minimum and maximum of its
activation. Held: ``[M, k, patches]`` plus ``[C, M]`` moments and one batch of the neurons'
columns of the hidden: the images' number does not matter.

The activation of a neuron on an image follows the run's attribution scope
(:func:`jas_prune.neurons.read_scope`): ``cls`` its value at the class token, ``all`` its mean
over every token position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..data import Sample, make_loader
from ..models import discover_ffn
from ..neurons import check_scope, hook_hidden, read_scope
from ..torchutil import frozen_eval, model_device, model_dtype
from .select import Neuron

__all__ = ["NeuronActivations", "neuron_activations", "patch_grid", "scoped"]


def scoped(hidden: Tensor, scope: str) -> Tensor:
    """``[B, T, m]`` hidden columns -> ``[B, m]`` activation per image under the scope."""
    h = read_scope(hidden, scope)
    return h if scope == "cls" else h.mean(dim=1)


def patch_grid(model: nn.Module, patches: int) -> tuple[int, int]:
    """(rows, columns) of the patch tokens: the patch embedding's grid when it has one that fits,
    else a square, else one row."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(patches)
    return (side, side) if side * side == patches else (1, patches)


@dataclass
class NeuronActivations:
    """What the pass kept for M neurons over N images of C classes.

    Attributes:
        neurons: the M neurons, in the order of every ``M`` axis.
        scope: ``cls`` or ``all`` (how an image's activation is read).
        top_values: [M, k] activation of the top images, highest first (-inf where fewer than k).
        top_positions: [M, k] their positions in the sample list (-1 where fewer than k).
        top_maps: [M, k, rows, cols] the neuron's activation at every patch token of those images.
        count, mean, std, min, max: [C] and [C, M] per-class moments (NaN for a class without images).
        grid: (rows, cols) of the patch tokens.
        images: N.
    """

    neurons: list[Neuron]
    scope: str
    top_values: Tensor
    top_positions: Tensor
    top_maps: Tensor
    count: Tensor
    mean: Tensor
    std: Tensor
    min: Tensor
    max: Tensor
    grid: tuple[int, int]
    images: int

    def state_bytes(self) -> int:
        """Bytes of everything held (the pass's memory apart from one batch and the model)."""
        return sum(t.element_size() * t.numel() for t in (self.top_values, self.top_positions, self.top_maps,
                                                           self.count, self.mean, self.std, self.min, self.max))


class _RunningTopK:
    """Per neuron the k largest values seen, ties to the earlier position (stable merge)."""

    def __init__(self, m: int, k: int, patches: int):
        self.values = torch.full((m, k), -math.inf, dtype=torch.float64)
        self.positions = torch.full((m, k), -1, dtype=torch.long)
        self.maps = torch.zeros(m, k, patches, dtype=torch.float32)
        self.k = k

    def add(self, values: Tensor, positions: Tensor, maps: Tensor) -> None:
        """``values`` [B, M], ``positions`` [B], ``maps`` [B, patches, M] of one batch."""
        m = values.shape[1]
        vals = torch.cat([self.values, values.double().T], dim=1)  # kept first: earlier positions
        pos = torch.cat([self.positions, positions[None, :].expand(m, -1)], dim=1)
        mp = torch.cat([self.maps, maps.permute(2, 0, 1).float()], dim=1)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = vals.gather(1, order)
        self.positions = pos.gather(1, order)
        self.maps = mp.gather(1, order[:, :, None].expand(-1, -1, mp.shape[2]))


class _ClassMoments:
    """Per class and neuron: count, sum, sum of squares, min, max (float64)."""

    def __init__(self, num_classes: int, m: int):
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.sum = torch.zeros(num_classes, m, dtype=torch.float64)
        self.sumsq = torch.zeros(num_classes, m, dtype=torch.float64)
        self.min = torch.full((num_classes, m), math.inf, dtype=torch.float64)
        self.max = torch.full((num_classes, m), -math.inf, dtype=torch.float64)

    def add(self, values: Tensor, labels: Tensor) -> None:
        v = values.double()
        self.count.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        self.sum.index_add_(0, labels, v)
        self.sumsq.index_add_(0, labels, v * v)
        idx = labels[:, None].expand_as(v)
        self.min.scatter_reduce_(0, idx, v, reduce="amin")
        self.max.scatter_reduce_(0, idx, v, reduce="amax")

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = self.count[:, None]
        mean = self.sum / n.clamp_min(1)
        var = (self.sumsq / n.clamp_min(1) - mean * mean).clamp_min(0)
        none = (self.count == 0)[:, None].expand_as(mean)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return tuple(torch.where(none, nan, t).float() for t in (mean, var.sqrt(), self.min, self.max))  # type: ignore


@torch.no_grad()
def neuron_activations(model: nn.Module, samples: Sequence[Sample], transform: Any, neurons: Sequence[Neuron], *,
                       scope: str, num_classes: int, k: int = 6, batch_size: int = 64, seed: int = 0,
                       workers: int = 0) -> NeuronActivations:
    """Stream ``samples`` through ``model`` once and keep, for every neuron, its top-k images with
    their patch maps and its per-class activation moments.

    Args:
        samples: the images (positions in this list are what ``top_positions`` holds).
        transform: the model's eval preprocessing.
        scope: ``cls`` (class token) or ``all`` (mean over tokens), as the run's attribution.
        seed: the shapes data seed (``runtime.seed``).
    """
    info = discover_ffn(model)
    check_scope(info, scope, key="attribution.scope")
    neurons = list(neurons)
    blocks = sorted({n.block for n in neurons})
    cols = {b: torch.tensor([n.index for n in neurons if n.block == b]) for b in blocks}
    # position of each neuron in the concatenation of the blocks' columns, back in ``neurons`` order
    flat = [n for b in blocks for n in neurons if n.block == b]
    order = torch.tensor([flat.index(n) for n in neurons], dtype=torch.long)
    prefix = info.num_prefix_tokens
    seen: dict[int, Tensor] = {}

    def keep(b: int):
        def fn(h: Tensor) -> None:
            seen[b] = h[:, :, cols[b].to(h.device)].detach().float().cpu()

        return fn

    top: _RunningTopK | None = None
    moments = _ClassMoments(num_classes, len(neurons))
    dev, dtype = model_device(model), model_dtype(model)
    n_images, grid = 0, (1, 1)
    loader = make_loader(samples, transform, batch_size=batch_size, workers=workers, seed=seed)
    with frozen_eval(model), hook_hidden(model, {b: keep(b) for b in blocks}, info):
        for x, labels, positions in loader:
            seen.clear()
            model(x.to(device=dev, dtype=dtype))
            hidden = torch.cat([seen[b] for b in blocks], dim=2)[:, :, order]  # [B, T, M]
            values = scoped(hidden, scope)  # [B, M]
            maps = hidden[:, prefix:, :]  # [B, patches, M]
            if top is None:
                grid = patch_grid(model, maps.shape[1])
                top = _RunningTopK(len(neurons), k, maps.shape[1])
            top.add(values, positions.long(), maps)
            moments.add(values, labels.long())
            n_images += len(labels)
    if top is None:
        from ..errors import DataError

        raise DataError("atlas: no probe images to read")
    mean, std, lo, hi = moments.finish()
    return NeuronActivations(neurons=neurons, scope=scope, top_values=top.values.float(),
                             top_positions=top.positions,
                             top_maps=top.maps.reshape(len(neurons), k, *grid), count=moments.count.long(),
                             mean=mean, std=std, min=lo, max=hi, grid=grid, images=n_images)
