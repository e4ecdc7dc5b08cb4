"""Attribution methods: JAS and the paper's baselines, each one registered definition.

A method yields the per-neuron scores ``[B, n]`` of each located block in layer order; the engine
keeps the top-K of each as the path, *before* asking for the next block, so a layer-progressive
method (JAS) sees the path found so far in ``st.path``. Every method's paths are then scored with
the same JAS (``LocateResult.jas``), so Table 1 compares them on one scale.

Adding a method: write a function ``(engine, st) -> Iterator[Tensor]`` here and register an
:class:`AttributionMethod` for it; the recipe's ``attribution.method``, the CLI help, the report's
labels and colours read :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .engine import JointAttribution, Pass

__all__ = ["AttributionMethod", "METHODS"]


@dataclass(frozen=True)
class AttributionMethod:
    """One way to find neuron paths.

    Attributes:
        name: the recipe's ``attribution.method`` value.
        label: display name in the report and figures.
        colour: matplotlib colour, the same in every figure.
        summary: one line for the CLI help and the docs.
        layer_scores: ``(engine, pass) -> iterator`` of ``[B, n]`` scores per located block.
    """

    name: str
    label: str
    colour: str
    summary: str
    layer_scores: Callable[["JointAttribution", "Pass"], Iterator[Tensor]]


METHODS: Registry[AttributionMethod] = Registry("attribution method")


def _jas(engine: "JointAttribution", st: "Pass") -> Iterator[Tensor]:
    for l in st.s.blocks:
        yield engine.jas_layer(st, l)


def _activation(engine: "JointAttribution", st: "Pass") -> Iterator[Tensor]:
    for l in st.s.blocks:
        yield st.vbar[l]


def _influence_pattern(engine: "JointAttribution", st: "Pass") -> Iterator[Tensor]:
    ip = engine.influence_pattern(st)
    for l in st.s.blocks:
        yield ip[l]


def _knowledge(engine: "JointAttribution", st: "Pass") -> Iterator[Tensor]:
    for l in st.s.blocks:
        yield engine.knowledge_layer(st, l)


def _joint_ig(engine: "JointAttribution", st: "Pass") -> Iterator[Tensor]:
    ig = engine.joint_ig(st)
    for l in st.s.blocks:
        yield ig[l]


METHODS.add(AttributionMethod(
    "jas", "JAS", "#d62728",
    "Joint Attribution Score, layer by layer: candidate j of block l scored as JAS(path so far ∪ {j}) (Alg. 1/3)",
    _jas))
METHODS.add(AttributionMethod(
    "activation", "activation", "#ff7f0e",
    "per block, the top-K clean activations v̄ (paper App. C.2)", _activation))
METHODS.add(AttributionMethod(
    "influence_pattern", "influence pattern", "#17becf",
    "input interpolated from zero; per block the top-K of the mean gradient of F (paper App. C.3)",
    _influence_pattern))
METHODS.add(AttributionMethod(
    "knowledge", "knowledge", "#bcbd22",
    "per-neuron integrated gradients of each block scaled alone (Knowledge Neurons, paper App. B)", _knowledge))
METHODS.add(AttributionMethod(
    "joint_ig", "joint IG", "#e6550d",
    "every located block scaled from zero together, per-neuron integrated gradients (completeness over "
    "the whole set): m passes instead of L·m — the fast pruning importance", _joint_ig))
