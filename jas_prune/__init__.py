"""jas-prune: Joint Attribution Score neuron paths, FFN pruning and ONNX export for timm ViTs.

``locate`` is both a submodule (the engine) and the public function: it is bound eagerly, so that
importing the submodule anywhere can never shadow the function. The other public names are
imported on first use, so the CLI does not pay for importing timm and Torch-Pruning up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import JasPruneError
from .locate import JointAttribution, LocateResult, locate, path_jas

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "ClassMasks": "aggregate",
    "load_masks": "aggregate",
    "load_pruned": "checkpoint",
    "save_pruned": "checkpoint",
    "JASImportance": "importance",
    "discover_ffn": "models",
    "load_model": "models",
    "prune_ffn": "prune",
}

__all__ = ["JasPruneError", "JointAttribution", "LocateResult", "locate", "path_jas", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from .aggregate import ClassMasks, load_masks
    from .checkpoint import load_pruned, save_pruned
    from .importance import JASImportance
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
