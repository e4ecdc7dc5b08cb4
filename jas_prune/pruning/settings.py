"""Prune settings: the recipe's ``prune`` section, validated once (:class:`PruneSettings`) and
resolved against the model and data once (:meth:`PruneSettings.resolve` -> :class:`ResolvedPrune`).

:class:`ResolvedPrune` is what the prune stage reads, carried whole on the run context: the class
selections (``prune.classes``, then each ``prune.class_subsets`` draw), ``round_to`` as used,
the :class:`~jas_prune.pruning.budget.Budget`, and :meth:`ResolvedPrune.identity`, the settings
one pruned entry is made with — planning asks for them, a resumed run keeps an entry recorded with
the same ones, and the entry records them. Rules that depend on more than one key
("``global_min_keep`` only in global mode", "damping only for lsq") are written there, once.

A criterion with options adds its own section ``prune.<criterion>`` (its ``options`` model in the
criterion registry, e.g. ``prune.vit_slim``). A new prune setting is a field here (or a small
settings class of its own module referenced by one field line, as ``finetune``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from ..errors import InvalidArgumentError, PruneSettingError, RecipeError
from ..schema import Strict, each_once, finite
from .choices import (DEFAULT_DAMPING, DEFAULT_TARGET, EPOCHS_MAX, LOGIT_COMPENSATIONS, RECONSTRUCTIONS,
                      TARGETS as RECONSTRUCTION_TARGETS)
from .allocate import NORMALISE, UNITS
from .attention import AttentionSettings, check_attention
from .criteria import CRITERIA
from .recover import RecoverSettings

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .budget import Budget

__all__ = ["PRUNE_METHODS", "EPOCHS_MAX", "FinetuneSettings", "CalibrationSettings", "ClassSubsetsSettings",
           "BudgetSettings", "PruneSettings", "Selection", "ResolvedPrune"]

#: prune.methods values: the registered pruning criteria
PRUNE_METHODS = CRITERIA.names()
_PruneMethod = Literal[PRUNE_METHODS]  # type: ignore[valid-type]
_Reconstruction = Literal[RECONSTRUCTIONS]  # type: ignore[valid-type]
_Mode = Literal["uniform", "global"]


def _check_ratios(v: list[float]) -> list[float]:
    if not v:
        raise ValueError("must list at least one ratio")
    for r in v:
        if not 0.0 < r < 1.0:
            raise ValueError(f"{r} is outside (0, 1): a ratio is the fraction of FFN neurons removed")
    twice = next((r for i, r in enumerate(v) if r in v[:i]), None)
    if twice is not None:  # two identical entries, one overwriting the other's checkpoint
        raise ValueError(f"{twice} is listed twice: list each ratio once")
    return v


_RECONSTRUCTIONS_ONCE = f"must list at least one of {', '.join(RECONSTRUCTIONS)}, each once"


class FinetuneSettings(Strict):
    """``prune.finetune``: the optional short fine-tune, identical for every criterion."""

    epochs: float = Field(default=1.0, ge=0.0, le=EPOCHS_MAX, allow_inf_nan=False)
    lr: float = Field(default=1e-4, gt=0.0, allow_inf_nan=False)


class CalibrationSettings(Strict):
    """``prune.calibration``: how a reconstruction (``prune.reconstruction``) is fit.

    The calibration images are the probe partition of the classes being pruned (at most
    ``images_per_class`` of each class, in partition order).
    """

    images_per_class: int | None = Field(default=None, ge=1)
    #: what the pruned FFN output is fit to: local | global | residual (jas_prune.pruning.reconstruct)
    target: Literal[RECONSTRUCTION_TARGETS] = DEFAULT_TARGET  # type: ignore[valid-type]
    #: relative ridge damping of lsq (times the mean variance of the kept neurons)
    damping: float = Field(default=DEFAULT_DAMPING, ge=0.0)

    @field_validator("damping")
    @classmethod
    def _finite(cls, v: float) -> float:
        return finite(v, " ≥ 0")


class ClassSubsetsSettings(Strict):
    """``prune.class_subsets``: besides ``prune.classes``, ``count`` random subsets of ``size``
    classes, drawn from ``runtime.seed``, each pruned class-specialised (sharing the run's masks)."""

    count: int = Field(ge=1)
    size: int = Field(ge=1)
    #: ratios for the subsets (default: prune.ratios)
    ratios: list[float] | None = None
    #: keep | cut the classifier head to each subset (default: prune.head)
    head: Literal["keep", "cut"] | None = None
    #: reconstructions for the subsets (default: prune.reconstruction)
    reconstruction: Union[_Reconstruction, list[_Reconstruction]] | None = None

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _check_ratios(v)

    @field_validator("reconstruction")
    @classmethod
    def _reconstruction(cls, v):
        return [v] if isinstance(v, str) else each_once(v, _RECONSTRUCTIONS_ONCE)


class BudgetSettings(Strict):
    """``prune.budget``: besides ``prune.ratios``, the smallest uniform removal ratio (a multiple
    of ``step``, honouring ``prune.round_to``) whose pruned model keeps at most ``macs`` /
    ``params`` of the dense model's (a fraction), or runs at most ``latency_ms`` (ONNX Runtime
    p50 at ``batch_size``, default 1) — one target (:mod:`jas_prune.pruning.budget`).

    With ``units`` beyond ``[ffn]`` or a ``split``, the budget is spent over FFN neurons, heads
    and head dimensions together (:mod:`jas_prune.pruning.allocate`): ``uniform`` candidates fix
    the attention share (``shares``) and search the FFN ratio; ``score`` candidates remove the
    units of least score-loss per cost saved (``weights``: the attention's loss relative to the
    FFN's; ``normalise``); with several candidates the one with the best top-1 on held-out probe
    images is kept."""

    macs: float | None = Field(default=None, gt=0.0, le=1.0)
    params: float | None = Field(default=None, gt=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    batch_size: int | None = Field(default=None, ge=1)
    step: float = Field(default=0.01, gt=0.0, lt=1.0)
    #: what the budget spends over: ffn, heads, head_dims (default [ffn]: the uniform FFN ratio)
    units: list[Literal[UNITS]] = ["ffn"]  # type: ignore[valid-type]
    #: candidate splits: uniform and/or score (default: [uniform, score] when units go beyond ffn)
    split: Union[Literal["uniform", "score"], list[Literal["uniform", "score"]]] | None = None
    #: uniform split: share of each block's attention removed (head_dims when listed, else heads)
    shares: list[float] | None = None
    #: score split: attention weight candidates (loss of the attention relative to the FFN)
    weights: list[float] | None = None
    #: score split: scores made comparable per block or over the model
    normalise: Literal[NORMALISE] = "block"  # type: ignore[valid-type]
    #: latency_ms split: grid points per width axis of the measured block latency table
    points: int = Field(default=5, ge=2, le=64)
    #: query/key logit compensation of the head dimensions the split removes (as
    #: ``prune.attention.logits``; applied with the entry's reconstruction)
    logits: Literal[LOGIT_COMPENSATIONS] = "none"  # type: ignore[valid-type]

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[str]) -> list[str]:
        return each_once(v, f"must list at least one of {', '.join(UNITS)}, each once")

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        v = [v] if isinstance(v, str) else v
        return each_once(v, "must be uniform, score or a list of them, each once")

    @field_validator("shares")
    @classmethod
    def _shares(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            each_once(v, "must list at least one share, each once")
            bad = next((x for x in v if not 0.0 < x < 1.0), None)
            if bad is not None:
                raise ValueError(f"{bad} is outside (0, 1): a share of each block's attention removed")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            each_once(v, "must list at least one weight, each once")
            bad = next((x for x in v if not (math.isfinite(x) and x > 0)), None)
            if bad is not None:
                raise ValueError(f"{bad}: an attention weight is a finite number > 0")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "BudgetSettings":
        given = [k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of macs, params or latency_ms"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.latency_ms is None and self.batch_size is not None:
            raise ValueError("batch_size: only with latency_ms (MACs and parameters do not depend on the batch)")
        if self.latency_ms is not None and self.batch_size is None:
            self.batch_size = 1
        attention = [u for u in self.units if u != "ffn"]
        if self.split is None and attention:
            self.split = ["uniform", "score"] if "ffn" in self.units else ["score"]
        split = self.split or []
        if "uniform" in split and "ffn" not in self.units:
            raise ValueError("split: uniform searches the FFN ratio; add ffn to units or use split: score")
        if self.shares is not None and not ("uniform" in split and attention):
            raise ValueError("shares: only with split uniform and heads or head_dims in units")
        if self.weights is not None and "score" not in split:
            raise ValueError("weights: only with split score")
        if "uniform" in split and attention and self.shares is None:
            self.shares = [0.25, 0.5]
        if self.logits != "none" and "head_dims" not in self.units:
            raise ValueError(f"logits: '{self.logits}' compensates removed query/key channels; "
                             "add head_dims to units (or logits: none)")
        if "score" in split and self.weights is None:
            self.weights = [0.5, 0.7, 1.0, 1.4, 2.0] if attention else [1.0]
        return self

    @property
    def target(self) -> str:
        """``macs``, ``params`` or ``latency_ms``."""
        return next(k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None)

    def budget(self) -> "Budget":
        """As a :class:`~jas_prune.pruning.budget.Budget`."""
        from .budget import Budget

        return Budget(target=self.target, value=float(getattr(self, self.target)), batch_size=self.batch_size,
                      step=float(self.step), units=tuple(self.units), split=tuple(self.split or ()),
                      shares=tuple(self.shares or ()), weights=tuple(self.weights or ()), normalise=self.normalise,
                      points=self.points, logits=self.logits)


class _PruneFields(Strict):
    """``prune``: the fixed keys. Every criterion with options adds its own section
    ``prune.<criterion>`` (e.g. ``prune.vit_slim``), taken from the criterion registry."""

    methods: list[_PruneMethod] = ["jas"]
    ratios: list[float] = [0.5]
    #: uniform | global, or a mapping ratio -> mode (ratios not listed: uniform)
    mode: Union[_Mode, dict[float, _Mode]] = "uniform"
    #: global mode: every block keeps at least this share of the neurons a uniform cut keeps
    global_min_keep: float = Field(default=0.5, ge=0.0, le=1.0)
    classes: list[Union[int, str]] | None = None
    class_subsets: ClassSubsetsSettings | None = None
    head: Literal["keep", "cut"] = "keep"
    #: none | bias | lsq, or a list of them compared side by side (default: none)
    reconstruction: Union[_Reconstruction, list[_Reconstruction]] | None = None
    #: the older spelling: true = [bias], false = [none], [false, true] = [none, bias]
    bias_compensation: bool | list[bool] | None = None
    calibration: CalibrationSettings = CalibrationSettings()
    finetune: FinetuneSettings | None = None
    #: distillation from the dense model after pruning (jas_prune.pruning.recover)
    recover: RecoverSettings | None = None
    #: kept FFN widths a multiple of this (the nearest; null or 1: not rounded)
    round_to: int | None = Field(default=None, ge=1, strict=True)
    #: a MACs / params / latency target, met by the smallest uniform ratio (adds entries)
    budget: BudgetSettings | None = None
    #: heads / head dimensions removed besides the FFN neurons (pruning/attention.py)
    attention: AttentionSettings | None = None

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        return _check_ratios(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one method")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int | str] | None) -> list[int | str] | None:
        if v is not None and not v:
            raise ValueError("must list at least one class (or be null for every class)")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v):
        if isinstance(v, dict):
            if not v:
                raise ValueError("must be uniform, global, or a non-empty mapping ratio -> mode")
            for r in v:
                if not 0.0 < r < 1.0:
                    raise ValueError(f"ratio {r} is outside (0, 1)")
        return v

    @field_validator("reconstruction")
    @classmethod
    def _reconstruction(cls, v):
        return each_once(v, _RECONSTRUCTIONS_ONCE)

    @field_validator("bias_compensation")
    @classmethod
    def _bias_compensation(cls, v):
        return each_once(v, "must be true, false or a list of them, each once")

    @model_validator(mode="after")
    def _alias(self) -> "_PruneFields":
        """``bias_compensation`` is an alias: resolved into ``reconstruction`` (then null)."""
        if self.bias_compensation is not None:
            flags = [self.bias_compensation] if isinstance(self.bias_compensation, bool) else self.bias_compensation
            aliased = ["bias" if f else "none" for f in flags]
            if self.reconstruction is not None and self.reconstructions != aliased:
                raise ValueError("bias_compensation: is the older spelling of prune.reconstruction "
                                 f"({aliased}); give only prune.reconstruction")
            self.reconstruction = aliased
            self.bias_compensation = None
        elif self.reconstruction is None:
            self.reconstruction = ["none"]
        if isinstance(self.reconstruction, str):
            self.reconstruction = [self.reconstruction]
        return self

    @model_validator(mode="after")
    def _budget_attention(self) -> "_PruneFields":
        if self.budget is not None and self.attention is not None and set(self.budget.units) - {"ffn"}:
            raise ValueError("budget.units: spends over heads / head dimensions, which prune.attention fixes; "
                             "give one of them")
        return self

    @property
    def reconstructions(self) -> list[str]:
        """The reconstructions compared, in the recipe's order."""
        r = self.reconstruction
        return ["none"] if r is None else [r] if isinstance(r, str) else list(r)

    @property
    def rounding(self) -> int | None:
        """``round_to`` as used: None for null and 1 (no rounding)."""
        return self.round_to if self.round_to is not None and self.round_to > 1 else None

    def mode_for(self, ratio: float) -> str:
        """The allocation at ``ratio``: the mode, or the mapping's entry (uniform when not listed)."""
        if isinstance(self.mode, str):
            return self.mode
        return next((m for r, m in self.mode.items() if abs(r - ratio) < 1e-9), "uniform")

    def options_for(self, method: str) -> BaseModel | None:
        """The options section of criterion ``method`` (None when it has none)."""
        return getattr(self, method) if CRITERIA.get(method).options is not None else None

    def resolve(self, model: "nn.Module", source: Any, *, seed: int, masks: Any = None) -> "ResolvedPrune":
        """Check the settings against the model and data, once, before any work.

        Args:
            source: the run's :class:`~jas_prune.data.DataSource` (class names and count).
            seed: ``runtime.seed`` (draws ``prune.class_subsets``).
            masks: the recipe's ``masks`` section (JAS importance and its class masks), or None.

        Raises:
            ClassSelectionError: a ``prune.classes`` entry that is not a class of the data set.
            RecipeError: ``prune.class_subsets`` that cannot be drawn from the classes.
            PruneSettingError: ``prune.round_to`` above an FFN width.
            UnsupportedModelError: ``prune.attention`` on a model it cannot prune (check_attention).
            BudgetError: a MACs or params ``prune.budget`` that even one neuron (``round_to``
                neurons) per block misses, for ``prune.classes`` with its head.
        """
        from ..classes import resolve_classes
        from ..models import discover_ffn
        from .allocate import check_split_reachable
        from .budget import check_reachable
        from .calibration import draw_class_subsets

        classes = None if self.classes is None else resolve_classes(self.classes, source.class_names,
                                                                    key="prune.classes")
        sels = [Selection(classes, list(self.ratios), self.head, self.reconstructions)]
        cs = self.class_subsets
        if cs is not None:
            try:
                drawn = draw_class_subsets(source.num_classes, cs.count, cs.size, seed)
            except InvalidArgumentError as exc:
                raise RecipeError(str(exc)) from None
            sels += [Selection(c, list(cs.ratios or self.ratios), cs.head or self.head,
                               list(cs.reconstruction or self.reconstructions), subset=i,
                               ratios_key="prune.class_subsets.ratios" if cs.ratios else "prune.ratios")
                     for i, c in enumerate(drawn)]
        round_to = self.rounding
        if round_to is not None:
            narrow = next((l for l in discover_ffn(model).layers if l.hidden < round_to), None)
            if narrow is not None:
                raise PruneSettingError(f"prune.round_to: {round_to} exceeds the FFN width {narrow.hidden} of block "
                                        f"{narrow.index}; lower prune.round_to")
        if self.attention is not None:
            check_attention(model, self.attention)
        budget = None if self.budget is None else self.budget.budget()
        if budget is not None:
            check = check_split_reachable if budget.joint else check_reachable
            check(model, budget, round_to=round_to, head_classes=classes if self.head == "cut" else None,
                  class_names=source.class_names, key="prune.budget")
        return ResolvedPrune(self, tuple(sels), round_to, budget,
                             aggregation=None if masks is None else masks.importance,
                             masks_topk=None if masks is None else masks.topk)


def _criterion_sections() -> dict[str, Any]:
    taken = set(_PruneFields.model_fields)
    out: dict[str, Any] = {}
    for c in CRITERIA:
        if c.options is not None:
            if c.name in taken:
                raise RuntimeError(f"pruning criterion {c.name!r}: its options section would shadow prune.{c.name}")
            out[c.name] = (c.options, Field(default_factory=c.options))
    return out


#: the ``prune`` section: the fixed keys and one ``prune.<criterion>`` section per criterion with options
PruneSettings = create_model("PruneSettings", __base__=_PruneFields, __doc__=_PruneFields.__doc__,
                             __module__=__name__, **_criterion_sections())


@dataclass(frozen=True)
class Selection:
    """One class selection the stage prunes for: its classes, ratios and head."""

    classes: list[int] | None
    ratios: list[float]
    head: str
    reconstructions: list[str]
    #: index of the ``prune.class_subsets`` draw (None: ``prune.classes``)
    subset: int | None = None
    #: the recipe key of ``ratios`` (for messages)
    ratios_key: str = "prune.ratios"

    @property
    def head_classes(self) -> list[int] | None:
        """The classes the classifier head is cut to (None: the head is kept whole)."""
        return self.classes if self.classes is not None and self.head == "cut" else None

    @property
    def where(self) -> str:
        """The selection in messages."""
        return "prune" if self.subset is None else f"prune.class_subsets[{self.subset}] {self.classes}"


@dataclass(frozen=True)
class ResolvedPrune:
    """:class:`PruneSettings` checked against one model and data set (see the module docstring)."""

    settings: _PruneFields  # a PruneSettings
    selections: tuple[Selection, ...]
    #: ``prune.round_to`` as used (None: no rounding)
    round_to: int | None
    #: ``prune.budget`` as a Budget (None: no budget slot)
    budget: "Budget | None"
    #: ``masks.importance``: how JAS importance is built from the class masks (None: no masks)
    aggregation: str | None = None
    #: ``masks.topk``: the size of the class masks JAS protects on a class subset
    masks_topk: int | None = None

    def slots(self, sel: Selection) -> list[float | None]:
        """The selection's ratio slots: its ratios in recipe order, then ``None`` for the budget
        (whose ratio is found later)."""
        return list(sel.ratios) + ([None] if self.budget is not None else [])

    def criterion_options(self, method: str, classes: list[int] | None) -> dict[str, Any] | None:
        """What a criterion's scores depend on beyond the data: its recipe options, and for JAS on a
        class subset the size of the protected class masks."""
        opts = self.settings.options_for(method)
        out = opts.model_dump(mode="json", by_alias=True) if opts is not None else {}
        if method == "jas" and classes is not None and self.masks_topk is not None:
            out["masks_topk"] = self.masks_topk
        return out or None

    def identity(self, sel: Selection, method: str, ratio: float | None, recon: str,
                 calibration_images: int) -> dict[str, Any]:
        """The settings one pruned entry is made with, as :class:`~jas_prune.metrics.PrunedEntry`
        fields: what planning asks for, what a resumed run compares with
        :meth:`~jas_prune.metrics.PrunedEntry.identity`, what the entry records. ``ratio`` None:
        the ``prune.budget`` entry, identified by its budget (``budget`` holds its spec) instead
        of its ratio."""
        p = self.settings
        mode = "uniform" if ratio is None else p.mode_for(ratio)
        out: dict[str, Any] = {"method": method, "classes": sel.classes, "head": sel.head, "mode": mode,
                               "reconstruction": recon,
                               "global_min_keep": p.global_min_keep if mode == "global" else None,
                               "importance": self.aggregation if method == "jas" else None,
                               "criterion_options": self.criterion_options(method, sel.classes),
                               "round_to": self.round_to,
                               "budget": self.budget.spec() if ratio is None and self.budget is not None else None,
                               "attention": p.attention.identity(recon != "none") if p.attention is not None else None,
                               "recover": p.recover.model_dump(mode="json") if p.recover and p.recover.steps else None}
        if ratio is not None:
            out["ratio"] = ratio
        if recon != "none":
            c = p.calibration
            out.update(reconstruction_target=c.target, reconstruction_damping=c.damping if recon == "lsq" else None,
                       calibration_images=calibration_images)
        return out
