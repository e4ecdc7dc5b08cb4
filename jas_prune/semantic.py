"""Semantic check of the class-similarity matrix (paper Finding 4) on data whose truth is known.

On the built-in ``shapes`` data every class is a shape × colour pair (``red-circle``, or
``07-red-circle`` as an ImageFolder name). If neuron paths carry semantics, classes that share
an attribute should have more similar paths than classes that share nothing. This module
measures that from the similarity matrix alone (no model): the mean similarity of class pairs
sharing the shape only, the colour only, or nothing, and the ROC AUC (Mann–Whitney U) of
"shares an attribute" against "shares nothing".
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from . import shapes

__all__ = ["summarise_groups", "parse_attributes", "mann_whitney_auc", "pair_groups", "semantic_check", "GROUPS"]

#: Pair groups, in display order: (key, label).
GROUPS: tuple[tuple[str, str], ...] = (
    ("shape_only", "same shape, other colour"),
    ("colour_only", "same colour, other shape"),
    ("none", "nothing shared"),
)

_PREFIX = re.compile(r"^\d+-")


def parse_attributes(class_names: Sequence[str]) -> list[tuple[str, str]] | None:
    """``(colour, shape)`` of every class name, or None when any name is not a shapes class.

    Accepts ``red-circle`` and the ImageFolder form ``07-red-circle``.
    """
    out = []
    for name in class_names:
        colour, sep, shape = _PREFIX.sub("", str(name)).partition("-")
        if not sep or colour not in shapes.COLOURS or shape not in shapes.SHAPES:
            return None
        out.append((colour, shape))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def mann_whitney_auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """ROC AUC of scoring positives above negatives: P(pos > neg) + ½ P(pos = neg).

    Returns None when either side is empty.
    """
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    ranks = _ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def pair_groups(similarity: Any, class_names: Sequence[str], valid: Any = None) -> dict[str, np.ndarray] | None:
    """Similarities of the unordered class pairs (i < j), split by what the two classes share.

    Args:
        similarity: [C, C] class similarity.
        class_names: C names.
        valid: optional [C] bool; classes marked False (e.g. without probe images) are left out.

    Returns:
        ``{"shape_only": ..., "colour_only": ..., "none": ...}`` arrays, or None when the names
        do not parse as shapes classes.
    """
    attrs = parse_attributes(class_names)
    if attrs is None:
        return None
    sim = np.asarray(similarity, dtype=np.float64)
    n = len(attrs)
    if sim.shape != (n, n):
        raise ValueError(f"similarity has shape {sim.shape}, expected ({n}, {n}) for {n} class names")
    keep = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    colour = np.array([a[0] for a in attrs])
    shape = np.array([a[1] for a in attrs])
    i, j = np.triu_indices(n, k=1)
    ok = keep[i] & keep[j]
    i, j = i[ok], j[ok]
    same_c, same_s = colour[i] == colour[j], shape[i] == shape[j]
    values = sim[i, j]
    return {"shape_only": values[same_s & ~same_c], "colour_only": values[same_c & ~same_s],
            "none": values[~same_c & ~same_s]}


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def semantic_check(similarity: Any, class_names: Sequence[str], valid: Any = None) -> dict[str, Any] | None:
    """Finding 4 on shape × colour classes.

    Args:
        similarity: [C, C] class similarity (``masks.similarity``).
        class_names: C names such as ``red-circle``.
        valid: optional [C] bool of classes to use (e.g. ``masks.counts > 0``).

    Returns:
        ``mean`` (per group of :data:`GROUPS`), ``pairs`` (counts per group), ``auc`` ("shares an
        attribute" vs "shares nothing"), ``auc_shape`` and ``auc_colour`` (each group alone vs
        "shares nothing"); None for names that are not shapes classes.
    """
    groups = pair_groups(similarity, class_names, valid)
    return None if groups is None else summarise_groups(groups)


def summarise_groups(groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """:func:`semantic_check`'s figures from the pair similarities of :func:`pair_groups`."""
    shared = np.concatenate([groups["shape_only"], groups["colour_only"]])
    return {
        "mean": {k: _mean(groups[k]) for k, _ in GROUPS},
        "pairs": {k: int(groups[k].size) for k, _ in GROUPS},
        "auc": mann_whitney_auc(shared, groups["none"]),
        "auc_shape": mann_whitney_auc(groups["shape_only"], groups["none"]),
        "auc_colour": mann_whitney_auc(groups["colour_only"], groups["none"]),
    }
