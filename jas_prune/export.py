"""ONNX export of dense and pruned timm ViTs: export, verification, providers and latency.

The exported file has one input ``pixel_values`` ``[batch, C, H, W]`` (float32, dynamic batch)
and one output ``logits`` ``[batch, num_classes]`` and holds its weights inline (no external-data
file). A sidecar JSON beside it (``FILE.json`` for ``FILE.onnx``) carries what deployment needs:
input size, mean/std, interpolation, crop, class names and, for a class-specialised model, the
label mapping (head index -> original label). The torch-free scripts in ``export/`` read it.

Typical use::

    info = export_onnx(model, "run/dense.onnx", sidecar={"class_names": names})
    check = verify_onnx("run/dense.onnx", model, images)          # raises on parity failure
    onnx_lat = benchmark_onnx("run/dense.onnx", providers=["cuda", "cpu"])
    torch_lat = benchmark_torch(model)

or all at once, giving a ``metrics.json`` ``export`` record: :func:`export_and_verify`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ExportVerificationError
from .io import atomic_write_text
from .models import discover_ffn

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_OPSET",
    "FP32_TOLERANCE",
    "FP16_RELATIVE_TOLERANCE",
    "sidecar_path",
    "read_sidecar",
    "export_onnx",
    "verify_onnx",
    "cuda_usable",
    "resolve_providers",
    "create_session",
    "benchmark_onnx",
    "benchmark_torch",
    "export_and_verify",
]

log = logging.getLogger("jas_prune.export")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
#: Largest max |Δlogit| accepted for a float32 export.
FP32_TOLERANCE = 1e-4
#: A float16 export is accepted up to this fraction of the largest |logit| (at least 1.0).
FP16_RELATIVE_TOLERANCE = 1e-2
SIDECAR_FORMAT = "jas-prune-onnx"
SIDECAR_VERSION = 1

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


# --------------------------------------------------------------------------------------------
# sidecar


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """The sidecar JSON of an ONNX file: ``FILE.json`` beside ``FILE.onnx``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of ``onnx_path`` as a dict, or ``None`` when there is none."""
    p = sidecar_path(onnx_path)
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


def _input_size(model: nn.Module) -> list[int]:
    pe = model.patch_embed
    chans = int(pe.proj.in_channels)
    h, w = (int(s) for s in pe.img_size)
    return [chans, h, w]


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "input_size": _input_size(model),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }


def _build_sidecar(model: nn.Module, onnx_file: str, dtype: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    extra = dict(extra)
    num_classes = int(model.num_classes)
    info = discover_ffn(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}

    # a head cut by jas_prune.prune / load_pruned carries its mapping and names
    mapping = extra.pop("label_mapping", None)
    if mapping is None:
        mapping = getattr(model, "jas_head_classes", None)
    if mapping is not None:
        mapping = [int(v) for v in mapping]
        if len(mapping) != num_classes:
            raise ValueError(f"label_mapping has {len(mapping)} entries but the head has {num_classes} outputs")
        if len(set(mapping)) != len(mapping):
            raise ValueError(f"label_mapping repeats an original label: {mapping}")
    names = extra.pop("class_names", None)
    if names is None:
        names = getattr(model, "jas_head_class_names", None)
    original_count = extra.pop("original_num_classes", None)
    if names is not None:
        names = [str(n) for n in names]
        if mapping is not None and len(names) != num_classes:
            # the full list of original class names: keep those of the head's classes
            if max(mapping) >= len(names):
                raise ValueError(f"label_mapping refers to label {max(mapping)} but there are "
                                 f"{len(names)} class names")
            original_count = original_count or len(names)
            names = [names[j] for j in mapping]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a head with {num_classes} outputs")
    else:
        names = [f"class_{j}" for j in (mapping if mapping is not None else range(num_classes))]

    data = _data_config(model)
    for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if key in extra:
            data[key] = extra.pop(key)
    extra.pop("input_size", None)  # always the model's own
    side: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "onnx_file": onnx_file,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "compute_dtype": dtype,
        **data,
        "num_classes": num_classes,
        "class_names": names,
        "label_mapping": mapping,
        "original_num_classes": original_count,
        "model": {
            "name": str(cfg.get("architecture", type(model).__name__)),
            "ffn_widths": info.widths,
            "depth": info.depth,
            "params": int(sum(p.numel() for p in model.parameters())),
        },
    }
    for k, v in extra.items():
        side[k] = _jsonable(v)
    return side


# --------------------------------------------------------------------------------------------
# export


class _Fp16Wrapper(nn.Module):
    """Runs a half-precision copy of the model behind float32 input and output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values.to(torch.float16)).to(torch.float32)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _is_cpu_fp32(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())


def _cpu_fp32(model: nn.Module) -> nn.Module:
    """``model`` itself when it is already on CPU in float32, else a CPU float32 copy."""
    if _is_cpu_fp32(model):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (example,), str(path),
            dynamo=True, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=opset,
            optimize=True, verify=False, report=False, verbose=False,
        )


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path),
            dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, verbose=False,
        )


def _check_onnx(path: Path) -> None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in m.graph.initializer if uses_external_data(t)]
    if external:
        raise RuntimeError(f"exported ONNX refers to external data for {len(external)} tensors "
                           f"(e.g. {external[0]}); expected one self-contained file")
    names_in = [i.name for i in m.graph.input]
    names_out = [o.name for o in m.graph.output]
    if names_in != [INPUT_NAME] or names_out != [OUTPUT_NAME]:
        raise RuntimeError(f"exported ONNX has inputs {names_in} and outputs {names_out}, "
                           f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value"):
        raise RuntimeError(f"exported ONNX has a fixed batch size {dim0.dim_value}, expected a dynamic axis")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    sidecar: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export a (pruned) timm ViT to one self-contained ONNX file plus its sidecar JSON.

    The file and the sidecar are written to temporary names and renamed into place, so a
    crash never leaves a half-written ``FILE.onnx``. ``exporter="auto"`` runs the dynamo
    exporter and, if it (or ``onnx.checker`` on its output) fails, the TorchScript exporter with
    a warning that says so.

    Args:
        model: the timm ``VisionTransformer`` (any device/dtype; exported from a CPU float32 copy).
        path: destination ``FILE.onnx``; the sidecar goes to ``FILE.json``.
        opset: ONNX opset.
        sidecar: extra sidecar content: ``class_names`` (per head output, or the full original
            list when ``label_mapping`` is given), ``label_mapping`` (head index -> original
            label, for a class-specialised model; default: the model's ``jas_head_classes`` and
            ``jas_head_class_names`` set by pruning/``load_pruned``), optional overrides of ``mean``/``std``/
            ``interpolation``/``crop_pct``/``crop_mode``; any other keys are stored verbatim.
        dtype: ``"float32"`` or ``"float16"`` (half-precision weights and compute behind float32
            input/output, meant for the CUDA provider).
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"``.

    Returns:
        ``{"path", "sidecar_path", "exporter", "fallback_reason", "opset", "dtype", "seconds",
        "size_bytes", "sidecar"}``.

    Raises:
        UnsupportedModelError: not a supported timm ViT.
        ValueError: bad arguments or inconsistent ``class_names``/``label_mapping``.
        RuntimeError: no exporter produced a valid model.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', not {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side_path = sidecar_path(path)
    if side_path == path:
        raise ValueError(f"the ONNX file must not end in .json: {path}")

    base = _cpu_fp32(model)
    side = _build_sidecar(base, path.name, dtype, sidecar or {})
    example = torch.randn(2, *side["input_size"])  # batch 2: a batch of 1 would be specialised
    fallback_reason = None
    used = None
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
    start = time.perf_counter()
    try:
        with _eval_mode(base):
            module: nn.Module = base
            if dtype == "float16":
                module = _Fp16Wrapper(copy.deepcopy(base).half()).eval()
            attempts = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
            for name in attempts:
                try:
                    tmp.unlink(missing_ok=True)
                    if name == "dynamo":
                        _export_dynamo(module, example, tmp, opset)
                    else:
                        _export_torchscript(module, example, tmp, opset)
                    _check_onnx(tmp)
                    used = name
                    break
                except Exception as exc:  # noqa: BLE001 - any exporter failure
                    if name == attempts[-1]:
                        raise RuntimeError(f"ONNX export with the {name} exporter failed: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
                    fallback_reason = f"{type(exc).__name__}: {first_line}"
                    msg = (f"the dynamo ONNX exporter failed for {path.name} ({fallback_reason}); "
                           "falling back to the TorchScript exporter")
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
        seconds = time.perf_counter() - start
        side["export"] = {
            "exporter": used,
            "fallback_reason": fallback_reason,
            "opset": opset,
            "torch": torch.__version__,
            "seconds": round(seconds, 3),
        }
        # never pair a new file with an old sidecar: drop it first, write the new one last
        side_path.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(side_path, json.dumps(side, indent=2) + "\n")
    log.info("exported %s with the %s exporter in %.1fs%s", path, used, seconds,
             f" (dynamo exporter failed: {fallback_reason})" if fallback_reason else "")
    return {
        "path": str(path),
        "sidecar_path": str(side_path),
        "exporter": used,
        "fallback_reason": fallback_reason,
        "opset": opset,
        "dtype": dtype,
        "seconds": seconds,
        "size_bytes": path.stat().st_size,
        "sidecar": side,
    }


# --------------------------------------------------------------------------------------------
# providers and sessions


def cuda_usable() -> bool:
    """True when torch sees a CUDA device (the condition for asking ONNX Runtime for CUDA)."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - broken driver: treat as no CUDA
        return False


def resolve_providers(requested: Sequence[str] = ("cuda", "cpu")) -> list[str]:
    """ONNX Runtime providers to ask for, in order, from short (``cuda``) or full names.

    CUDA/TensorRT are kept only when CUDA is really usable and the installed onnxruntime has
    the provider; others only when onnxruntime lists them. CPU is always appended last, so
    the result is never empty and a CPU machine gets ``["CPUExecutionProvider"]`` silently.

    Raises:
        ValueError: an unknown short name.
    """
    import onnxruntime as ort

    if isinstance(requested, str):
        requested = [requested]
    available = set(ort.get_available_providers())
    out: list[str] = []
    for req in requested:
        name = _PROVIDER_ALIASES.get(req.lower(), req)
        if not name.endswith("ExecutionProvider"):
            raise ValueError(f"unknown ONNX Runtime provider {req!r}; use one of "
                             f"{sorted(_PROVIDER_ALIASES)} or a full provider name")
        if name not in available:
            log.debug("provider %s is not in this onnxruntime build; skipped", name)
            continue
        if name in _CUDA_PROVIDERS and not cuda_usable():
            log.debug("provider %s skipped: CUDA is not usable here", name)
            continue
        if name not in out:
            out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def create_session(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
):
    """An ``onnxruntime.InferenceSession`` over resolved providers.

    ``threads`` sets the intra-op thread count (``None``: onnxruntime's default). The provider
    that actually runs is ``session.get_providers()[0]``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider-assignment chatter
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=resolve_providers(providers))


# --------------------------------------------------------------------------------------------
# verification


def _fail(msg: str, result: dict[str, Any]) -> ExportVerificationError:
    err = ExportVerificationError(msg)
    err.result = result  # type: ignore[attr-defined]
    return err


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    batch: torch.Tensor,
    *,
    providers: Sequence[str] | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    """Compare an exported file with the PyTorch model on a real batch.

    Runs the whole batch and, to exercise the dynamic batch axis, its first image alone.
    The PyTorch reference is the model in float32 on CPU. When a sidecar is present, it must
    describe this model (FFN widths, number of classes, input size).

    Args:
        path: the ONNX file.
        model: the PyTorch model it was exported from.
        batch: preprocessed images ``[B, C, H, W]`` (e.g. from the test partition).
        providers: onnxruntime providers (default: ``cpu`` for a float32 file, ``cuda, cpu``
            for float16).
        atol: largest accepted max |Δlogit| (default: :data:`FP32_TOLERANCE` for float32,
            :data:`FP16_RELATIVE_TOLERANCE` times max(1, max |logit|) for float16).

    Returns:
        ``{"parity_max_abs", "top1_agreement", "tolerance", "passed", "batch_size", "provider",
        "dtype", "batch_sizes_checked"}``.

    Raises:
        ExportVerificationError: parity beyond ``atol``, non-finite output, a wrong output shape or
            a sidecar that does not match the model; the figures are on the error's ``.result``.
    """
    path = Path(path)
    side = read_sidecar(path)
    dtype = (side or {}).get("compute_dtype", "float32")
    ref_model = _cpu_fp32(model)
    x = batch.detach().to("cpu", torch.float32).contiguous()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    result: dict[str, Any] = {
        "path": str(path), "dtype": dtype, "batch_size": int(x.shape[0]),
        "parity_max_abs": None, "top1_agreement": None, "tolerance": atol, "passed": False,
        "provider": None, "batch_sizes_checked": [],
    }
    if side is not None:
        info = discover_ffn(ref_model)
        problems = []
        if side.get("model", {}).get("ffn_widths") not in (None, info.widths):
            problems.append(f"FFN widths {side['model']['ffn_widths']} in the sidecar, {info.widths} in the model")
        if side.get("num_classes") not in (None, int(ref_model.num_classes)):
            problems.append(f"{side['num_classes']} classes in the sidecar, {ref_model.num_classes} in the model")
        if len(side.get("class_names") or []) not in (0, int(ref_model.num_classes)):
            problems.append(f"{len(side['class_names'])} class names for {ref_model.num_classes} outputs")
        if side.get("input_size") and list(side["input_size"]) != list(x.shape[1:]):
            problems.append(f"input size {side['input_size']} in the sidecar, batch of {list(x.shape[1:])}")
        if problems:
            raise _fail(f"{path.name}: sidecar does not match the model: " + "; ".join(problems), result)

    with _eval_mode(ref_model), torch.inference_mode():
        ref = ref_model(x).float().numpy()
    if providers is None:
        providers = ("cpu",) if dtype == "float32" else ("cuda", "cpu")
    sess = create_session(path, providers=providers)
    result["provider"] = sess.get_providers()[0]
    xn = x.numpy()
    try:
        out = sess.run([OUTPUT_NAME], {INPUT_NAME: xn})[0]
        one = sess.run([OUTPUT_NAME], {INPUT_NAME: xn[:1]})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime shape/type errors
        raise _fail(f"{path.name}: onnxruntime could not run the batch {list(x.shape)}: {exc}", result) from None
    result["batch_sizes_checked"] = [int(x.shape[0]), 1]
    if out.shape != ref.shape or one.shape != ref[:1].shape:
        raise _fail(f"{path.name}: ONNX logits have shape {list(out.shape)} (and {list(one.shape)} for one "
                    f"image), PyTorch {list(ref.shape)}", result)
    if not (np.isfinite(out).all() and np.isfinite(one).all()):
        raise _fail(f"{path.name}: ONNX logits are not finite", result)
    diff = max(float(np.abs(out - ref).max()), float(np.abs(one - ref[:1]).max()))
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    if atol is None:
        atol = FP32_TOLERANCE if dtype == "float32" else FP16_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref).max()))
    result.update(parity_max_abs=diff, top1_agreement=agree, tolerance=float(atol), passed=diff <= atol)
    if not result["passed"]:
        raise _fail(f"{path.name}: ONNX ({dtype}, {result['provider']}) differs from PyTorch by max |Δlogit| = "
                    f"{diff:.3g} > {atol:.3g} (top-1 agreement {agree:.1%} on {len(ref)} images)", result)
    return result


# --------------------------------------------------------------------------------------------
# latency


def _summary(times_s: Sequence[float], batch: int) -> dict[str, float]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_mean": float(ms.mean()),
        "images_per_second": batch * 1e3 / p50 if p50 > 0 else float("inf"),
    }


def benchmark_onnx(
    path: str | os.PathLike[str],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """ONNX Runtime latency of one file at each batch size.

    Args:
        threads: intra-op threads; ``None`` uses ``torch.get_num_threads()`` so that the ONNX and
            PyTorch figures are taken with the same count.

    Returns:
        One record per batch size: ``runtime`` ("onnxruntime"), ``provider`` (the one that ran),
        ``threads``, ``batch_size``, ``warmup``, ``iters``, ``latency_ms_p50``,
        ``latency_ms_p90``, ``latency_ms_mean``, ``images_per_second``.
    """
    threads = int(threads) if threads is not None else torch.get_num_threads()
    sess = create_session(path, providers=providers, threads=threads)
    provider = sess.get_providers()[0]
    shape = sess.get_inputs()[0].shape
    side = read_sidecar(path)
    chw = list(side["input_size"]) if side else [int(d) for d in shape[1:]]
    rng = np.random.default_rng(seed)
    records = []
    for bs in batch_sizes:
        x = rng.standard_normal((int(bs), *chw), dtype=np.float32)
        for _ in range(warmup):
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        times = []
        for _ in range(max(1, iters)):
            t = time.perf_counter()
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
            times.append(time.perf_counter() - t)
        records.append({"runtime": "onnxruntime", "path": str(path), "provider": provider, "threads": threads,
                        "batch_size": int(bs), "warmup": warmup, "iters": max(1, iters), **_summary(times, bs)})
    return records


def benchmark_torch(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """PyTorch eager latency (float32, ``inference_mode``), same records as :func:`benchmark_onnx`.

    The model is moved to ``device`` for the measurement and moved back. ``provider`` is
    ``torch-cpu`` or ``torch-cuda``; ``threads`` (default ``torch.get_num_threads()``) is set
    for the measurement and restored.
    """
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    threads = int(threads) if threads is not None else old_threads
    first = next(model.parameters())
    old_device, old_dtype = first.device, first.dtype
    chw = _input_size(model)
    gen = torch.Generator().manual_seed(seed)
    records = []
    torch.set_num_threads(threads)
    try:
        model.to(device, torch.float32)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with _eval_mode(model), torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(int(bs), *chw, generator=gen).to(device)
                for _ in range(warmup):
                    model(x)
                sync()
                times = []
                for _ in range(max(1, iters)):
                    t = time.perf_counter()
                    model(x)
                    sync()
                    times.append(time.perf_counter() - t)
                records.append({"runtime": "torch", "path": None, "provider": f"torch-{device.type}",
                                "threads": threads, "batch_size": int(bs), "warmup": warmup,
                                "iters": max(1, iters), **_summary(times, bs)})
    finally:
        model.to(old_device, old_dtype)
        torch.set_num_threads(old_threads)
    return records


# --------------------------------------------------------------------------------------------
# all of it, for the recipe's export stage and `jas-prune export onnx`


def export_and_verify(
    model: nn.Module,
    path: str | os.PathLike[str],
    batch: torch.Tensor,
    *,
    label: str,
    checkpoint: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    sidecar: Mapping[str, Any] | None = None,
    verify: bool = True,
    benchmark: bool = True,
    providers: Sequence[str] = ("cuda", "cpu"),
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    threads: int | None = None,
    torch_latency: bool = True,
    fp16: bool = False,
) -> dict[str, Any]:
    """Export, verify and time one model; returns its ``metrics.json`` ``export`` record.

    The record has the SPEC keys ``model`` (= ``label``), ``checkpoint``, ``path``,
    ``parity_max_abs``, ``top1_agreement``, ``latency_ms_p50``, ``latency_ms_p90`` (at the first
    of ``batch_sizes``), ``provider`` (the one that ran the timing, else the verification), plus
    ``exporter``, ``fallback_reason``, ``opset``, ``sidecar``, ``verified``, ``latency`` (ONNX
    records for every batch size), ``torch_latency`` and, with ``fp16=True`` and usable CUDA,
    ``fp16`` (its own export/parity/latency).

    Raises:
        ExportVerificationError: float32 parity beyond :data:`FP32_TOLERANCE` (the record so far
            is on the error's ``.result["record"]``). A failing float16 parity is only recorded.
    """
    info = export_onnx(model, path, opset=opset, sidecar={**(sidecar or {}),
                                                              "checkpoint": str(checkpoint) if checkpoint else None})
    record: dict[str, Any] = {
        "model": label,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "path": info["path"],
        "parity_max_abs": None,
        "top1_agreement": None,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "latency_batch_size": int(batch_sizes[0]) if batch_sizes else None,
        "provider": None,
        "exporter": info["exporter"],
        "fallback_reason": info["fallback_reason"],
        "opset": opset,
        "sidecar": info["sidecar_path"],
        "export_seconds": round(info["seconds"], 3),
        "verified": None,
        "latency": [],
        "torch_latency": [],
    }
    if verify:
        try:
            v = verify_onnx(path, model, batch)
        except ExportVerificationError as err:
            v = getattr(err, "result", {})
            record.update(parity_max_abs=v.get("parity_max_abs"), top1_agreement=v.get("top1_agreement"),
                          provider=v.get("provider"), verified=False, error=str(err))
            err.result = {**v, "record": record}  # type: ignore[attr-defined]
            raise
        record.update(parity_max_abs=v["parity_max_abs"], top1_agreement=v["top1_agreement"],
                      provider=v["provider"], verified=True, parity_tolerance=v["tolerance"])
    if benchmark and batch_sizes:
        lat = benchmark_onnx(path, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                             providers=providers, threads=threads)
        record["latency"] = lat
        record.update(latency_ms_p50=lat[0]["latency_ms_p50"], latency_ms_p90=lat[0]["latency_ms_p90"],
                      provider=lat[0]["provider"])
        if torch_latency:
            dev = "cuda" if lat[0]["provider"] in _CUDA_PROVIDERS else "cpu"
            record["torch_latency"] = benchmark_torch(model, batch_sizes=batch_sizes, warmup=warmup,
                                                      iters=iters, device=dev, threads=lat[0]["threads"])
    if fp16 and cuda_usable() and "CUDAExecutionProvider" in resolve_providers(("cuda",)):
        p16 = Path(path).with_name(Path(path).stem + ".fp16.onnx")
        info16 = export_onnx(model, p16, opset=opset, dtype="float16",
                             sidecar={**(sidecar or {}), "checkpoint": record["checkpoint"]})
        fp16_rec: dict[str, Any] = {"path": info16["path"], "exporter": info16["exporter"]}
        try:
            v16 = verify_onnx(p16, model, batch, providers=("cuda",))
            fp16_rec.update(verified=True)
        except ExportVerificationError as err:
            v16 = getattr(err, "result", {})
            fp16_rec.update(verified=False, error=str(err))
        fp16_rec.update(parity_max_abs=v16.get("parity_max_abs"), top1_agreement=v16.get("top1_agreement"),
                        parity_tolerance=v16.get("tolerance"), provider=v16.get("provider"))
        if benchmark and batch_sizes:
            fp16_rec["latency"] = benchmark_onnx(p16, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                                                 providers=("cuda",), threads=threads)
        record["fp16"] = fp16_rec
    return record
