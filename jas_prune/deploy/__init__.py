"""Deployment: ONNX export of dense and pruned timm ViTs, verification, providers and latency.

- :mod:`.sidecar` — the file's contract: input/output names, the sidecar JSON beside it;
- :mod:`.onnx_export` — :func:`export_onnx`: one self-contained, checked file (dynamo exporter,
  TorchScript fallback);
- :mod:`.verify` — :func:`verify_onnx`: parity with PyTorch on a real batch;
- :mod:`.runtime` — ONNX Runtime providers and sessions;
- :mod:`.latency` — :func:`benchmark_onnx` (one file), :func:`benchmark_many` (several files,
  interleaved, with the spread of their speed-ups), :func:`benchmark_torch`;
- :mod:`.record` — :func:`export_and_verify` (one model -> its ``metrics.json`` record) and
  :func:`benchmark_exports` (every exported model of a run, timed together).

Typical use::

    info = export_onnx(model, "run/dense.onnx", sidecar={"class_names": names})
    check = verify_onnx("run/dense.onnx", model, images)          # raises on parity failure
    lat = benchmark_many({"dense": "run/dense.onnx", "pruned": "run/pruned.onnx"}, reference="dense")
"""

from __future__ import annotations

from .latency import benchmark_many, benchmark_onnx, benchmark_torch, onnx_latency
from .onnx_export import DEFAULT_OPSET, export_onnx
from .record import benchmark_exports, export_and_verify
from .runtime import create_session, cuda_usable, resolve_providers
from .sidecar import INPUT_NAME, OUTPUT_NAME, read_sidecar, sidecar_path
from .verify import FP16_RELATIVE_TOLERANCE, FP32_TOLERANCE, verify_onnx

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_OPSET",
    "onnx_latency",
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
    "benchmark_many",
    "benchmark_torch",
    "export_and_verify",
    "benchmark_exports",
]
