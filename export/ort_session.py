"""ONNX Runtime sessions for the deployment scripts: CUDA only when it is really usable.

onnxruntime, ctypes and the standard library only (no torch), shared by ``predict.py`` and
``benchmark.py``; copy it together with them.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

__all__ = ["cuda_driver_usable", "resolve_providers", "create_session"]

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def cuda_driver_usable() -> bool:
    """True when the CUDA driver loads and reports at least one device (no torch needed)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return False
            count = ctypes.c_int(0)
            return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except (AttributeError, OSError):
            return False
    return False


def resolve_providers(requested: Sequence[str] = ("cuda", "cpu")) -> list[str]:
    """Providers to ask onnxruntime for: CUDA only when it is really usable; CPU always last."""
    available = set(ort.get_available_providers())
    out: list[str] = []
    for req in requested:
        name = _PROVIDER_ALIASES.get(req.lower(), req)
        if name not in available or name in out:
            continue
        if name in _CUDA_PROVIDERS and not cuda_driver_usable():
            continue
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def create_session(model: Path, providers: Sequence[str], threads: int | None) -> ort.InferenceSession:
    """An inference session; ``session.get_providers()[0]`` is the provider that runs."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), sess_options=opts, providers=resolve_providers(providers))
