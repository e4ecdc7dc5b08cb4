"""jas-prune: Joint Attribution Score neuron paths, FFN pruning and ONNX export for timm ViTs.

The public names below are imported on first use, so ``jas-prune --help`` and the error paths
of the CLI do not pay for importing torch, timm and Torch-Pruning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import JasPruneError

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "ClassMasks": "aggregate",
    "load_masks": "aggregate",
    "load_pruned": "checkpoint",
    "save_pruned": "checkpoint",
    "JASImportance": "importance",
    "JointAttribution": "locate",
    "LocateResult": "locate",
    "locate": "locate",
    "path_jas": "locate",
    "discover_ffn": "models",
    "load_model": "models",
    "prune_ffn": "prune",
}

__all__ = ["JasPruneError", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from .aggregate import ClassMasks, load_masks
    from .checkpoint import load_pruned, save_pruned
    from .importance import JASImportance
    from .locate import JointAttribution, LocateResult, locate, path_jas
    from .models import discover_ffn, load_model
    from .prune import prune_ffn


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jas_prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
