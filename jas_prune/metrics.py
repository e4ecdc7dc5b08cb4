"""The schema of ``metrics.json``: typed sections shared by the pipeline (writer) and the report.

``metrics.json`` is one mapping with a ``schema_version`` and one key per stage::

    schema_version  2 (a file without it was written by jas-prune before the schema: version 1)
    data            DataInfo          what the data source holds
    fingerprint     Fingerprint       SHA-256 of the model's weights
    dense           DenseMetrics      top-1/top-5, params, MACs of the unpruned model
    locate          LocateMetrics     the probe partition's locating (``locate_test``: the test's)
    masks           MasksInfo         the class TopK masks file
    paper           PaperMetrics      Table 1 (intervention), CLS-mask protocol (+ ablation), semantic check
    pruned          [PrunedEntry]     one per method x ratio x compensation (x class subset)
    export          [ExportRecord]    one per exported ONNX model (parity, latency, test top-1, precisions)
    run             RunInfo           wall time, device, torch

Files a stage writes for users (pruned checkpoints, ONNX files and their sidecars) are listed
with a file record ``{"file", "bytes", "sha256"}`` (``pruned[i].checkpoint_file``,
``export[i].onnx_file`` / ``sidecar_file``): ``--resume`` and ``jas-prune report`` tell a file that
changed since it was written.

Every section is a dataclass with ``from_dict`` / ``to_dict``. A section the run did not reach
is ``None``. Keys a section does not declare (added by newer stages, e.g. reconstruction
settings in a pruned entry) are kept in its ``extra`` mapping, and a key that was absent stays
absent: ``Metrics.from_dict(d).to_dict() == d`` for every file this schema reads.

Typical use::

    m = read_metrics(RunDir(run).metrics)      # MetricsSchemaError for another schema version
    m.dense.top1, [e.top1 for e in m.pruned or []]
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar, Union

from .errors import MetricsSchemaError

__all__ = [
    "SCHEMA_VERSION",
    "Section",
    "Metrics",
    "DataInfo",
    "Fingerprint",
    "DenseMetrics",
    "LocateMetrics",
    "MasksInfo",
    "PaperMetrics",
    "InterventionRow",
    "ClsMaskMetrics",
    "ClsMaskPoint",
    "ClsMaskAblationRow",
    "SemanticCheck",
    "PrunedEntry",
    "PrecisionRecord",
    "ExportRecord",
    "LatencyRecord",
    "SpeedupRecord",
    "Fp16Record",
    "RunInfo",
    "AtlasInfo",
    "read_metrics",
    "schema_version_of",
]

#: The version this jas-prune writes and reads.
SCHEMA_VERSION = 2

S = TypeVar("S", bound="Section")

#: metadata flag: a key the writer only sets sometimes (left out of ``to_dict`` when None)
_OPTIONAL_KEY = "optional_key"


def _opt(default: Any = None) -> Any:
    """A field whose key the writer sets only in some cases (absent, not null, otherwise)."""
    return field(default=default, metadata={_OPTIONAL_KEY: True})


# -- the machinery: dataclass <-> mapping, nested sections by their type hints ------------------


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (anything else unchanged)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` read from JSON as type ``tp``: sections (also in lists and dict values) are built."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if _is_section(tp):
        return tp.from_dict(value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and _needs_decoding(args[0]):
        if not isinstance(value, list):
            raise MetricsSchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and _needs_decoding(args[1]):
        if not isinstance(value, Mapping):
            raise MetricsSchemaError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {k: _decode(args[1], v, _join(where, k)) for k, v in value.items()}
    return value


def _needs_decoding(tp: Any) -> bool:
    tp = _unwrap_optional(tp)
    if _is_section(tp):
        return True
    return any(_needs_decoding(a) for a in typing.get_args(tp))


def _encode(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class Section:
    """Base of every ``metrics.json`` section: JSON mapping <-> typed fields.

    Attributes:
        extra: keys this schema does not declare, kept as they were read (written back last).
    """

    extra: dict[str, Any] = field(default_factory=dict)
    #: the keys of the mapping this was read from, in order (None: built in code)
    _keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    _hints: ClassVar[dict[type, dict[str, Any]]] = {}

    @classmethod
    def _fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in ("extra", "_keys")]

    @classmethod
    def _types(cls) -> dict[str, Any]:
        if cls not in Section._hints:
            Section._hints[cls] = typing.get_type_hints(cls)
        return Section._hints[cls]

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str | None = None) -> S:
        """Build the section from its JSON mapping.

        Raises:
            MetricsSchemaError: ``data`` is not a mapping, or lacks a key the section requires
                (naming the key's path, e.g. ``pruned[2].top1``).
        """
        where = cls.__name__ if where is None else where
        if not isinstance(data, Mapping):
            raise MetricsSchemaError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = cls._types()
        kwargs: dict[str, Any] = {}
        for f in cls._fields():
            if f.name in data:
                kwargs[f.name] = _decode(hints[f.name], data[f.name], _join(where, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MetricsSchemaError(f"{_join(where, f.name)}: missing")
        declared = {f.name for f in cls._fields()}
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in declared}, _keys=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON mapping; ``from_dict(d).to_dict() == d``, keys in the same order.

        A ``None`` field is written when its key was read, or, for a section built in code,
        unless the writer sets that key only sometimes (absent, not null, otherwise).
        """
        out: dict[str, Any] = {}
        for f in self._fields():
            value = getattr(self, f.name)
            if value is None:
                keep = (f.name in self._keys) if self._keys is not None else not f.metadata.get(_OPTIONAL_KEY)
                if not keep:
                    continue
            out[f.name] = _encode(value)
        out.update(self.extra)
        if self._keys is None:
            return out
        order = {k: i for i, k in enumerate(self._keys)}  # keys read keep their place, new ones go last
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


# -- the sections ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataInfo(Section):
    """``data``: the data source of the run."""

    kind: str
    classes: int
    images: int | None = None
    probe: int | None = None
    test: int | None = None


@dataclass(kw_only=True)
class Fingerprint(Section):
    """``fingerprint``: what the stored results were computed from."""

    model: str | None = None  # SHA-256 of the weights (pathstore.weights_digest)


@dataclass(kw_only=True)
class DenseMetrics(Section):
    """``dense``: the unpruned model on the test partition."""

    top1: float
    top5: float | None = None
    params: int | None = None
    macs: int | None = None
    test_images: int | None = None


@dataclass(kw_only=True)
class LocateMetrics(Section):
    """``locate`` / ``locate_test``: one partition's locating, with the attribution settings."""

    images: int
    methods: list[str]
    images_this_run: int | None = None
    chunks_resumed: int | None = None
    seconds: float | None = None
    images_per_second: float | None = None
    world_size: int | None = None
    seconds_per_rank: list[float] | None = None
    device: str | None = None
    steps: int | None = None
    topk: int | None = None
    scope: str | None = None
    formula: str | None = None
    quadrature: str | None = None
    candidates: str | None = None
    target: str | None = None
    layers: int | list[int] | None = None
    internal_batch_size: int | None = None
    units: list[str] | None = None

    #: the settings a report shows, in its order
    SHOWN_SETTINGS: ClassVar[tuple[str, ...]] = ("steps", "topk", "scope", "formula", "quadrature", "candidates",
                                                 "target")

    def shown_settings(self) -> dict[str, Any]:
        """The attribution settings a report prints (those recorded, in a fixed order)."""
        recorded = self.to_dict()
        return {k: recorded[k] for k in self.SHOWN_SETTINGS if k in recorded}


@dataclass(kw_only=True)
class MasksInfo(Section):
    """``masks``: the class TopK masks built from the probe paths."""

    file: str
    method: str
    topk: int
    classes: int
    probe_images: int
    importance: str | None = None
    layers: list[int] | None = None


@dataclass(kw_only=True)
class InterventionRow(Section):
    """One method of paper Table 1 (``paper.intervention[method]``)."""

    path_jas_mean: float | None = None
    removal_acc_dev: float | None = None
    removal_prob_dev_mean: float | None = None
    removal_prob_dev_median: float | None = None
    enhancement_acc_dev: float | None = None
    enhancement_prob_dev_mean: float | None = None
    enhancement_prob_dev_median: float | None = None
    images: int | None = None
    top1: float | None = None


@dataclass(kw_only=True)
class ClsMaskPoint(Section):
    """Accuracy of one mask at one fraction p of the CLS-mask protocol."""

    fraction: float
    top1: float
    top5: float


@dataclass(kw_only=True)
class ClsMaskAblationRow(Section):
    """One cell of the CLS-mask ablation (paper Table 3): mask x top-K x depth x fraction."""

    mask: str
    topk: int
    depth: int
    fraction: float
    top1: float
    top5: float


@dataclass(kw_only=True)
class ClsMaskMetrics(Section):
    """``paper.cls_mask``: the paper's CLS-token masking protocol (and its ablation)."""

    topk: int
    depth: int
    fractions: list[float]
    results: dict[str, list[ClsMaskPoint]]
    test_images: int | None = None
    ablation: list[ClsMaskAblationRow] | None = _opt()


@dataclass(kw_only=True)
class SemanticCheck(Section):
    """``paper.semantic``: paper Finding 4 on shape x colour classes (``semantic.semantic_check``)."""

    mean: dict[str, float | None]
    pairs: dict[str, int]
    auc: float | None = None
    auc_shape: float | None = None
    auc_colour: float | None = None


@dataclass(kw_only=True)
class PaperMetrics(Section):
    """``paper``: the paper's evaluations; each part is None when the run did not do it."""

    intervention: dict[str, InterventionRow] | None = _opt()
    cls_mask: ClsMaskMetrics | None = _opt()
    semantic: SemanticCheck | None = _opt()


@dataclass(kw_only=True)
class PrunedEntry(Section):
    """One pruned model (``pruned[i]``): method x ratio x compensation (x class subset)."""

    method: str
    ratio: float
    top1: float
    checkpoint: str
    classes: list[int] | None = None
    top5: float | None = None
    params: int | None = None
    macs: int | None = None
    bias_compensation: bool = False
    mode: str | None = None
    head: str | None = None
    dense_top1: float | None = None
    dense_top5: float | None = None
    test_images: int | None = None
    removed_fraction: float | None = None
    widths: dict[str, int] | None = None  # block -> kept FFN width (JSON keys are strings)
    finetune: dict[str, Any] | None = None
    #: ``prune.recover``: its settings and what the distillation did (steps, losses, seconds)
    recover: dict[str, Any] | None = _opt()
    score_seconds: float | None = None
    importance: str | None = _opt()  # JAS only: the masks' importance aggregation
    #: the checkpoint's file record ``{"file", "bytes", "sha256"}`` (``io.file_record``), taken
    #: when it was written: ``--resume`` and ``jas-prune report`` notice a file changed since
    checkpoint_file: dict[str, Any] | None = _opt()
    #: none | bias | lsq (``prune.reconstruction``); absent in runs before it existed
    reconstruction: str | None = _opt()
    #: local | global | residual, the ridge damping, the calibration images (for bias and lsq)
    reconstruction_target: str | None = _opt()
    reconstruction_damping: float | None = _opt()
    calibration_images: int | None = _opt()
    #: wall time of the reconstruction alone
    reconstruction_seconds: float | None = _opt()
    #: per block: width, relative calibration error before/after, whether the refit was kept
    reconstruction_blocks: list[dict[str, Any]] | None = _opt()
    #: the attention output projections refit (blocks that lost heads or head dimensions), as above
    reconstruction_attention: list[dict[str, Any]] | None = _opt()
    #: what the criterion's importance cost (JAS from masks: the locating of the probe partition)
    importance_seconds: float | None = _opt()
    #: index of the ``prune.class_subsets`` draw this entry belongs to
    class_subset: int | None = _opt()
    #: global mode: the share of a uniform cut's width every block kept at least (``prune.global_min_keep``)
    global_min_keep: float | None = _opt()
    #: the criterion's own settings the scores depended on (``prune.vit_slim``; JAS class subsets: ``masks.topk``)
    criterion_options: dict[str, Any] | None = _opt()
    #: probe images the criterion's importance read (of the classes pruned for)
    probe_images: int | None = _opt()
    #: kept FFN widths were rounded to a multiple of this (``prune.round_to``; absent: not rounded)
    round_to: int | None = _opt()
    #: an entry made for ``prune.budget``: the target (``target``, ``value``, ``step``, ``batch_size``
    #: for latency; a split budget: ``units``, ``split``, ``shares``, ``weights``, ``normalise``) and what
    #: was found (``ratio``, ``achieved``: the MACs/params fraction or the p50 ms; a split budget: the
    #: kept geometry per block ``blocks``, the candidates and their probe top-1, ``chosen``)
    budget: dict[str, Any] | None = _opt()
    #: prune.attention: heads / head dimensions removed and kept per block (AttentionSummary)
    attention: dict[str, Any] | None = _opt()

    #: the keys of a ``budget`` record that identify the budget (the rest is what was found)
    BUDGET_SPEC: ClassVar[tuple[str, ...]] = ("target", "value", "step", "batch_size", "units", "split", "shares",
                                              "weights", "normalise", "points", "logits")

    def identity(self) -> dict[str, Any]:
        """The settings this entry was made with, as
        :meth:`jas_prune.pruning.settings.ResolvedPrune.identity` names them (entries of older
        runs, which left some unset, read as the defaults they were made with)."""
        return {"method": self.method, "ratio": self.ratio, "classes": self.classes, "head": self.head or "keep",
                "mode": self.mode or "uniform",
                "reconstruction": self.reconstruction or ("bias (mean shift)" if self.bias_compensation else "none"),
                "global_min_keep": self.global_min_keep,
                "importance": (self.importance or "mean") if self.method == "jas" else None,
                "reconstruction_target": self.reconstruction_target,
                "reconstruction_damping": self.reconstruction_damping,
                "calibration_images": self.calibration_images, "criterion_options": self.criterion_options,
                "round_to": self.round_to,
                "budget": None if self.budget is None else {k: self.budget[k] for k in self.BUDGET_SPEC
                                                            if k in self.budget},
                # a split budget chose the attention it records; prune.attention is not set then
                "attention": None if self.attention is None or "units" in (self.budget or {})
                else {k: self.attention[k] for k in ("heads", "head_dims", "logits") if k in self.attention},
                "recover": self.recover["settings"] if self.recover else None}

    @property
    def reconstruction_name(self) -> str:
        """``reconstruction``, or for older entries ``bias`` / ``none`` from ``bias_compensation``."""
        return self.reconstruction or ("bias" if self.bias_compensation else "none")

    @property
    def stem(self) -> str:
        """The checkpoint's name without ``.safetensors`` (the export record's ``model``)."""
        return self.checkpoint.removesuffix(".safetensors")

    def width_signature(self) -> tuple[tuple[int, int], ...] | None:
        """(block, kept width) pairs, sorted: models with the same signature have identical FFN shapes."""
        if not self.widths:
            return None
        return tuple(sorted((int(k), int(v)) for k, v in self.widths.items()))


@dataclass(kw_only=True)
class SpeedupRecord(Section):
    """Speed-up over a reference model measured in the same interleaved benchmark.

    ``median`` is the median over repetitions of (reference time / this model's time) taken in
    the same round; ``low``/``high`` a bootstrap confidence interval of that median.
    """

    reference: str
    median: float
    low: float | None = None
    high: float | None = None
    confidence: float | None = None
    repeats: int | None = None


@dataclass(kw_only=True)
class LatencyRecord(Section):
    """One runtime x batch size timing (``export[i].latency[j]``, ``torch_latency[j]``)."""

    batch_size: int
    latency_ms_p50: float | None = None
    runtime: str | None = None
    path: str | None = None
    provider: str | None = None
    threads: int | None = None
    warmup: int | None = None
    iters: int | None = None
    latency_ms_p90: float | None = None
    latency_ms_mean: float | None = None
    images_per_second: float | None = None
    # interleaved benchmarks (deploy.latency.benchmark_many) also record the spread:
    latency_ms_p25: float | None = _opt()
    latency_ms_p75: float | None = _opt()
    repeats: int | None = _opt()
    interleaved: bool | None = _opt()
    speedup: SpeedupRecord | None = _opt()


@dataclass(kw_only=True)
class Fp16Record(Section):
    """``export[i].fp16``: the float16 export of the same model (CUDA only)."""

    path: str | None = None
    exporter: str | None = None
    verified: bool | None = None
    error: str | None = _opt()
    parity_max_abs: float | None = None
    top1_agreement: float | None = None
    parity_tolerance: float | None = None
    provider: str | None = None
    latency: list[LatencyRecord] | None = _opt()
    onnx_file: dict[str, Any] | None = _opt()  # file record of ``path`` (as ExportRecord.onnx_file)
    sidecar_file: dict[str, Any] | None = _opt()


@dataclass(kw_only=True)
class PrecisionRecord(Section):
    """``export[i].precisions[j]``: one lower-precision copy of the model (``int8_static``,
    ``int8_dynamic``, ``fp16``; :func:`jas_prune.deploy.variants.export_precisions`), with its
    test-partition figures through ONNX Runtime and its latency timed with the float32 models."""

    precision: str
    path: str | None = None
    sidecar: str | None = None
    tested: bool | None = None
    error: str | None = _opt()
    note: str | None = _opt()
    size_bytes: int | None = _opt()
    seconds: float | None = _opt()
    test_top1: float | None = _opt()
    top1_agreement: float | None = _opt()  # with the float32 file, on the test partition
    parity_max_abs: float | None = _opt()  # max |Δlogit| against the float32 file
    test_images: int | None = _opt()
    calibration: dict[str, Any] | None = _opt()
    float_ops: list[str] | None = _opt()
    float_nodes: int | None = _opt()
    #: int8_static: every float-group rung tried on the probe partition, and the probe top-1s
    selection: list[dict[str, Any]] | None = _opt()
    probe_top1: float | None = _opt()
    probe_top1_fp32: float | None = _opt()
    probe_images: int | None = _opt()
    settings: dict[str, Any] | None = _opt()
    latency: list[LatencyRecord] | None = _opt()
    onnx_file: dict[str, Any] | None = _opt()
    sidecar_file: dict[str, Any] | None = _opt()

    @property
    def ok(self) -> bool:
        return not self.error

    def latency_at(self, batch_size: int) -> LatencyRecord | None:
        return next((r for r in self.latency or [] if r.batch_size == batch_size), None)


@dataclass(kw_only=True)
class ExportRecord(Section):
    """One exported ONNX model (``export[i]``): parity against PyTorch and latency."""

    model: str
    checkpoint: str | None = None  # None for the dense model
    path: str | None = None
    parity_max_abs: float | None = None
    top1_agreement: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_batch_size: int | None = None
    provider: str | None = None
    exporter: str | None = None
    fallback_reason: str | None = None
    opset: int | None = None
    sidecar: str | None = None
    export_seconds: float | None = None
    verified: bool | None = None
    parity_tolerance: float | None = _opt()
    error: str | None = _opt()
    latency: list[LatencyRecord] = field(default_factory=list)
    torch_latency: list[LatencyRecord] = field(default_factory=list)
    fp16: Fp16Record | None = _opt()
    #: the float32 file's top-1 on the test partition through ONNX Runtime, and on how many images
    test_top1: float | None = _opt()
    test_images: int | None = _opt()
    #: the other precisions of ``export.onnx.precision`` (INT8, float16)
    precisions: list[PrecisionRecord] | None = _opt()
    #: file records ``{"file", "bytes", "sha256"}`` of the ONNX file and its sidecar, taken when
    #: they were written (tamper evidence; ``--resume`` keeps an export whose files still match)
    onnx_file: dict[str, Any] | None = _opt()
    sidecar_file: dict[str, Any] | None = _opt()
    #: what the file was exported from: the checkpoint file's SHA-256 (a pruned model) or the
    #: weights digest ``fingerprint.model`` (the dense model)
    source_sha256: str | None = _opt()

    @property
    def ok(self) -> bool:
        """Exported and not failed."""
        return not self.error

    def latency_at(self, batch_size: int) -> LatencyRecord | None:
        """The ONNX Runtime timing at ``batch_size`` (None when not timed)."""
        return next((r for r in self.latency if r.batch_size == batch_size), None)


@dataclass(kw_only=True)
class RunInfo(Section):
    """``run``: the whole run."""

    seconds: float | None = None
    device: str | None = None
    torch: str | None = None
    world_size: int | None = None


@dataclass(kw_only=True)
class AtlasInfo(Section):
    """``atlas``: the neuron atlas (``report.atlas``, ``jas-prune atlas``) and what it cost.

    ``colour_check``: per class its first located block's path neuron's mean activation on images
    of the class's colour vs the other colours (``*_ratio`` = same / other), on the test and the
    probe partition; ``colour_by_block`` summarises the same check for every block. ``shared``: path neurons shared by many classes vs class-specific ones.
    """

    page: str
    method: str
    scope: str
    classes: list[int]
    neurons: list[str]
    images: int
    k: int
    figures: list[str] = field(default_factory=list)
    colour_check: list[dict[str, Any]] | None = None
    colour_by_block: dict[str, dict[str, Any]] | None = None
    shared: dict[str, Any] | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = None
    state_mb: float | None = None
    cuda_peak_mb: float | None = None


@dataclass(kw_only=True)
class Metrics(Section):
    """The whole ``metrics.json`` (sections the run did not reach are None)."""

    schema_version: int = SCHEMA_VERSION
    data: DataInfo | None = _opt()
    fingerprint: Fingerprint | None = _opt()
    dense: DenseMetrics | None = _opt()
    locate: LocateMetrics | None = _opt()
    locate_test: LocateMetrics | None = _opt()
    masks: MasksInfo | None = _opt()
    paper: PaperMetrics | None = _opt()
    pruned: list[PrunedEntry] | None = _opt()
    export: list[ExportRecord] | None = _opt()
    run: RunInfo | None = _opt()
    atlas: AtlasInfo | None = _opt()

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "Metrics":
        """Build from a ``metrics.json`` mapping of this schema version.

        Raises:
            MetricsSchemaError: not a mapping, another ``schema_version`` (or none: version 1),
                or a section without a key it requires.
        """
        source = where or "metrics.json"
        if not isinstance(data, Mapping):
            raise MetricsSchemaError(f"{source}: not a metrics file (a JSON mapping expected, "
                                     f"got {type(data).__name__})")
        version = schema_version_of(data)
        if version != SCHEMA_VERSION:
            age = "an older" if isinstance(version, int) and version < SCHEMA_VERSION else "another"
            raise MetricsSchemaError(f"{source}: written by {age} jas-prune (metrics schema version {version}); "
                                     f"this jas-prune reads version {SCHEMA_VERSION}: rerun the recipe into a new "
                                     "--out directory")
        try:
            return super().from_dict(data, "")
        except MetricsSchemaError as exc:
            raise MetricsSchemaError(f"{source}: {exc}") from None

    # -- lookups the report needs ------------------------------------------------------------

    def pruned_by_checkpoint(self) -> dict[str, PrunedEntry]:
        """Checkpoint name -> its pruned entry."""
        return {e.checkpoint: e for e in self.pruned or []}

    def dense_export(self) -> ExportRecord | None:
        """The dense model's export record (the one without a checkpoint), when it succeeded."""
        return next((r for r in self.export or [] if r.checkpoint is None and r.ok), None)


def schema_version_of(data: Mapping[str, Any]) -> Any:
    """The ``schema_version`` of a metrics mapping (1 for a file written before the schema)."""
    return data.get("schema_version", 1)


def read_metrics(path: str | os.PathLike[str]) -> Metrics:
    """Read ``metrics.json`` into its typed form.

    Raises:
        MetricsSchemaError: the file is not JSON, not a mapping, or of another schema version
            (naming the file, its version, the supported one and what to do).
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetricsSchemaError(f"{path}: not a metrics file (not valid JSON: {exc})") from None
    return Metrics.from_dict(data, str(path))
