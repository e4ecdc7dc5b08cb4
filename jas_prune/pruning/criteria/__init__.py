"""The pruning criteria: one registry, one module per criterion.

A criterion is a :class:`Criterion` registered in :data:`CRITERIA` by the module that implements
it; the recipe's ``prune.methods``, its ``prune.<name>`` option sections, the CLI help and the
report's labels and colours all read the registry. Every module of this package is imported when
the package is, so **adding a criterion is one new file here** (plus its test)::

    # jas_prune/pruning/criteria/my_criterion.py
    from . import CRITERIA, Criterion, CriterionScores, ScoringInputs

    def _score(inputs: ScoringInputs) -> CriterionScores:
        ...                                   # a score map: block -> per-neuron scores
        return CriterionScores(scores)

    @CRITERIA.register
    def _mine() -> Criterion:
        return Criterion(name="mine", label="Mine", colour="#e377c2", summary="...",
                         needs_data=False, score=_score)

Importing this package is cheap: no Torch-Pruning, no timm (the CLI imports it for ``--help``
and recipe checks); a criterion imports what it computes with inside its ``score`` function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import pydantic

from ...errors import InvalidArgumentError, one_line
from ...registry import Registry, import_submodules

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..scoremap import ScoreMap
    from ..stats import ActivationStats

__all__ = ["Criterion", "CRITERIA", "ScoringInputs", "CriterionScores", "MasksRef", "criterion_scores",
           "options_error"]


@dataclass(frozen=True)
class CriterionScores:
    """What a criterion returns: per-neuron scores, and neurons that must never be pruned."""

    scores: "ScoreMap"
    #: block -> neuron indices kept whatever the budget (e.g. a class subset's TopK masks)
    protect: dict[int, list[int]] | None = None
    #: scores are cumulative (``obs``: the block's error once the unit is removed in greedy
    #: order): a ranking, whose per-unit losses are the increments (allocate.loss_increments)
    cumulative: bool = False


@dataclass(frozen=True)
class MasksRef:
    """A run's saved class masks, for JAS importance without locating again
    (:meth:`JASImportance.from_run <jas_prune.pruning.plugin.JASImportance.from_run>`)."""

    run_dir: str | os.PathLike[str]
    #: how per-image candidate scores became the importance (``masks.importance``)
    aggregation: str = "mean"
    #: the model's weights digest, to refuse masks computed on other weights
    digest: str | None = None


@dataclass
class ScoringInputs:
    """Everything a criterion may read. The pipeline builds one per class selection and hands a
    copy per criterion (``dataclasses.replace(inputs, options=...)``): the copies share one
    activation pass (:meth:`activation_stats`), computed on first use.

    Attributes:
        model: the dense ViT (left as it was: parameters, flags, gradients and mode).
        loader: probe batches ``(images, labels, ...)``; None for criteria without data.
        classes: only images of these labels count (class-specialised pruning); None for all.
        example_inputs: an input batch for Torch-Pruning's tracing (default: random of the
            model's input size).
        seed: for criteria that draw random numbers.
        device: where to compute (default: the model's device).
        max_batches: read at most this many probe batches.
        options: the criterion's options (an instance of its ``options`` model, or a mapping
            validated against it); None for its defaults.
        stats: an activation pass already made (:func:`~jas_prune.pruning.stats.ffn_activation_stats`
            of the same loader and classes); None to compute it when first asked.
        locate_settings: keyword settings of :func:`jas_prune.locate` for JAS from the loader.
        masks: a run's class masks, for JAS importance from them instead of the loader.
    """

    model: "nn.Module"
    loader: Iterable | None = None
    classes: list[int] | None = None
    example_inputs: "torch.Tensor | None" = None
    seed: int = 0
    device: "torch.device | str | None" = None
    max_batches: int | None = None
    options: pydantic.BaseModel | Mapping[str, Any] | None = None
    stats: "Mapping[int, ActivationStats] | None" = None
    locate_settings: dict[str, Any] = field(default_factory=dict)
    masks: MasksRef | None = None
    #: shared by copies made with dataclasses.replace: the lazily computed activation pass
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def require_loader(self, criterion: str) -> Iterable:
        """The probe loader.

        Raises:
            InvalidArgumentError: there is none (naming the criterion that needs it).
        """
        if self.loader is None:
            raise InvalidArgumentError(f"loader: the '{criterion}' criterion needs probe data")
        return self.loader

    def activation_stats(self) -> "Mapping[int, ActivationStats]":
        """FFN activation statistics over the probe tokens (of ``classes``): ``stats`` when given,
        else one pass over the loader, made once and shared with every copy of these inputs."""
        if self.stats is not None:
            return self.stats
        if "stats" not in self._cache:
            from ..stats import ffn_activation_stats

            self._cache["stats"] = ffn_activation_stats(self.model, self.require_loader("activation statistics"),
                                                        classes=self.classes, device=self.device,
                                                        max_batches=self.max_batches)
        return self._cache["stats"]

    def options_as(self, model: type[pydantic.BaseModel], key: str) -> Any:
        """``options`` as an instance of the criterion's options ``model`` (defaults when None).

        Raises:
            InvalidArgumentError: options of another type, or a mapping the model refuses (naming
                ``key`` and the setting).
        """
        if self.options is None:
            return model()
        if isinstance(self.options, model):
            return self.options
        if isinstance(self.options, Mapping):
            try:
                return model.model_validate(dict(self.options))
            except pydantic.ValidationError as exc:
                raise options_error(exc, key, model) from None
        raise InvalidArgumentError(f"{key}: expected {model.__name__} or a mapping, got {type(self.options).__name__}")


def options_error(exc: pydantic.ValidationError, key: str, model: type[pydantic.BaseModel]) -> InvalidArgumentError:
    """One-line error for options a criterion's model refuses: unknown settings by name, with
    the settings it takes; otherwise the first problem, at ``key.<setting>``."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        known = [f.alias or name for name, f in model.model_fields.items()]
        return InvalidArgumentError(f"{key}: unknown setting(s) {unknown}; use {', '.join(known)}")
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    return InvalidArgumentError(f"{key}.{where}: {one_line(first['msg'])}" if where else f"{key}: {first['msg']}")


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: how it is called in a recipe, shown in a report, and computed."""

    #: recipe name (``prune.methods``), e.g. ``magnitude``
    name: str
    #: human label for the report and figures (``Taylor``, ``ViT-Slim``, ``JAS``)
    label: str
    #: matplotlib colour, the same in every figure
    colour: str
    #: one line, for the CLI help and the docs
    summary: str
    #: whether it reads the probe loader (criteria without data score the weights alone)
    needs_data: bool
    #: the score map (and protected neurons) for the given inputs
    score: Callable[[ScoringInputs], CriterionScores]
    #: the recipe section ``prune.<name>``, when the criterion has options
    options: type[pydantic.BaseModel] | None = None


#: every pruning criterion, in the order recipes, reports and figures list them
CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def criterion_scores(method: str, model: "nn.Module", loader: Iterable | None = None, *,
                     classes: list[int] | None = None, example_inputs: "torch.Tensor | None" = None,
                     seed: int = 0, device: "torch.device | str | None" = None, max_batches: int | None = None,
                     options: pydantic.BaseModel | Mapping[str, Any] | None = None,
                     vit_slim: Mapping[str, Any] | None = None,
                     stats: "Mapping[int, ActivationStats] | None" = None, masks: MasksRef | None = None,
                     **locate_settings: Any) -> "ScoreMap":
    """Score map of any registered criterion by name, on the probe ``loader`` (for Python users;
    the pipeline calls ``CRITERIA.get(name).score(inputs)`` and also gets the protected neurons).

    Args:
        options: the criterion's options (its options model, or a mapping of its settings).
        vit_slim: the older spelling of ``options`` for ``vit_slim`` (``lambda``/``lam``,
            ``epochs``, ``lr``).
        stats: an activation pass to reuse (``activation``, ``variance``).
        masks: a run's class masks (``jas``: importance from them instead of the loader).
        **locate_settings: :func:`jas_prune.locate` settings for ``jas`` from the loader.

    Raises:
        InvalidArgumentError: an unknown criterion (naming ``method``), a criterion that needs a
            loader without one, options it refuses.
    """
    criterion = CRITERIA.get(method, "method")
    if method == "vit_slim" and options is None and vit_slim is not None:
        options = dict(vit_slim)
        if "lam" in options:
            options.setdefault("lambda", options.pop("lam"))
    inputs = ScoringInputs(model=model, loader=loader, classes=classes, example_inputs=example_inputs, seed=seed,
                           device=device, max_batches=max_batches, options=options, stats=stats,
                           locate_settings=dict(locate_settings), masks=masks)
    return criterion.score(inputs).scores


# the original seven first: the order recipes and reports have always used; new ones follow by name
import_submodules(__name__, __path__, first=("jas", "vit_slim", "magnitude", "taylor", "activation", "random"))
