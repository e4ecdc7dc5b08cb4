"""jas-prune: Joint Attribution Score neuron paths, FFN pruning and ONNX export for timm ViTs.

The attribution names are bound eagerly (they need only torch); the other public names are
imported on first use, so the CLI does not pay for importing timm and Torch-Pruning up front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .attribution import JointAttribution, LocateResult, LocateSettings, locate, path_jas
from .errors import JasPruneError
from .lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
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

__all__ = ["JasPruneError", "JointAttribution", "LocateResult", "LocateSettings", "locate", "path_jas",
           *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from .aggregate import ClassMasks, load_masks
    from .checkpoint import load_pruned, save_pruned
    from .pruning.plugin import JASImportance
    from .models import discover_ffn, load_model
    from .pruning.prune import prune_ffn
    from .pruning.reconstruct import reconstruct
    from .pruning.recover import recover


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
