"""Recipe schema (YAML, ``version: 1``), loading, ``--set`` overrides and validation errors.

Every level rejects unknown keys; every error names its YAML path, e.g.
``attribution.steps: must be ≥ 1``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .attribution import METHODS, QUADRATURES, LocateSettings
from .attribution.settings import CANDIDATES, FORMULAS, SCOPES, SETTING_NAMES, TARGETS
from .errors import AttributionSettingError, RecipeError
from .pruning.choices import DEFAULT_DAMPING, DEFAULT_TARGET, RECONSTRUCTIONS, TARGETS as RECONSTRUCTION_TARGETS
from .pruning.criteria import CRITERIA

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

SECTIONS = ("model", "data", "attribution", "masks", "prune", "evaluate", "export", "runtime")
#: attribution.method values: the registered attribution methods
LOCATE_METHODS = METHODS.names()
#: prune.methods values: the registered pruning criteria
PRUNE_METHODS = CRITERIA.names()
_PruneMethod = Literal[PRUNE_METHODS]  # type: ignore[valid-type]
_LocateMethod = Literal[LOCATE_METHODS]  # type: ignore[valid-type]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSection(_Section):
    name: str = "builtin:shapes-vit"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = Field(default=None, ge=1)


class DataSection(_Section):
    kind: Literal["shapes", "imagefolder"] = "shapes"
    root: str | None = None
    probe_fraction: float = Field(default=0.8, gt=0.0, lt=1.0)
    images_per_class: int | None = Field(default=None, ge=2)
    #: probe images kept per class for attribution, masks, criteria and calibration; the test
    #: partition is the same with or without it (the images left out are used nowhere)
    probe_images_per_class: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DataSection":
        if self.kind == "imagefolder" and not self.root:
            raise ValueError("root: required when kind is 'imagefolder'")
        return self


class AttributionSection(_Section):
    """The locate settings (:class:`~jas_prune.attribution.LocateSettings` checks their rules)."""

    method: Union[_LocateMethod, list[_LocateMethod]] = "jas"
    steps: int = Field(default=20, ge=1)
    topk: int = Field(default=1, ge=1)
    scope: Literal[SCOPES] = "cls"  # type: ignore[valid-type]
    formula: Literal[FORMULAS] = "paper"  # type: ignore[valid-type]
    quadrature: Literal[QUADRATURES] = "left"  # type: ignore[valid-type]
    candidates: Literal[CANDIDATES] = "layer_scaled"  # type: ignore[valid-type]
    target: Literal[TARGETS] = "label"  # type: ignore[valid-type]
    layers: int | list[int] | None = None
    internal_batch_size: int | None = Field(default=None, ge=1)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be ≥ 1 (a prefix depth) or a list of block indices")
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError("block indices must be distinct and ≥ 0")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must name at least one method, each once")
        return v

    @model_validator(mode="after")
    def _settings(self) -> "AttributionSection":
        try:  # the rules of the settings themselves live in one place
            LocateSettings(method=self.methods[0], **{k: getattr(self, k) for k in SETTING_NAMES})
        except AttributionSettingError as exc:  # "attribution.steps: ..." -> "steps: ..." (the path is added)
            raise ValueError(str(exc).removeprefix("attribution.")) from None
        return self

    @property
    def methods(self) -> list[str]:
        """The located methods, the first being the one masks and importance are built from."""
        m = [self.method] if isinstance(self.method, str) else list(self.method)
        if not m:
            raise RecipeError("attribution.method: must name at least one method")
        return m


class MasksSection(_Section):
    topk: int = Field(default=5, ge=1)
    #: how per-image candidate scores become the importance JAS pruning uses (aggregate.py)
    importance: Literal["mean", "mean_abs", "mean_abs_centered"] = "mean"


class FinetuneSection(_Section):
    epochs: float = Field(default=1.0, ge=0.0)
    lr: float = Field(default=1e-4, gt=0.0)


_Reconstruction = Literal[RECONSTRUCTIONS]  # type: ignore[valid-type]
_Mode = Literal["uniform", "global"]


def _check_ratios(v: list[float]) -> list[float]:
    if not v:
        raise ValueError("must list at least one ratio")
    for r in v:
        if not 0.0 < r < 1.0:
            raise ValueError(f"{r} is outside (0, 1): a ratio is the fraction of FFN neurons removed")
    return v


class CalibrationSection(_Section):
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
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"must be a finite number ≥ 0 (got {v!r})")
        return v


class ClassSubsetsSection(_Section):
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
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must list at least one of none, bias, lsq, each once")
        return [v] if isinstance(v, str) else v


class BudgetSection(_Section):
    """``prune.budget``: besides ``prune.ratios``, the smallest uniform removal ratio (a multiple
    of ``step``, honouring ``prune.round_to``) whose pruned model keeps at most ``macs`` /
    ``params`` of the dense model's (a fraction), or runs at most ``latency_ms`` (ONNX Runtime
    p50 at ``batch_size``, default 1) — one target (:mod:`jas_prune.pruning.budget`)."""

    macs: float | None = Field(default=None, gt=0.0, le=1.0)
    params: float | None = Field(default=None, gt=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    batch_size: int | None = Field(default=None, ge=1)
    step: float = Field(default=0.01, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_target(self) -> "BudgetSection":
        given = [k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of macs, params or latency_ms"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.latency_ms is None and self.batch_size is not None:
            raise ValueError("batch_size: only with latency_ms (MACs and parameters do not depend on the batch)")
        if self.latency_ms is not None and self.batch_size is None:
            self.batch_size = 1
        return self

    @property
    def target(self) -> str:
        """``macs``, ``params`` or ``latency_ms``."""
        return next(k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None)


class _PruneFields(_Section):
    """``prune``: the fixed keys. Every criterion with options adds its own section
    ``prune.<criterion>`` (e.g. ``prune.vit_slim``), taken from the criterion registry."""

    methods: list[_PruneMethod] = ["jas"]
    ratios: list[float] = [0.5]
    #: uniform | global, or a mapping ratio -> mode (ratios not listed: uniform)
    mode: Union[_Mode, dict[float, _Mode]] = "uniform"
    #: global mode: every block keeps at least this share of the neurons a uniform cut keeps
    global_min_keep: float = Field(default=0.5, ge=0.0, le=1.0)
    classes: list[Union[int, str]] | None = None
    class_subsets: ClassSubsetsSection | None = None
    head: Literal["keep", "cut"] = "keep"
    #: none | bias | lsq, or a list of them compared side by side (default: none)
    reconstruction: Union[_Reconstruction, list[_Reconstruction]] | None = None
    #: the older spelling: true = [bias], false = [none], [false, true] = [none, bias]
    bias_compensation: bool | list[bool] | None = None
    calibration: CalibrationSection = CalibrationSection()
    finetune: FinetuneSection | None = None
    #: kept FFN widths a multiple of this (the nearest; null or 1: not rounded)
    round_to: int | None = Field(default=None, ge=1, strict=True)
    #: a MACs / params / latency target, met by the smallest uniform ratio (adds entries)
    budget: BudgetSection | None = None

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
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must list at least one of none, bias, lsq, each once")
        return v

    @field_validator("bias_compensation")
    @classmethod
    def _bias_compensation(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must be true, false or a list of them, each once")
        return v

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

    @property
    def reconstructions(self) -> list[str]:
        """The reconstructions compared, in the recipe's order."""
        r = self.reconstruction
        return ["none"] if r is None else [r] if isinstance(r, str) else list(r)

    def mode_for(self, ratio: float) -> str:
        """The allocation at ``ratio``: the mode, or the mapping's entry (uniform when not listed)."""
        if isinstance(self.mode, str):
            return self.mode
        return next((m for r, m in self.mode.items() if abs(r - ratio) < 1e-9), "uniform")

    def options_for(self, method: str) -> BaseModel | None:
        """The options section of criterion ``method`` (None when it has none)."""
        return getattr(self, method) if CRITERIA.get(method).options is not None else None


def _criterion_sections() -> dict[str, Any]:
    taken = set(_PruneFields.model_fields)
    out: dict[str, Any] = {}
    for c in CRITERIA:
        if c.options is not None:
            if c.name in taken:
                raise RuntimeError(f"pruning criterion {c.name!r}: its options section would shadow prune.{c.name}")
            out[c.name] = (c.options, Field(default_factory=c.options))
    return out


PruneSection = create_model("PruneSection", __base__=_PruneFields, __doc__=_PruneFields.__doc__,
                            __module__=__name__, **_criterion_sections())


class ClsMaskAblationSection(_Section):
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


class ClsMaskSection(_Section):
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


class EvaluateSection(_Section):
    protocols: list[Literal["structured", "paper_cls_mask"]] = ["structured"]
    intervention: bool = False
    cls_mask: ClsMaskSection = ClsMaskSection()


class OnnxSection(_Section):
    """``benchmark`` times every exported model together in ONNX Runtime at each of
    ``batch_sizes`` (at most ``max_seconds`` per batch size after a few rounds), and PyTorch too
    with ``torch_latency``: at ViT-B scale, batch 32 with PyTorch timing costs minutes per model."""

    opset: int = Field(default=18, ge=13, le=23)
    verify: bool = True
    benchmark: bool = True
    batch_sizes: list[int] = [1, 32]
    torch_latency: bool = True
    max_seconds: float = Field(default=120.0, gt=0.0)
    providers: list[Literal["cuda", "cpu"]] = ["cuda", "cpu"]
    fp16: bool = False

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(b < 1 for b in v):
            raise ValueError(f"must list distinct batch sizes ≥ 1 (got {v})")
        return v


class ExportSection(_Section):
    onnx: OnnxSection | None = OnnxSection()


class RuntimeSection(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"


class Recipe(_Section):
    """A whole recipe. ``None`` for an optional section (attribution, masks, prune, export) turns
    that stage off."""

    version: Literal[1] = 1
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    attribution: AttributionSection | None = None
    masks: MasksSection | None = None
    prune: PruneSection | None = None
    evaluate: EvaluateSection = EvaluateSection()
    export: ExportSection | None = None
    runtime: RuntimeSection = RuntimeSection()


def _fields_of(model_cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model_cls.model_fields.items()]


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the mapping at ``loc`` (for "did you mean" suggestions)."""
    cls: Any = Recipe
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return cls


def _friendly(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list", "literal"))))
    path = ".".join(str(p) for p in loc) or "recipe"
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _section_class(loc[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), _fields_of(parent), n=1, cutoff=0.5)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            else:
                hint = f" (valid keys: {', '.join(_fields_of(parent))})"
        return f"{path}: unknown key{hint}"
    if kind == "greater_than_equal":
        return f"{path}: must be ≥ {ctx.get('ge')} (got {err.get('input')!r})"
    if kind == "greater_than":
        return f"{path}: must be > {ctx.get('gt')} (got {err.get('input')!r})"
    if kind == "less_than":
        return f"{path}: must be < {ctx.get('lt')} (got {err.get('input')!r})"
    if kind == "less_than_equal":
        return f"{path}: must be ≤ {ctx.get('le')} (got {err.get('input')!r})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: must be a mapping of keys to values (got {err.get('input')!r})"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        key, sep, rest = msg.partition(": ")
        if sep and key.isidentifier():  # a section-level check that names its key
            return f"{path}.{key}: {rest}" if loc else f"{key}: {rest}"
        return f"{path}: {msg}"
    return f"{path}: {err['msg'][0].lower() + err['msg'][1:]} (got {err.get('input')!r})"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping.

    Raises:
        RecipeError: naming the first offending YAML path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    if "version" not in data:
        raise RecipeError(f"{source}: version: missing (this jas-prune reads version: 1)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a union reports one error per alternative: keep the most specific one
        errors.sort(key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
        raise RecipeError(_friendly(errors[0])) from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``KEY=VALUE`` overrides with dotted keys; values are parsed as YAML scalars/lists.

    Raises:
        RecipeError: for a malformed override.
    """
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. attribution.steps=8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item}: empty key segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a YAML recipe.

    Raises:
        RecipeError: missing file, malformed YAML or invalid content.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return parse_recipe(apply_overrides(data or {}, overrides), source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, sections in the documented order, every default spelled out."""
    raw = recipe.model_dump(mode="json", by_alias=True)
    ordered = {"version": raw["version"], **{k: raw[k] for k in SECTIONS}}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
