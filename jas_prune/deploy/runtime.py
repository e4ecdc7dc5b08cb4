"""ONNX Runtime providers and sessions: CUDA only where it really runs, CPU always last."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from ..errors import InvalidArgumentError

__all__ = ["CUDA_PROVIDERS", "cuda_usable", "resolve_providers", "create_session"]

log = logging.getLogger("jas_prune.export")

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
#: providers that need a usable CUDA device
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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
        InvalidArgumentError: an unknown short name (a ``ValueError``).
    """
    import onnxruntime as ort

    if isinstance(requested, str):
        requested = [requested]
    available = set(ort.get_available_providers())
    out: list[str] = []
    for req in requested:
        name = _PROVIDER_ALIASES.get(req.lower(), req)
        if not name.endswith("ExecutionProvider"):
            raise InvalidArgumentError(f"unknown ONNX Runtime provider {req!r}; use one of "
                             f"{sorted(_PROVIDER_ALIASES)} or a full provider name")
        if name not in available:
            log.debug("provider %s is not in this onnxruntime build; skipped", name)
            continue
        if name in CUDA_PROVIDERS and not cuda_usable():
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
