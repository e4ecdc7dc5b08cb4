"""The stages of ``jas-prune recipe run``, one module each, registered in run order.

Shared stages (locating, which every torchrun rank takes part in) come first; the others run on
rank 0 alone. To add a stage: write a module here that defines a ``run(ctx)`` and registers a
:class:`Stage`, and import it below at its place in the order.
"""

from __future__ import annotations

from .base import STAGES, Stage

# registration order is run order
from . import locate, dense, masks, atlas, intervention, cls_mask, prune, export  # noqa: E402,F401,I001

__all__ = ["STAGES", "Stage"]
