"""The report: ``report.md`` and its figures, rebuilt from a run directory without any model work.

A run's report reads ``metrics.json`` (typed, :mod:`jas_prune.metrics`), ``recipe.yaml``
(parsed), ``masks.safetensors`` and the stored probe paths; sample images come from the data
source the recipe names. ``jas-prune report RUN_DIR`` rebuilds it; ``jas-prune report --combine
DIR ... --out DIR`` writes one report over runs of the same recipe with different
``runtime.seed`` (mean ± std).

- :mod:`.single` — one run's report (:func:`write_report`, :func:`render_report`);
- :mod:`.combine` — the combined report over seeds (:func:`combine_reports`, :func:`render_combined`);
- :mod:`.rundata` — what a report reads from a run directory, loaded once;
- :mod:`.summary` — the opening section (best method per budget, what to pick);
- :mod:`.tables` — every other section;
- :mod:`.stats` — :class:`PruneStat`, :func:`prune_stats`, :func:`best_per_budget`;
- :mod:`.latency` — models grouped by shape, speed-ups with their spread;
- :mod:`.figset` — which figures, drawn from what; :mod:`.plots`, :mod:`.path_plots` — the drawing;
- :mod:`.style` — method labels and colours from the registries; :mod:`.format` — numbers, tables.
"""

from __future__ import annotations

from .combine import combine_reports, render_combined
from .single import render_report, write_report
from .stats import PruneStat, best_per_budget, prune_stats

__all__ = ["write_report", "render_report", "combine_reports", "render_combined", "PruneStat", "prune_stats",
           "best_per_budget"]
