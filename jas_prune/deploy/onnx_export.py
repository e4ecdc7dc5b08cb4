"""ONNX export of dense and pruned timm ViTs: one self-contained, checked file plus its sidecar.

The file holds its weights inline (no external-data file), has a dynamic batch axis and passes
``onnx.checker``; file and sidecar appear only by atomic renames, and the sidecar records the
file's size and SHA-256. A write the operating system refuses (no space, quota, read-only,
permission) is a one-line :class:`~jas_prune.errors.StorageError` naming the ONNX file, never a
reason to try the other exporter.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..io import atomic_write_text, sha256_file, storage_error, storage_errors
from ..torchutil import frozen_eval
from .sidecar import INPUT_NAME, OUTPUT_NAME, build_sidecar, sidecar_path

__all__ = ["DEFAULT_OPSET", "export_onnx", "cpu_fp32"]

log = logging.getLogger("jas_prune.export")

DEFAULT_OPSET = 18


class _Fp16Wrapper(nn.Module):
    """Runs a half-precision copy of the model behind float32 input and output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values.to(torch.float16)).to(torch.float32)


def _is_cpu_fp32(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())


def cpu_fp32(model: nn.Module) -> nn.Module:
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


def _storage_failure(path: Path, exc: BaseException) -> Exception | None:
    """The :class:`~jas_prune.errors.StorageError` for an exporter failure caused by a refused write.

    The exporters wrap what they catch in their own errors, raised ``from`` the cause or while
    handling it, so both links of the chain are followed (a full disk anywhere in it is the
    reason: another exporter would fail the same way).
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 16:
        seen.add(id(link))
        err = storage_error(path, link)
        if err is not None:
            return err
        link = link.__cause__ or link.__context__
    return None


def _with_checksum(side: dict[str, Any], onnx_file: Path) -> dict[str, Any]:
    """The sidecar with ``onnx_bytes`` and ``onnx_sha256`` of ``onnx_file``, right after ``onnx_file``."""
    out: dict[str, Any] = {}
    for key, value in side.items():
        if key in ("onnx_bytes", "onnx_sha256"):
            continue
        out[key] = value
        if key == "onnx_file":
            out["onnx_bytes"] = onnx_file.stat().st_size
            out["onnx_sha256"] = sha256_file(onnx_file)
    return out


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
    a warning that says so; a refused write (no space, ...) is raised at once instead. The
    sidecar (``format_version`` 2) records the file's size and SHA-256 (``onnx_bytes``,
    ``onnx_sha256``), which the deployment scripts check before running it.

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
        InvalidArgumentError: bad arguments or inconsistent ``class_names``/``label_mapping`` (a
            ``ValueError``).
        RuntimeError: no exporter produced a valid model.
        StorageError: the operating system refused to write the file or its sidecar (naming it);
            no temporary file is left.
    """
    if dtype not in ("float32", "float16"):
        raise InvalidArgumentError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise InvalidArgumentError(f"exporter must be 'auto', 'dynamo' or 'torchscript', not {exporter!r}")
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    side_path = sidecar_path(path)
    if side_path == path:
        raise InvalidArgumentError(f"the ONNX file must not end in .json: {path}")

    base = cpu_fp32(model)
    side = build_sidecar(base, path.name, dtype, sidecar or {})
    example = torch.randn(2, *side["input_size"])  # batch 2: a batch of 1 would be specialised
    fallback_reason = None
    used = None
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
    start = time.perf_counter()
    try:
        with frozen_eval(base):
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
                    full = _storage_failure(path, exc)
                    if full is not None:  # not the exporter's fault: the other one would fail alike
                        raise full from exc
                    if name == attempts[-1]:
                        raise RuntimeError(f"ONNX export with the {name} exporter failed: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
                    fallback_reason = f"{type(exc).__name__}: {first_line}"
                    msg = (f"the dynamo ONNX exporter failed for {path.name} ({fallback_reason}); "
                           "falling back to the TorchScript exporter")
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
        seconds = time.perf_counter() - start
        side = _with_checksum(side, tmp)
        side["export"] = {
            "exporter": used,
            "fallback_reason": fallback_reason,
            "opset": opset,
            "torch": torch.__version__,
        }  # no timing here: the same model gives the same sidecar, byte for byte
        # never pair a new file with an old sidecar: drop it first, write the new one last
        with storage_errors(path):
            side_path.unlink(missing_ok=True)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(side_path, json.dumps(side, indent=2) + "\n")
    log.info("exported %s with the %s exporter in %.1fs%s", path.name, used, seconds,
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

