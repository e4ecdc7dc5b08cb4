"""``export``: the ONNX export of a run's models, its verification, timing and lower-precision
copies (:mod:`jas_prune.pipeline.stages.export` reads these; :mod:`.quantize` owns the copies'
settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import Strict
from .quantize import CalibrationSettings, PrecisionList

__all__ = ["OnnxSettings", "ExportSettings"]


class OnnxSettings(Strict):
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
    def _one_fp16(self) -> "OnnxSettings":
        """``fp16: true`` (the CUDA-only float16 copy timed beside each export) and ``fp16`` in
        ``precision`` (the tested float16 copy) both write ``MODEL.fp16.onnx``: one of them."""
        if self.fp16 and "fp16" in self.precision:
            raise ValueError("fp16: true and precision: [..., fp16] both write MODEL.fp16.onnx; "
                             "give one (precision: fp16 is tested on every machine, fp16: true only times it on CUDA)")
        return self


class ExportSettings(Strict):
    """``export``: ``onnx: null`` turns the ONNX export off."""

    onnx: OnnxSettings | None = OnnxSettings()
