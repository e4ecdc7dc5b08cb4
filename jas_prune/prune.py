"""Old home of structured FFN pruning; it now lives in :mod:`jas_prune.pruning.prune`
(``finetune`` in :mod:`jas_prune.pruning.finetune`, the errors in :mod:`jas_prune.errors`).
This module re-exports the old names so existing imports keep working."""

from __future__ import annotations

from .errors import BudgetError, PruneSettingError
from .pruning.finetune import finetune
from .pruning.prune import (
    MODES,
    PruneSummary,
    count_params,
    cut_head,
    discover_widths,
    prune_ffn,
    remap_labels,
    resolve_head_classes,
)

__all__ = [
    "MODES",
    "PruneSummary",
    "PruneSettingError",
    "BudgetError",
    "prune_ffn",
    "cut_head",
    "resolve_head_classes",
    "remap_labels",
    "count_params",
    "discover_widths",
    "finetune",
]
