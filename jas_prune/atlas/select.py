"""Which neurons the atlas shows, and how the classes use them, read from ``paths/`` one chunk at
a time.

Pass 1 (:func:`class_path_neurons`): per chosen class and located block, how often each neuron
is on the class's paths; its most frequent neuron per block is the class's *path neuron* there
(ties: the lowest index). Held: ``[classes, L, n]`` counts, never the images.

Pass 2 (:func:`neuron_use`): for a fixed list of neurons, per class, the share of the class's
probe images whose path goes through the neuron (*frequency*) and the share of the class's total
path JAS carried by those paths (*JAS share*: ``Σ_{i ∋ neuron} |JAS_i| / Σ_i |JAS_i|`` over the
class's images). Held: ``[C, M]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import InvalidArgumentError

__all__ = ["Neuron", "parse_neurons", "class_path_neurons", "NeuronUse", "neuron_use"]

_SPEC = re.compile(r"^\s*(-?\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Neuron:
    """FFN neuron ``index`` of block ``block`` (written ``block:index``)."""

    block: int
    index: int

    def __str__(self) -> str:
        return f"{self.block}:{self.index}"


def parse_neurons(specs: Iterable[str], layers: Sequence[int], widths: Sequence[int],
                  key: str = "--neurons") -> list[Neuron]:
    """``["2:241", ...]`` -> neurons, checked against the located blocks and their widths.

    Args:
        layers: the blocks the run located (its ``paths/``); a neuron of another block has no
            path statistics and is refused.
        widths: FFN width of every block of the model (indexed by block).

    Raises:
        InvalidArgumentError: a spec that is not ``block:index``, a block the run did not locate,
            or an index beyond the block's width (naming the spec).
    """
    out: list[Neuron] = []
    for spec in specs:
        m = _SPEC.match(str(spec))
        if m is None:
            raise InvalidArgumentError(f"{key}: {spec!r} is not block:index (e.g. 0:17)")
        block, index = int(m.group(1)), int(m.group(2))
        if block < 0:
            block += len(widths)
        if block not in layers:
            raise InvalidArgumentError(f"{key}: {spec!r}: block {m.group(1)} was not located in this run "
                                       f"(located blocks: {', '.join(map(str, layers))})")
        if index >= widths[block]:
            raise InvalidArgumentError(f"{key}: {spec!r}: block {block} has {widths[block]} FFN neurons "
                                       f"(index 0..{widths[block] - 1})")
        n = Neuron(block, index)
        if n not in out:
            out.append(n)
    return out


def class_path_neurons(chunks: Iterable, method: str, classes: Sequence[int], width: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each chosen class's most frequent path neuron per located block.

    Args:
        chunks: ``PathStore.iter_chunks(..., scores=False)``.
        classes: the chosen classes (Q of them).
        width: FFN neurons per block (n).

    Returns:
        ``(top [Q, L] neuron index, freq [Q, L] share of the class's images whose path holds it,
        layers)``; a class without probe images gets index -1 and share 0.
    """
    pos = {c: q for q, c in enumerate(classes)}
    counts: torch.Tensor | None = None
    images = torch.zeros(len(classes), dtype=torch.long)
    layers: list[int] = []
    for c in chunks:
        paths, labels = c.paths[method].long(), c.labels.long()
        if counts is None:
            layers = list(c.layers)
            counts = torch.zeros(len(classes), paths.shape[1], width, dtype=torch.int32)
        q = torch.tensor([pos.get(int(l), -1) for l in labels], dtype=torch.long)
        keep = q >= 0
        if not keep.any():
            continue
        paths, q = paths[keep], q[keep]
        hit = torch.zeros(len(paths), paths.shape[1], width, dtype=torch.int32)
        hit.scatter_(2, paths, 1)  # a neuron twice in one path (K > 1 never repeats) counts once
        counts.index_add_(0, q, hit)
        images += torch.bincount(q, minlength=len(classes))
    if counts is None:
        raise InvalidArgumentError("atlas: the run has no located probe images")
    # argmax returns the first maximum: ties go to the lowest neuron index
    top = counts.argmax(dim=2)
    freq = counts.gather(2, top[:, :, None])[:, :, 0].double() / images.clamp_min(1)[:, None]
    top[images == 0] = -1
    return top, freq.float(), layers


@dataclass
class NeuronUse:
    """How every class uses a list of M neurons (pass 2).

    Attributes:
        frequency: [C, M] share of the class's probe images whose path holds the neuron.
        jas_share: [C, M] share of the class's total |path JAS| on those images' paths.
        images: [C] located probe images per class.
    """

    frequency: torch.Tensor
    jas_share: torch.Tensor
    images: torch.Tensor


def neuron_use(chunks: Iterable, method: str, neurons: Sequence[Neuron], layers: Sequence[int],
               num_classes: int) -> NeuronUse:
    """Per class, the frequency and JAS share of each of ``neurons`` on the class's paths."""
    row = {b: j for j, b in enumerate(layers)}
    blocks = torch.tensor([row[n.block] for n in neurons], dtype=torch.long)
    index = torch.tensor([n.index for n in neurons], dtype=torch.long)
    hits = torch.zeros(num_classes, len(neurons), dtype=torch.float64)
    jas_hits = torch.zeros(num_classes, len(neurons), dtype=torch.float64)
    jas_total = torch.zeros(num_classes, dtype=torch.float64)
    images = torch.zeros(num_classes, dtype=torch.long)
    for c in chunks:
        paths, labels = c.paths[method].long(), c.labels.long()
        jas = c.jas[method].double().abs()
        on = (paths[:, blocks, :] == index[None, :, None]).any(dim=2).double()  # [b, M]
        hits.index_add_(0, labels, on)
        jas_hits.index_add_(0, labels, on * jas[:, None])
        jas_total.index_add_(0, labels, jas)
        images += torch.bincount(labels, minlength=num_classes)
    frequency = hits / images.clamp_min(1)[:, None]
    share = torch.where(jas_total[:, None] > 0, jas_hits / jas_total.clamp_min(1e-300)[:, None], frequency)
    return NeuronUse(frequency.float(), share.float(), images)
