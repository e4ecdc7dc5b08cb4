"""The exported file's contract: its input/output names and the sidecar JSON beside it.

The ONNX file has one input ``pixel_values`` ``[batch, C, H, W]`` (float32, dynamic batch) and
one output ``logits`` ``[batch, num_classes]``. The sidecar (``FILE.json`` for ``FILE.onnx``)
carries what deployment needs: input size, mean/std, interpolation, crop, class names and, for a
class-specialised model, the label mapping (head index -> original label). The torch-free
scripts in the top-level ``export/`` folder read it.

From ``format_version`` 2 on, the sidecar also records the ONNX file's size and SHA-256
(``onnx_bytes``, ``onnx_sha256``): ``export/predict.py`` and ``export/benchmark.py`` refuse a file
that no longer matches (truncated, modified, or the sidecar of another file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models import discover_ffn, input_size

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SIDECAR_FORMAT", "SIDECAR_VERSION", "sidecar_path", "read_sidecar",
           "build_sidecar", "model_input_size"]

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
SIDECAR_FORMAT = "jas-prune-onnx"
#: 2: ``onnx_bytes`` and ``onnx_sha256`` (the exported file's size and SHA-256) are always present
SIDECAR_VERSION = 2


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


def model_input_size(model: nn.Module) -> list[int]:
    """``[C, H, W]`` of the model's input, as a JSON list (the family's own reading:
    :func:`jas_prune.models.input_size`)."""
    return [int(v) for v in input_size(model)]


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "input_size": model_input_size(model),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }


def build_sidecar(model: nn.Module, onnx_file: str, dtype: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of ``model`` exported as ``onnx_file`` (see :func:`~jas_prune.deploy.export_onnx`)."""
    extra = dict(extra)
    num_classes = int(model.num_classes)
    info = discover_ffn(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}

    # a head cut by jas_prune.pruning.prune / load_pruned carries its mapping and names
    mapping = extra.pop("label_mapping", None)
    if mapping is None:
        mapping = getattr(model, "jas_head_classes", None)
    if mapping is not None:
        mapping = [int(v) for v in mapping]
        if len(mapping) != num_classes:
            raise InvalidArgumentError(f"label_mapping has {len(mapping)} entries but the head has {num_classes} outputs")
        if len(set(mapping)) != len(mapping):
            raise InvalidArgumentError(f"label_mapping repeats an original label: {mapping}")
    names = extra.pop("class_names", None)
    if names is None:
        names = getattr(model, "jas_head_class_names", None)
    original_count = extra.pop("original_num_classes", None)
    if names is not None:
        names = [str(n) for n in names]
        if mapping is not None and len(names) != num_classes:
            # the full list of original class names: keep those of the head's classes
            if max(mapping) >= len(names):
                raise InvalidArgumentError(f"label_mapping refers to label {max(mapping)} but there are "
                                 f"{len(names)} class names")
            original_count = original_count or len(names)
            names = [names[j] for j in mapping]
        if len(names) != num_classes:
            raise InvalidArgumentError(f"{len(names)} class names for a head with {num_classes} outputs")
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

