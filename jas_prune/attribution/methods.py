"""The registry of attribution methods (:data:`METHODS`); the built-in ones (JAS and the paper's
baselines) are defined and registered in :mod:`.builtin`.

A method yields the per-unit scores ``[B, n]`` of each located site (block, and FFN neurons or
attention heads: :mod:`.sites`) in forward order; the engine
keeps the top-K of each as the path, *before* asking for the next block, so a layer-progressive
method (JAS) sees the path found so far in ``st.path``. Every method's paths are then scored with
the same JAS (``LocateResult.jas``), so Table 1 compares them on one scale.

Adding a method: write a function ``(engine, st) -> Iterator[Tensor]`` in :mod:`.builtin` and register an
:class:`AttributionMethod` for it; the recipe's ``attribution.method``, the CLI help, the report's
labels and colours read :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..registry import Registry

__all__ = ["AttributionMethod", "METHODS"]


@dataclass(frozen=True)
class AttributionMethod:
    """One way to find neuron paths.

    Attributes:
        name: the recipe's ``attribution.method`` value.
        label: display name in the report and figures.
        colour: matplotlib colour, the same in every figure.
        summary: one line for the CLI help and the docs.
        layer_scores: ``(engine, pass) -> iterator`` of ``[B, n]`` scores per located block
            (a :class:`~.engine.JointAttribution` and its :class:`~.engine.Pass`; this module
            sits below the engine, so it does not name their types).
    """

    name: str
    label: str
    colour: str
    summary: str
    layer_scores: Callable[[Any, Any], Iterator[Tensor]]


METHODS: Registry[AttributionMethod] = Registry("attribution method")
