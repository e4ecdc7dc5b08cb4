"""Parity of an exported file with its PyTorch model on a real batch (and the batch-of-one path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportVerificationError
from ..models import discover_ffn
from ..torchutil import frozen_eval
from .onnx_export import cpu_fp32
from .runtime import create_session
from .sidecar import INPUT_NAME, OUTPUT_NAME, read_sidecar

__all__ = ["FP32_TOLERANCE", "FP16_RELATIVE_TOLERANCE", "verify_onnx"]

#: Largest max |Δlogit| accepted for a float32 export.
FP32_TOLERANCE = 1e-4
#: A float16 export is accepted up to this fraction of the largest |logit| (at least 1.0).
FP16_RELATIVE_TOLERANCE = 1e-2


def _fail(msg: str, result: dict[str, Any]) -> ExportVerificationError:
    return ExportVerificationError(msg, record=result)


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
            a sidecar that does not match the model; the figures so far are the error's ``record``.
    """
    path = Path(path)
    side = read_sidecar(path)
    dtype = (side or {}).get("compute_dtype", "float32")
    ref_model = cpu_fp32(model)
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

    with frozen_eval(ref_model), torch.inference_mode():
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
