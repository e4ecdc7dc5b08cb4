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
from pydantic import Field, ValidationError, field_validator, model_validator

from .atlas.settings import ReportSettings
from .attribution import METHODS, LocateSettings
from .deploy.quantize import CalibrationSettings, PrecisionList
from .document import apply_overrides, check_size, read_document
from .errors import RecipeError
from .pruning.settings import PRUNE_METHODS, PruneSettings
from .schema import Strict, each_once, first_error

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

#: ``data.images_per_class`` at most: the built-in data renders every image of the partition
#: (48 classes × 10 000 images is already a long run on a GPU)
IMAGES_PER_CLASS_MAX = 10_000

SECTIONS = ("model", "data", "attribution", "masks", "prune", "evaluate", "export", "report", "runtime")
#: attribution.method values: the registered attribution methods
LOCATE_METHODS = METHODS.names()


class ModelSection(Strict):
    name: str = "builtin:shapes-vit"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = Field(default=None, ge=1)


class DataSection(Strict):
    kind: Literal["shapes", "imagefolder"] = "shapes"
    root: str | None = None
    probe_fraction: float = Field(default=0.8, gt=0.0, lt=1.0)
    images_per_class: int | None = Field(default=None, ge=2, le=IMAGES_PER_CLASS_MAX)
    #: probe images kept per class for attribution, masks, criteria and calibration; the test
    #: partition is the same with or without it (the images left out are used nowhere)
    probe_images_per_class: int | None = Field(default=None, ge=1, le=IMAGES_PER_CLASS_MAX)
    classes: int | None = Field(default=None, ge=1)  # the data set's first N classes (label order)
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DataSection":
        if self.kind == "imagefolder" and not self.root:
            raise ValueError("root: required when kind is 'imagefolder'")
        return self


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


class MasksSection(Strict):
    topk: int = Field(default=5, ge=1)
    #: how per-image candidate scores become the importance JAS pruning uses (aggregate.py)
    importance: Literal["mean", "mean_abs", "mean_abs_centered"] = "mean"


class ClsMaskAblationSection(Strict):
    """The paper's Table 3-style ablation: every top-K × depth × fraction for the class TopK
    masks of the first located method, beside random masks of the same size."""

    topk: list[int] = [1, 5, 10]
    depth: list[int] | None = None  # None: 1/3, 2/3 and all of the model's blocks

    @field_validator("topk", "depth")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one value")
            if any(k < 1 for k in v):
                raise ValueError("every value must be ≥ 1")
        return v


class ClsMaskSection(Strict):
    fractions: list[float] = [0.5]
    depth: int | None = Field(default=None, ge=1)
    ablation: ClsMaskAblationSection | None = None

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{p} is outside [0, 1]")
        return v


class EvaluateSection(Strict):
    protocols: list[Literal["structured", "paper_cls_mask"]] = ["structured"]
    intervention: bool = False
    cls_mask: ClsMaskSection = ClsMaskSection()


class OnnxSection(Strict):
    """``benchmark`` times every exported model together in ONNX Runtime at each of
    ``batch_sizes`` (at most ``max_seconds`` per batch size after a few rounds), and PyTorch too
    with ``torch_latency``: at ViT-B scale, batch 32 with PyTorch timing costs minutes per model.
    ``precision`` and ``calibration``: :mod:`jas_prune.deploy.quantize` (INT8 / float16 copies)."""

    opset: int = Field(default=18, ge=13, le=23)
    verify: bool = True
    benchmark: bool = True
    batch_sizes: list[int] = [1, 32]
    torch_latency: bool = True
    max_seconds: float = Field(default=120.0, gt=0.0)
    providers: list[Literal["cuda", "cpu"]] = ["cuda", "cpu"]
    fp16: bool = False
    precision: PrecisionList = ["fp32"]
    calibration: CalibrationSettings = CalibrationSettings()

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(b < 1 for b in v):
            raise ValueError(f"must list distinct batch sizes ≥ 1 (got {v})")
        return v

    @model_validator(mode="after")
    def _one_fp16(self) -> "OnnxSection":
        """``fp16: true`` (the CUDA-only float16 copy timed beside each export) and ``fp16`` in
        ``precision`` (the tested float16 copy) both write ``MODEL.fp16.onnx``: one of them."""
        if self.fp16 and "fp16" in self.precision:
            raise ValueError("fp16: true and precision: [..., fp16] both write MODEL.fp16.onnx; "
                             "give one (precision: fp16 is tested on every machine, fp16: true only times it on CUDA)")
        return self


class ExportSection(Strict):
    onnx: OnnxSection | None = OnnxSection()


class RuntimeSection(Strict):
    #: seeds Python, NumPy and PyTorch (NumPy takes 0 … 2**32 - 1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"


class Recipe(Strict):
    """A whole recipe. ``None`` for an optional section (attribution, masks, prune, export) turns
    that stage off."""

    version: Literal[1] = 1
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    attribution: AttributionSection | None = None
    masks: MasksSection | None = None
    prune: PruneSettings | None = None
    evaluate: EvaluateSection = EvaluateSection()
    export: ExportSection | None = None
    report: ReportSettings = ReportSettings()
    runtime: RuntimeSection = RuntimeSection()


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
