"""jas-prune: Joint Attribution Score neuron paths, FFN pruning and ONNX export for timm ViTs.

Every public name is imported on first use, so the CLI does not pay for importing PyTorch, timm
and Torch-Pruning before it needs them (it refuses a bad recipe before importing any of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import JasPruneError
from .lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "JointAttribution": "attribution",
    "LocateResult": "attribution",
    "LocateSettings": "attribution",
    "locate": "attribution",
    "path_jas": "attribution",
    "ClassMasks": "aggregate",
    "load_masks": "aggregate",
    "load_pruned": "checkpoint",
    "save_pruned": "checkpoint",
    "JASImportance": "pruning.plugin",
    "discover_ffn": "models",
    "load_model": "models",
    "prune_ffn": "pruning.prune",
    "reconstruct": "pruning.reconstruct",
    "recover": "pruning.recover",
}

__all__ = ["JasPruneError", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from .aggregate import ClassMasks, load_masks
    from .attribution import JointAttribution, LocateResult, LocateSettings, locate, path_jas
    from .checkpoint import load_pruned, save_pruned
    from .pruning.plugin import JASImportance
    from .models import discover_ffn, load_model
    from .pruning.prune import prune_ffn
    from .pruning.reconstruct import reconstruct
    from .pruning.recover import recover


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
