"""The models shipped with the package (``builtin:NAME``): a timm base name plus keyword
overrides, the data config timm's ``resolve_data_config`` reads, and the weights file."""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_PREFIX", "BUILTIN_MODELS"]

BUILTIN_PREFIX = "builtin:"

#: Architecture of the shipped models: a timm base name plus keyword overrides, the data
#: config timm's ``resolve_data_config`` reads, and the weights file inside the package.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "shapes-vit": {
        "timm_name": "vit_tiny_patch16_224",
        "kwargs": {
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 64,
            "depth": 6,
            "num_heads": 2,
            "mlp_ratio": 4.0,
            "num_classes": 48,
        },
        "pretrained_cfg": {
            "input_size": (3, 32, 32),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
        },
        "weights": "shapes-vit.safetensors",
    }
}
