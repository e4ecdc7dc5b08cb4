"""The recipe: YAML loading, ``--set`` overrides, and the schema that assembles every package's
settings into one document (``version: 1``).

Every setting is owned by the package that uses it, as a small class deriving from
:class:`jas_prune.schema.Strict` (unknown keys refused, each key's type, bound and default
declared once, validated once): ``attribution`` is :class:`~jas_prune.attribution.LocateSettings`,
``prune`` is :class:`~jas_prune.pruning.settings.PruneSettings`. This module only references them,
one field line each. Adding a setting:

1. declare it where it is used, e.g. ``pruning/recover.py``::

       class RecoverSettings(Strict):
           # prune.recover: ...
           epochs: float = Field(default=1.0, gt=0.0, le=1000.0, allow_inf_nan=False)

2. reference it with one field line in the section that holds it (here, or in the owning
   package's section class, e.g. ``recover: RecoverSettings | None = None`` in
   ``PruneSettings``); ``None`` as the default makes the feature opt-in;
3. document it in ``docs/settings.md`` and ``docs/recipes.md`` (the reference recipe lists every key).

Errors are reworded once (:func:`jas_prune.schema.first_error`): every one names its YAML path,
e.g. ``attribution.steps: must be ≥ 1``, and echoes at most a short prefix of the value.

The document itself is read and bounded by :mod:`jas_prune.document` (torch-free, so the
command line refuses a hostile file before importing the rest of the package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import ValidationError, field_validator

from .aggregate import MasksSettings
from .atlas.settings import ReportSettings
from .attribution import METHODS, LocateSettings
from .data import DataSettings
from .deploy.settings import ExportSettings
from .document import apply_overrides, check_size, read_document
from .errors import RecipeError
from .evaluate import EvaluateSettings
from .models.settings import ModelSettings
from .pruning.settings import PRUNE_METHODS, PruneSettings
from .schema import Strict, each_once, first_error
from .torchutil import RuntimeSettings

__all__ = [
    "SECTIONS",
    "LOCATE_METHODS",
    "PRUNE_METHODS",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
    "dump_recipe",
]

SECTIONS = ("model", "data", "attribution", "masks", "prune", "evaluate", "export", "report", "runtime")
#: attribution.method values: the registered attribution methods
LOCATE_METHODS = METHODS.names()


class AttributionSection(LocateSettings):
    """``attribution``: the :class:`~jas_prune.attribution.LocateSettings` keys, with ``method``
    one method or a list located side by side (the first is the one masks and importance are
    built from)."""

    method: Union[str, list[str]] = "jas"

    #: validated as a part of the recipe (errors name their path there), not by LocateSettings'
    #: constructor, which words its own errors for Python callers
    __init__ = Strict.__init__

    @field_validator("method")
    @classmethod
    def _each_once(cls, v):
        return each_once(v, "must name at least one method, each once")

    @property
    def methods(self) -> list[str]:
        """The located methods, the first being the one masks and importance are built from."""
        return [self.method] if isinstance(self.method, str) else list(self.method)


class Recipe(Strict):
    """A whole recipe. ``None`` for an optional section (attribution, masks, prune, export) turns
    that stage off."""

    version: Literal[1] = 1
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    attribution: AttributionSection | None = None
    masks: MasksSettings | None = None
    prune: PruneSettings | None = None
    evaluate: EvaluateSettings = EvaluateSettings()
    export: ExportSettings | None = None
    report: ReportSettings = ReportSettings()
    runtime: RuntimeSettings = RuntimeSettings()


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping.

    Raises:
        RecipeError: naming the first offending YAML path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    check_size(data, source)
    if "version" not in data:
        raise RecipeError(f"{source}: version: missing (this jas-prune reads version: 1)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(first_error(exc, Recipe)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a YAML recipe.

    Raises:
        RecipeError: missing file, malformed YAML or invalid content.
    """
    return parse_recipe(read_document(path, overrides), source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, sections in the documented order, every default spelled out."""
    raw = recipe.model_dump(mode="json", by_alias=True)
    ordered = {"version": raw["version"], **{k: raw[k] for k in SECTIONS}}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
