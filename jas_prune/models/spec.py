"""What rebuilds a model's architecture: name, family, keyword arguments, data config, widths."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .families import discover_ffn, family_of, model_label

__all__ = ["model_spec", "spec_json", "DATA_CONFIG_KEYS"]

#: the data-config entries kept with a model (what timm's ``resolve_data_config`` reads)
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{name, family, num_classes, ffn_widths, ffn_kinds, arch, data_config}`` of a supported
    model: with the weights, what :func:`jas_prune.load_pruned` rebuilds it from.

    Raises:
        UnsupportedModelError: not a supported model.
    """
    info = discover_ffn(model)
    family = family_of(model)
    if family is None:  # pragma: no cover - discover_ffn refused it already
        raise UnsupportedModelError(f"model '{model_label(model)}' is not supported")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "name": model_label(model),
        "family": family.name,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "ffn_widths": info.widths,
        "ffn_kinds": info.kinds,
        "arch": family.arch_kwargs(model),
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in DATA_CONFIG_KEYS},
    }


def spec_json(model: nn.Module) -> str:
    return json.dumps(model_spec(model), sort_keys=True)
