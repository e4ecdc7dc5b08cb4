"""The locate settings: one object, validated once, passed whole to the engine.

:class:`LocateSettings` holds the recipe's ``attribution`` keys (the keyword names of
:func:`jas_prune.locate`). Its own rules (choices, positive integers, ``trapezoid`` needs two
steps) are checked when it is built; the rules that depend on the model (``topk`` at most an FFN
width, ``layers`` in range, ``scope: cls`` needs a class token) when it is resolved against one
(:meth:`LocateSettings.resolve`), which gives the engine a :class:`ResolvedSettings` it trusts.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import AttributionSettingError, JasPruneError
from ..models import FFNInfo
from .methods import METHODS

__all__ = [
    "FORMULAS",
    "QUADRATURES",
    "CANDIDATES",
    "TARGETS",
    "SCOPES",
    "SETTING_NAMES",
    "LocateSettings",
    "ResolvedSettings",
]

FORMULAS = ("paper", "ig")
QUADRATURES = ("left", "right", "trapezoid", "gauss")
CANDIDATES = ("layer_scaled", "exact")
TARGETS = ("label", "pred")
SCOPES = ("cls", "all")

#: The settings every located method shares, in the order ``metrics.json`` and the ``paths/``
#: fingerprint list them (``method`` is chosen per located method).
SETTING_NAMES = ("steps", "topk", "scope", "formula", "quadrature", "candidates", "target", "layers",
                 "internal_batch_size")


def _err(key: str, msg: str) -> AttributionSettingError:
    return AttributionSettingError(f"attribution.{key}: {msg}")


def _choice(key: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise _err(key, f"must be one of {', '.join(options)}, got {value!r}")
    return str(value)


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _err(key, f"must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LocateSettings:
    """How :func:`jas_prune.locate` finds neuron paths (README "What faithful means
    here").

    Attributes:
        method: a registered attribution method (:data:`jas_prune.attribution.METHODS`).
        steps: quadrature nodes m.
        topk: neurons kept per layer (K).
        scope: ``cls`` (class token) | ``all`` (every token).
        formula: ``paper`` (product of sums) | ``ig`` (integrated gradients).
        quadrature: ``left`` | ``right`` | ``trapezoid`` | ``gauss``.
        candidates: ``layer_scaled`` | ``exact``.
        target: ``label`` | ``pred``.
        layers: ``None`` (all blocks), a prefix depth, or block indices.
        internal_batch_size: max (image, step) rows per forward; changes batching only.

    Raises:
        AttributionSettingError: naming the ``attribution.*`` key.
    """

    method: str = "jas"
    steps: int = 20
    topk: int = 1
    scope: str = "cls"
    formula: str = "paper"
    quadrature: str = "left"
    candidates: str = "layer_scaled"
    target: str = "label"
    layers: int | tuple[int, ...] | None = None
    internal_batch_size: int | None = None

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS.names())
        _choice("formula", self.formula, FORMULAS)
        _choice("quadrature", self.quadrature, QUADRATURES)
        _choice("candidates", self.candidates, CANDIDATES)
        _choice("scope", self.scope, SCOPES)
        _choice("target", self.target, TARGETS)
        if self.quadrature == "trapezoid" and isinstance(self.steps, numbers.Integral) and self.steps == 1:
            raise _err("steps", "must be ≥ 2 with quadrature 'trapezoid' (it needs both ends)")
        _positive_int("steps", self.steps)
        _positive_int("topk", self.topk)
        if self.internal_batch_size is not None:
            _positive_int("internal_batch_size", self.internal_batch_size)
        layers = self.layers
        if layers is not None and not isinstance(layers, (numbers.Integral, tuple)):
            try:  # lists (from YAML or a caller) and tensors become a hashable tuple
                layers = tuple(layers.tolist() if hasattr(layers, "tolist") else layers)
            except TypeError:
                raise _err("layers", f"expected a depth (int) or a list of block indices, got {layers!r}") from None
            object.__setattr__(self, "layers", layers)

    @classmethod
    def from_section(cls, section: Any, method: str | None = None) -> "LocateSettings":
        """Settings from a recipe ``attribution`` section (any object with those attributes)."""
        return cls(method=method or section.methods[0],
                   **{k: getattr(section, k) for k in SETTING_NAMES})

    def replace(self, **changes: Any) -> "LocateSettings":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The shared settings (:data:`SETTING_NAMES`), as the recipe spells them."""
        out = {k: getattr(self, k) for k in SETTING_NAMES}
        if isinstance(out["layers"], tuple):
            out["layers"] = list(out["layers"])
        return out

    def resolve(self, info: FFNInfo) -> "ResolvedSettings":
        """Check the settings against a model's FFN layout.

        Raises:
            AttributionSettingError: ``layers`` out of range, ``topk`` above a located block's
                width, ``scope: cls`` on a model without a class token.
        """
        from ..neurons import check_scope, resolve_layers

        try:
            check_scope(info, self.scope, key="attribution.scope")
            idx = resolve_layers(info, self.layers, key="attribution.layers")
        except JasPruneError as exc:  # RecipeError (layers), UnsupportedModelError (cls scope)
            raise AttributionSettingError(str(exc)) from None
        for l in idx:
            width = info.layers[l].hidden
            if self.topk > width:
                raise _err("topk", f"{self.topk} exceeds the FFN width {width} of block {l}")
        return ResolvedSettings(self, tuple(idx))


@dataclass(frozen=True)
class ResolvedSettings:
    """:class:`LocateSettings` checked against one model, with the located blocks resolved."""

    settings: LocateSettings
    blocks: tuple[int, ...]

    def __getattr__(self, name: str) -> Any:  # steps, topk, scope, ... read through
        return getattr(self.settings, name)

    def as_dict(self) -> dict[str, Any]:
        """What :attr:`jas_prune.attribution.LocateResult.settings` reports (``layers`` resolved)."""
        s = self.settings
        return {"method": s.method, "steps": s.steps, "topk": s.topk, "scope": s.scope, "formula": s.formula,
                "quadrature": s.quadrature, "candidates": s.candidates, "layers": list(self.blocks),
                "internal_batch_size": s.internal_batch_size}
