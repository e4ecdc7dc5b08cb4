"""Lower-precision copies of an exported float32 ONNX file: INT8 (static QDQ, dynamic) and float16.

Each copy is one self-contained file beside the float32 one (``MODEL.int8_static.onnx``, ...)
with its own sidecar: the float32 sidecar plus ``precision``, ``calibration`` and ``float_ops``,
and the copy's own size and SHA-256, so the torch-free scripts in ``export/`` run it unchanged.

- ``int8_static``: QDQ format, per-channel symmetric INT8 weights, INT8 activations whose ranges
  come from calibration images (:class:`CalibrationSettings`: minmax, entropy or percentile).
  The matrix products (``Conv``, ``MatMul``, ``Gemm``) are quantised: they hold the work, and
  ONNX Runtime's CPU provider fuses their QDQ pattern into integer kernels. LayerNorm, Softmax,
  GELU and the residual adds always stay float (no integer kernel; a residual stream's outliers do
  not survive 8 bits). Which further groups stay float (the classifier head, the attention
  products, the patch embedding) is chosen on the probe partition: the ladder
  :data:`FLOAT_LADDER` is walked from the most quantised rung and the first rung whose probe top-1
  is within ``max_top1_drop`` points of the float32 file's is kept (else the best rung).
- ``int8_dynamic``: ONNX Runtime's dynamic quantisation of ``MatMul``/``Gemm`` (weights INT8,
  activations quantised per call; no calibration).
- ``fp16``: float16 weights and compute behind float32 input and output (made by the exporter
  from the PyTorch model, see :func:`~jas_prune.deploy.export_onnx`); meant for GPU providers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import AfterValidator, ConfigDict, Field

from ..errors import InvalidArgumentError
from ..io import atomic_write_text, sha256_file, storage_errors
from ..schema import Strict
from .runtime import create_session
from .sidecar import INPUT_NAME, OUTPUT_NAME, read_sidecar, sidecar_path

__all__ = ["PRECISIONS", "Precision", "CalibrationSettings", "FLOAT_GROUPS", "FLOAT_LADDER", "precision_path",
           "onnx_logits", "quantize_dynamic_file", "quantize_static_file", "choose_static", "write_variant_sidecar",
           "parse_precisions"]

log = logging.getLogger("jas_prune.export")

#: Every precision a model can be exported in; float32 is always exported (the reference).
PRECISIONS = ("fp32", "int8_dynamic", "int8_static", "fp16")
Precision = Literal["fp32", "int8_dynamic", "int8_static", "fp16"]
#: The operator types static INT8 quantises (the matrix products: where the time goes).
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: Operator types that always stay float in a static INT8 file (recorded in its ``float_ops``).
ALWAYS_FLOAT = ("LayerNormalization", "Softmax", "Erf/Gelu", "Add (residual)")


def _with_fp32(v: list[str]) -> list[str]:
    """fp32 first and always; each precision once, in the order given."""
    out = ["fp32"]
    for p in v:
        if p not in out:
            out.append(p)
    return out


#: ``export.onnx.precision``: a list of :data:`PRECISIONS` (fp32 added when missing).
PrecisionList = Annotated[list[Precision], AfterValidator(_with_fp32)]


class CalibrationSettings(Strict):
    """``export.onnx.calibration``: the probe images INT8 static calibration reads, and how the
    float groups are chosen.

    ``images_per_class`` probe images of every class feed the calibrator (``method``: ``minmax``
    ranges, ``entropy`` (KL) or ``percentile`` (99.999 %) histograms); the float-group ladder
    is judged on all probe images (at most ``probe_images``) against the float32 file's probe
    top-1, accepting a drop of at most ``max_top1_drop`` points.
    """

    model_config = ConfigDict(frozen=True)  # merged with the shared strict base's

    images_per_class: int = Field(default=4, ge=1, le=1000)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_top1_drop: float = Field(default=0.5, ge=0.0, le=100.0)
    probe_images: int = Field(default=512, ge=1, le=100_000)


def parse_precisions(values: Sequence[str], where: str = "--precision") -> list[str]:
    """Checked precision names (``fp32`` first, each once) from user input.

    Raises:
        InvalidArgumentError: a name that is not one of :data:`PRECISIONS`.
    """
    for v in values:
        if v not in PRECISIONS:
            raise InvalidArgumentError(f"{where}: unknown precision {v!r}; use one of {', '.join(PRECISIONS)}")
    return _with_fp32(list(values))


def precision_path(fp32_path: str | os.PathLike[str], precision: str) -> Path:
    """Where the ``precision`` copy of ``FILE.onnx`` goes: ``FILE.<precision>.onnx``."""
    p = Path(fp32_path)
    return p if precision == "fp32" else p.with_name(f"{p.stem}.{precision}.onnx")


def onnx_logits(path: str | os.PathLike[str], images: np.ndarray, *, batch_size: int = 32,
                threads: int | None = None) -> np.ndarray:
    """Logits of ``images`` ``[N, C, H, W]`` through ONNX Runtime's CPU provider, in batches."""
    sess = create_session(path, providers=("cpu",), threads=threads)
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


# -- float groups: nodes a static INT8 file may keep in float ---------------------------------------


def _head_nodes(graph) -> list[str]:
    """The matrix product that produces the logits (the classifier head), found from the output."""
    producer = {o: n for n in graph.node for o in n.output}
    name, seen = graph.output[0].name, 0
    while name in producer and seen < 64:
        node = producer[name]
        if node.op_type in ("Gemm", "MatMul"):
            return [node.name]
        name = next((i for i in node.input if i in producer), "")
        seen += 1
    return []


def _attention_nodes(graph) -> list[str]:
    """Matrix products of two activations (q·kᵀ and attention·v): no weight initializer."""
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def _patch_embed_nodes(graph) -> list[str]:
    return [n.name for n in graph.node if n.op_type == "Conv"]


#: group name -> the nodes of a graph it keeps in float
FLOAT_GROUPS: dict[str, Callable[[Any], list[str]]] = {
    "head": _head_nodes,
    "attention": _attention_nodes,
    "patch_embed": _patch_embed_nodes,
}
#: Rungs tried on the probe partition, most quantised first.
FLOAT_LADDER: tuple[tuple[str, ...], ...] = ((), ("head",), ("head", "attention"),
                                             ("head", "attention", "patch_embed"))


class _Reader:
    """``CalibrationDataReader`` over preprocessed images, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.images, self.batch_size = images, batch_size
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def rewind(self) -> None:
        self._it = iter([{INPUT_NAME: np.ascontiguousarray(self.images[i:i + self.batch_size], dtype=np.float32)}
                         for i in range(0, len(self.images), self.batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)  # type: ignore[arg-type]


def _clean_copy(src: Path, dst: Path) -> Any:
    """``src`` without its stored ``value_info`` (the dynamo exporter's intermediate shapes make
    the quantiser's shape inference fail), saved at ``dst``; returns the graph."""
    import onnx

    m = onnx.load(str(src))
    del m.graph.value_info[:]
    onnx.save(m, str(dst))
    return m.graph


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantiser logs notices through the root logger (per-channel axes, pre-processing
    advice) and warns: neither is the user's business here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_dynamic_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """ONNX Runtime dynamic INT8 quantisation of ``src``'s MatMul/Gemm into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".quant-") as tmp:
        clean = Path(tmp) / "clean.onnx"
        _clean_copy(Path(src), clean)
        with _quiet_quantizer():
            quantize_dynamic(str(clean), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8, per_channel=False)
    return {"float_ops": ["Conv", "LayerNormalization", "Softmax", "Erf/Gelu", "Add (residual)"], "calibration": None}


def quantize_static_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], calib: np.ndarray, *,
                         method: str = "minmax", float_groups: Sequence[str] = ()) -> dict[str, Any]:
    """Static INT8 QDQ quantisation of ``src`` into ``dst``, calibrated on ``calib`` images.

    Per-channel symmetric INT8 weights, INT8 activations; ``float_groups`` (names of
    :data:`FLOAT_GROUPS`) keep their nodes in float.

    Returns:
        ``{"float_ops": [...], "float_nodes": int}``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    unknown = [g for g in float_groups if g not in FLOAT_GROUPS]
    if unknown:
        raise InvalidArgumentError(f"unknown float group {unknown[0]!r}; use {', '.join(FLOAT_GROUPS)}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".quant-") as tmp:
        clean = Path(tmp) / "clean.onnx"
        graph = _clean_copy(Path(src), clean)
        exclude = sorted({n for g in float_groups for n in FLOAT_GROUPS[g](graph)})
        with _quiet_quantizer():
            quantize_static(str(clean), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=list(STATIC_OP_TYPES), nodes_to_exclude=exclude,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method],
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"float_ops": [*ALWAYS_FLOAT, *float_groups], "float_nodes": len(exclude)}


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def choose_static(src: str | os.PathLike[str], dst: str | os.PathLike[str], calib: np.ndarray,
                  probe: np.ndarray, probe_labels: np.ndarray, settings: CalibrationSettings, *,
                  threads: int | None = None, label: str | None = None) -> dict[str, Any]:
    """Quantise ``src`` statically into ``dst`` with the float groups the probe partition asks for.

    Walks :data:`FLOAT_LADDER` from the most quantised rung; the first rung whose probe top-1 is
    at most ``settings.max_top1_drop`` points below the float32 file's is written to ``dst``
    (else the rung with the best probe top-1). Returns the chosen rung's
    :func:`quantize_static_file` result plus ``probe_top1_fp32`` and ``selection`` (every rung
    tried: its float groups and probe top-1).
    """
    dst = Path(dst)
    ref = _top1(onnx_logits(src, probe, threads=threads), probe_labels)
    tried: list[dict[str, Any]] = []
    best: tuple[float, Path, dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".ladder-") as tmp:
        for k, rung in enumerate(FLOAT_LADDER):
            out = Path(tmp) / f"rung{k}.onnx"
            info = quantize_static_file(src, out, calib, method=settings.method, float_groups=rung)
            acc = _top1(onnx_logits(out, probe, threads=threads), probe_labels)
            tried.append({"float_groups": list(rung), "probe_top1": acc})
            log.info("%s: float groups [%s]: probe top-1 %.2f %% (fp32 %.2f %%)", label or dst.name,
                     ", ".join(rung) or "none", 100 * acc, 100 * ref)
            if best is None or acc > best[0]:
                best = (acc, out, info)
            if 100 * (ref - acc) <= settings.max_top1_drop:
                best = (acc, out, info)
                break
        assert best is not None
        with storage_errors(dst):
            shutil.move(str(best[1]), str(dst))
    return {**best[2], "probe_top1_fp32": ref, "probe_top1": best[0], "probe_images": int(len(probe_labels)),
            "selection": tried}


def write_variant_sidecar(fp32_path: str | os.PathLike[str], path: str | os.PathLike[str], precision: str,
                          extra: dict[str, Any]) -> Path:
    """The sidecar of a lower-precision copy: the float32 file's, with this file's name, size and
    SHA-256, ``precision`` and ``extra`` (calibration, float groups)."""
    path = Path(path)
    side = dict(read_sidecar(fp32_path) or {})
    out: dict[str, Any] = {}
    for key, value in side.items():
        if key in ("onnx_bytes", "onnx_sha256", "precision"):
            continue
        out[key] = value
        if key == "onnx_file":
            out["onnx_file"] = path.name
            out["onnx_bytes"] = path.stat().st_size
            out["onnx_sha256"] = sha256_file(path)
    out["compute_dtype"] = {"fp16": "float16", "fp32": "float32"}.get(precision, "int8")
    out["precision"] = precision
    out.update(extra)
    target = sidecar_path(path)
    atomic_write_text(target, json.dumps(out, indent=2) + "\n")
    return target


def timed(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def per_class(samples: Sequence[Any], k: int) -> list[Any]:
    """The first ``k`` samples of every class (``sample.label``), in their order: the calibration set."""
    seen: dict[int, int] = {}
    out = []
    for s in samples:
        if seen.get(s.label, 0) < k:
            seen[s.label] = seen.get(s.label, 0) + 1
            out.append(s)
    return out
