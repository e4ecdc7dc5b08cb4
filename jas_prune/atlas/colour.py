"""Colour check (paper Finding 4 made visible; shapes classes only): for every chosen class and
block, the activation of the class's path neuron averaged over the images of the class's colour,
against the average over the images of the other colours — on the test partition (held out from
the choice of the neuron) and on the probe partition.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..semantic import parse_attributes
from .activations import NeuronActivations

__all__ = ["colours_of", "colour_check", "colour_summary"]


def _mean_over(acts: NeuronActivations, m: int, classes: Sequence[int]) -> float | None:
    """Image-weighted mean activation of neuron ``m`` over the images of ``classes``."""
    cnt = acts.count[list(classes)].double()
    if cnt.sum() == 0:
        return None
    mean = torch.nan_to_num(acts.mean[list(classes), m].double())
    return float((mean * cnt).sum() / cnt.sum())


def colours_of(class_names: Sequence[str]) -> list[str] | None:
    """Each class's colour, or None unless every name is a shapes ``colour-shape`` name and two
    colours at least are there (the check compares a colour with the others)."""
    attrs = parse_attributes(class_names)
    if attrs is None or len({a[0] for a in attrs}) < 2:
        return None
    return [a[0] for a in attrs]


def colour_check(class_names: Sequence[str], pairs: Sequence[tuple[int, int]], held_out: NeuronActivations,
                 probe: NeuronActivations) -> list[dict[str, Any]] | None:
    """Per (class, path neuron) pair: the neuron's mean activation on images of the class's colour
    vs the other colours' (None unless every class name is a shapes ``colour-shape`` name and
    there are two colours at least).

    Args:
        pairs: (class, row of the neuron in ``held_out.neurons`` and ``probe.neurons``).

    ``*_ratio`` = same / other, only where the other colours' mean is positive (a GELU neuron's
    mean can be negative, and a ratio of such means says nothing); ``*_diff`` = same - other.
    """
    colours = colours_of(class_names)
    if colours is None:
        return None
    rows = []
    for c, m in pairs:
        colour = colours[c]
        same = [i for i, a in enumerate(colours) if a == colour]
        other = [i for i, a in enumerate(colours) if a != colour]
        n = held_out.neurons[m]
        row: dict[str, Any] = {"class": class_names[c], "neuron": str(n), "block": n.block, "colour": colour}
        for part, acts in (("test", held_out), ("probe", probe)):
            a, b = _mean_over(acts, m, same), _mean_over(acts, m, other)
            row[f"{part}_same"], row[f"{part}_other"] = a, b
            row[f"{part}_ratio"] = a / b if a is not None and b is not None and b > 0 else None
            row[f"{part}_diff"] = a - b if a is not None and b is not None else None
        rows.append(row)
    return rows


def colour_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per block: classes checked, how many have their colour's mean above the others' (test),
    how many have a defined ratio, and the median of those ratios."""
    out = {}
    for b in sorted({r["block"] for r in rows}):
        at = [r for r in rows if r["block"] == b]
        ratios = sorted(r["test_ratio"] for r in at if r["test_ratio"] is not None)
        out[str(b)] = {"classes": len(at), "same_above_other": sum(1 for r in at if (r["test_diff"] or 0) > 0),
                       "ratios": len(ratios), "median_ratio": ratios[len(ratios) // 2] if ratios else None}
    return out
