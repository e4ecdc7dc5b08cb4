"""The stages of ``jas-prune recipe run``, one module each, run in their ``Stage.order``.

Shared stages (locating, which every torchrun rank takes part in) come first; the others run on
rank 0 alone. To add a stage: write a module here with a ``run(ctx)`` and a function decorated
``@STAGES.register`` that returns its :class:`Stage` (with its ``order``); every module of this
package is imported below, so nothing else lists it.
"""

from __future__ import annotations

from ...registry import import_submodules
from .base import STAGES, Stage

import_submodules(__name__, __path__)

__all__ = ["STAGES", "Stage"]
