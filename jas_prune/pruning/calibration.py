"""Calibration data for reconstruction and the class subsets of class-specialised studies.

- :func:`per_class_cap`: the first N samples of each class (calibration images from the probe
  partition, ``prune.calibration.images_per_class``);
- :func:`cached_batches`: a loader's batches held in memory when they are small, so that one
  rendering or decoding pass serves every pruned model of a run (the pipeline evaluates and
  reconstructs dozens of models on the same images);
- :func:`draw_class_subsets`: ``prune.class_subsets`` — distinct random class subsets drawn from
  the run's seed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
import torch

from ..errors import InvalidArgumentError

__all__ = ["per_class_cap", "cached_batches", "draw_class_subsets", "CACHE_LIMIT_BYTES"]

T = TypeVar("T")

#: batches are held in memory up to this many bytes of tensors (else the loader is read again)
CACHE_LIMIT_BYTES = 1 << 30


def per_class_cap(samples: Sequence[T], cap: int | None, label: Any = lambda s: s.label) -> list[T]:
    """The first ``cap`` samples of each class, in the given order (all when ``cap`` is None)."""
    if cap is None:
        return list(samples)
    seen: dict[int, int] = {}
    out = []
    for s in samples:
        c = int(label(s))
        if seen.get(c, 0) < cap:
            seen[c] = seen.get(c, 0) + 1
            out.append(s)
    return out


def _nbytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, (tuple, list)):
        return sum(_nbytes(b) for b in batch)
    return 0


def cached_batches(loader: Iterable, limit_bytes: int = CACHE_LIMIT_BYTES) -> Iterable:
    """The loader's batches as a list when they fit in ``limit_bytes``, else the loader itself
    (read again by every use). Reads the loader once either way while trying."""
    out: list[Any] = []
    size = 0
    for batch in loader:
        size += _nbytes(batch)
        if size > limit_bytes:
            return loader
        out.append(batch)
    return out


def draw_class_subsets(num_classes: int, count: int, size: int, seed: int) -> list[list[int]]:
    """``count`` distinct subsets of ``size`` classes (each sorted), drawn from ``seed``.

    The same (num_classes, count, size, seed) always gives the same subsets, in the same order;
    a larger ``count`` extends the list without changing its first subsets.

    Raises:
        InvalidArgumentError: ``size`` above ``num_classes``, or more subsets than exist.
    """
    if not 1 <= size <= num_classes:
        raise InvalidArgumentError(f"prune.class_subsets.size: {size} is not between 1 and the "
                                   f"{num_classes} classes of the data set")
    if count > math.comb(num_classes, size):
        raise InvalidArgumentError(f"prune.class_subsets.count: {count} distinct subsets of {size} of "
                                   f"{num_classes} classes do not exist ({math.comb(num_classes, size)} do)")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 0xC1A55, int(size)]))
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < count:
        s = tuple(sorted(int(c) for c in rng.choice(num_classes, size=size, replace=False)))
        if s not in seen:
            seen.add(s)
            out.append(list(s))
    return out
