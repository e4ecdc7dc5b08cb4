"""The locate settings: one object, validated once, passed whole to the engine.

:class:`LocateSettings` holds the recipe's ``attribution`` keys (the keyword names of
:func:`jas_prune.locate`), each key with its type, bound and default declared once, here: the
recipe's ``attribution`` section derives from it. Its own rules (choices, positive integers,
``trapezoid`` needs two steps) are checked when it is built; the rules that depend on the model
(``topk`` at most an FFN width, ``layers`` in range, ``scope: cls`` needs a class token) when it
is resolved against one (:meth:`LocateSettings.resolve`), which gives the engine a
:class:`ResolvedSettings` it trusts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import AttributionSettingError, JasPruneError
from ..models import FFNInfo
from ..schema import Strict, each_once, first_error, short
from .methods import METHODS
from .quadrature import QUADRATURES

__all__ = [
    "FORMULAS",
    "QUADRATURES",
    "CANDIDATES",
    "TARGETS",
    "SCOPES",
    "UNITS",
    "SETTING_NAMES",
    "STEPS_MAX",
    "LocateSettings",
    "ResolvedSettings",
]

FORMULAS = ("paper", "ig")
CANDIDATES = ("layer_scaled", "exact")
TARGETS = ("label", "pred")
SCOPES = ("cls", "all")
#: The unit kinds attribution can scale: FFN neurons and attention heads (a head's output before
#: the attention output projection); within a block the heads come first (the forward order).
UNITS = ("ffn", "heads")
#: the most quadrature nodes: every node is a forward and backward pass per image and layer
#: (the paper uses 20; beyond a few thousand a run never ends and its buffers outgrow memory)
STEPS_MAX = 10_000


class LocateSettings(Strict):
    """How :func:`jas_prune.locate` finds neuron paths (docs/faithfulness.md, "What faithful means
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
        units: which units are located, in block order (:data:`UNITS`): ``("ffn",)`` (default),
            ``("ffn", "heads")`` or ``("heads",)``; heads keep ``min(topk, heads per block)``.

    Raises:
        AttributionSettingError: naming the ``attribution.*`` key.
    """

    model_config = ConfigDict(frozen=True)

    method: str = "jas"
    steps: int = Field(default=20, ge=1, le=STEPS_MAX)
    topk: int = Field(default=1, ge=1)
    scope: Literal[SCOPES] = "cls"  # type: ignore[valid-type]
    formula: Literal[FORMULAS] = "paper"  # type: ignore[valid-type]
    quadrature: Literal[QUADRATURES] = "left"  # type: ignore[valid-type]
    candidates: Literal[CANDIDATES] = "layer_scaled"  # type: ignore[valid-type]
    target: Literal[TARGETS] = "label"  # type: ignore[valid-type]
    layers: int | tuple[int, ...] | None = None
    internal_batch_size: int | None = Field(default=None, ge=1)
    units: tuple[Literal[UNITS], ...] = ("ffn",)  # type: ignore[valid-type]

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**{k: _plain(v) for k, v in settings.items()})
        except ValidationError as exc:
            raise AttributionSettingError(first_error(exc, LocateSettings, ("attribution",))) from None

    @field_validator("method")
    @classmethod
    def _method(cls, v: Any) -> Any:
        names = METHODS.names()
        for m in [v] if isinstance(v, str) else v:
            if m not in names:
                raise ValueError(f"must be one of {', '.join(map(repr, names))} (got {short(m)})")
        return v

    @field_validator("steps", "topk", "internal_batch_size", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would read true as 1
            raise ValueError(f"must be an integer, got {v!r}")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_before(cls, v: Any) -> Any:
        if v is None or isinstance(v, (int, tuple)):
            return v
        try:  # lists (from YAML or a caller) and tensors become a hashable tuple
            return tuple(v.tolist() if hasattr(v, "tolist") else v)
        except TypeError:
            raise ValueError(f"expected a depth (int) or a list of block indices, got {short(v)}") from None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be ≥ 1 (a prefix depth) or a list of block indices")
        if isinstance(v, tuple):
            if not v:
                raise ValueError("must not be empty")
            if any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError("block indices must be distinct and ≥ 0")
        return v

    @field_validator("units", mode="before")
    @classmethod
    def _units_before(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else v
        return tuple(each_once(v, f"must name at least one of {', '.join(UNITS)}, each once"))

    @field_validator("units")
    @classmethod
    def _units(cls, v: Any) -> Any:
        return tuple(u for u in UNITS if u in v)  # canonical (forward) order

    @model_validator(mode="after")
    def _trapezoid(self) -> "LocateSettings":
        if self.quadrature == "trapezoid" and self.steps == 1:
            raise ValueError("steps: must be ≥ 2 with quadrature 'trapezoid' (it needs both ends)")
        return self

    @classmethod
    def from_section(cls, section: Any, method: str | None = None) -> "LocateSettings":
        """Settings from a recipe ``attribution`` section (any object with those attributes)."""
        return cls(method=method or section.methods[0], **{k: getattr(section, k) for k in SETTING_NAMES})

    def replace(self, **changes: Any) -> "LocateSettings":
        """A copy with some settings changed (validated again)."""
        return LocateSettings(**{**self.model_dump(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """The shared settings (:data:`SETTING_NAMES`), as the recipe spells them."""
        out = {k: getattr(self, k) for k in SETTING_NAMES}
        if isinstance(out["layers"], tuple):
            out["layers"] = list(out["layers"])
        out["units"] = list(out["units"])
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
                raise AttributionSettingError(f"attribution.topk: {self.topk} exceeds the FFN width {width} of block {l}")
        heads = None
        if "heads" in self.units:
            from ..models.heads import discover_heads

            heads = discover_heads(info)
        return ResolvedSettings(self, tuple(idx), heads)


def _plain(v: Any) -> Any:
    """A 0-d tensor or numpy number as a Python number (callers pass ``steps=torch.tensor(8)``)."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", None) == 0 else v


#: The settings every located method shares, in the order ``metrics.json`` and the ``paths/``
#: fingerprint list them (``method`` is chosen per located method).
SETTING_NAMES = tuple(n for n in LocateSettings.model_fields if n != "method")


@dataclass(frozen=True)
class ResolvedSettings:
    """:class:`LocateSettings` checked against one model, with the located blocks resolved."""

    settings: LocateSettings
    blocks: tuple[int, ...]
    heads: tuple[Any, ...] | None = None  # HeadLayer of every block when heads are located

    @property
    def head_topk(self) -> int:
        """Heads kept per located block: ``topk``, at most the fewest heads of a located block."""
        assert self.heads is not None
        return min(self.settings.topk, *(self.heads[l].heads for l in self.blocks))

    def __getattr__(self, name: str) -> Any:  # steps, topk, scope, ... read through
        return getattr(self.settings, name)

    def as_dict(self) -> dict[str, Any]:
        """What :attr:`jas_prune.attribution.LocateResult.settings` reports (``layers`` resolved;
        the target is added by :func:`jas_prune.locate`)."""
        shared = {k: v for k, v in self.settings.as_dict().items() if k != "target"}
        return {"method": self.settings.method, **shared, "layers": list(self.blocks)}
