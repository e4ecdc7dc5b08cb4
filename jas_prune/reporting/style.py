"""How a method looks in every figure and table: its label and colour, read from the registries.

Pruning criteria (:data:`jas_prune.pruning.criteria.CRITERIA`) and attribution methods
(:data:`jas_prune.attribution.METHODS`) each bring their own ``label`` and ``colour``; a name in
neither (``dense``, a CLS-mask baseline, a method of a newer run) gets its own name as label and
a stable colour from a fixed palette.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["method_label", "method_colour", "hex_rgb", "reconstruction_label", "reconstruction_style",
           "RECONSTRUCTION_STYLES"]

#: line style of each reconstruction in every trade-off figure
RECONSTRUCTION_STYLES = {"none": ":", "bias": "--", "lsq": "-"}
_RECONSTRUCTION_LABELS = {"none": "none", "bias": "bias refit", "lsq": "least squares (ridge)"}


def reconstruction_label(name: str) -> str:
    """Display name of a reconstruction (``lsq`` -> ``least squares (ridge)``)."""
    return _RECONSTRUCTION_LABELS.get(name, name)


def reconstruction_style(name: str) -> str:
    """Matplotlib line style of a reconstruction (solid for unknown names)."""
    return RECONSTRUCTION_STYLES.get(name, "-")

#: colours for names no registry knows, picked by a stable hash of the name
FALLBACK_COLOURS = ("#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5")


@functools.lru_cache(maxsize=None)
def _entry(name: str) -> Any | None:
    """The registered criterion or attribution method called ``name`` (criteria first)."""
    from ..attribution import METHODS
    from ..pruning.criteria import CRITERIA

    for registry in (CRITERIA, METHODS):
        if name in registry:
            return registry.get(name)
    return None


def method_label(method: str) -> str:
    """Display name of a method (``vit_slim`` -> ``ViT-Slim``)."""
    entry = _entry(method)
    return entry.label if entry is not None else method


def method_colour(method: str) -> str:
    """A stable colour per method, the same in every figure."""
    entry = _entry(method)
    if entry is not None:
        return entry.colour
    return FALLBACK_COLOURS[sum(map(ord, method)) % len(FALLBACK_COLOURS)]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    """``#rrggbb`` -> (r, g, b)."""
    return tuple(int(colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
