"""The built-in attribution methods — JAS and the paper's baselines — each one registered
definition in :data:`~.methods.METHODS`.

Adding a method: write a function ``(engine, st) -> Iterator[Tensor]`` here (scores ``[B, n]``
of each located block, in layer order) and a function decorated ``@METHODS.register`` that
returns its :class:`~.methods.AttributionMethod`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .engine import JointAttribution, Pass
from .methods import METHODS, AttributionMethod

__all__: list[str] = []


def _jas(engine: JointAttribution, st: Pass) -> Iterator[Tensor]:
    for l in st.sites:
        yield engine.jas_layer(st, l)


def _activation(engine: JointAttribution, st: Pass) -> Iterator[Tensor]:
    for l in st.sites:
        yield st.vbar[l]


def _influence_pattern(engine: JointAttribution, st: Pass) -> Iterator[Tensor]:
    ip = engine.influence_pattern(st)
    for l in st.sites:
        yield ip[l]


def _knowledge(engine: JointAttribution, st: Pass) -> Iterator[Tensor]:
    for l in st.sites:
        yield engine.knowledge_layer(st, l)


def _joint_ig(engine: JointAttribution, st: Pass) -> Iterator[Tensor]:
    ig = engine.joint_ig(st)
    for l in st.sites:
        yield ig[l]


@METHODS.register
def _jas_method() -> AttributionMethod:
    return AttributionMethod(
        "jas", "JAS", "#d62728",
        "Joint Attribution Score, layer by layer: candidate j of block l scored as JAS(path so far ∪ {j}) (Alg. 1/3)",
        _jas)


@METHODS.register
def _activation_method() -> AttributionMethod:
    return AttributionMethod(
        "activation", "activation", "#ff7f0e",
        "per block, the top-K clean activations v̄ (paper App. C.2)", _activation)


@METHODS.register
def _influence_pattern_method() -> AttributionMethod:
    return AttributionMethod(
        "influence_pattern", "influence pattern", "#17becf",
        "input interpolated from zero; per block the top-K of the mean gradient of F (paper App. C.3)",
        _influence_pattern)


@METHODS.register
def _knowledge_method() -> AttributionMethod:
    return AttributionMethod(
        "knowledge", "knowledge", "#bcbd22",
        "per-neuron integrated gradients of each block scaled alone (Knowledge Neurons, paper App. B)", _knowledge)


@METHODS.register
def _joint_ig_method() -> AttributionMethod:
    return AttributionMethod(
        "joint_ig", "joint IG", "#e6550d",
        "every located block scaled from zero together, per-neuron integrated gradients (completeness over "
        "the whole set): m passes instead of L·m — the fast pruning importance", _joint_ig)
