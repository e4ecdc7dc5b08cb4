"""``report.md`` of one run directory: summary, figures, tables, the settings last.

Files the run recorded with their SHA-256 (pruned checkpoints, ONNX files, sidecars) are checked
first: one that changed or went missing since it was written is named at the top of the report
and in a warning line, since the figures describe the files as they were written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import atomic_write_text
from ..metrics import Metrics, SemanticCheck
from .atlas_section import atlas_section
from .frontier import frontier_section
from .figset import FigureList, cls_mask_figures, path_figures, pruning_figures, table1_and_deployment_figures
from .rundata import class_names_of, load_run
from .stats import as_metrics, paired_differences, prune_stats
from .summary import summary_section
from .tables import (budget_split_section, dense_section, export_section, figures_section, locate_section,
                     paired_section, paper_section, pruned_section, semantic_section)

__all__ = ["write_report", "render_report", "unfinished_reason"]

log = logging.getLogger("jas_prune")


def render_report(metrics: Metrics | Mapping[str, Any], recipe_text: str, figures: Sequence[tuple[str, str]] = (),
                  *, class_names: Sequence[str] | None = None, semantic: SemanticCheck | None = None,
                  recipe_problem: str | None = None, changed_files: Sequence[str] = (),
                  unfinished: str | None = None) -> str:
    """The report as markdown: summary, figures (relative path, caption), tables, settings.

    Args:
        unfinished: why the run is unfinished (:func:`unfinished_reason`; shown first).
        recipe_problem: why ``recipe.yaml`` could not be parsed (shown above the settings).
        changed_files: one line per recorded file that changed or went missing since the run
            wrote it (shown first).
    """
    metrics = as_metrics(metrics)
    names = class_names if class_names is not None else class_names_of(metrics, None)
    if semantic is None and metrics.paper is not None:
        semantic = metrics.paper.semantic
    lines = ["# jas-prune run report", ""]
    if unfinished:
        lines += ["## Warning: unfinished run", "", f"This run {unfinished}.", ""]
    if changed_files:
        lines += ["## Warning: files changed since the run wrote them", "",
                  "The figures below describe these files as the run wrote them (size and SHA-256 in "
                  "`metrics.json`); the files now on disk differ:", ""]
        lines += [f"- {line}" for line in changed_files] + [""]
    lines += summary_section([metrics], names, semantic)
    lines += figures_section(figures) + atlas_section(metrics)
    lines += dense_section(metrics) + locate_section(metrics) + semantic_section(semantic) + paper_section(metrics)
    lines += pruned_section(prune_stats([metrics]), names, combined=False) + budget_split_section(metrics)
    lines += paired_section(paired_differences([metrics]), 1) + export_section(metrics) + frontier_section(metrics)
    run = metrics.run
    if run is not None:
        lines += [f"Run time {run.seconds or 0:.1f} s on {run.device} (torch {run.torch}).", ""]
    lines += ["## Settings", ""]
    if recipe_problem is not None:
        lines += [f"`recipe.yaml` {recipe_problem}; shown as written.", ""]
    lines += ["```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


#: the metrics sections of the stages, in run order, as the report names them
_STAGE_SECTIONS = (("locate", "locate"), ("locate_test", "locate (test)"), ("dense", "dense"), ("masks", "masks"),
                   ("atlas", "atlas"), ("paper", "paper protocols"), ("pruned", "prune"), ("export", "export"))


def unfinished_reason(metrics: Metrics) -> str | None:
    """Why a run did not finish (``metrics.json`` without its ``run`` record, which a run writes
    last), naming the stages whose results it holds; None for a finished run."""
    if metrics.run is not None:
        return None
    done = [label for key, label in _STAGE_SECTIONS if getattr(metrics, key) is not None]
    return (f"did not finish (stopped or killed after: {', '.join(done) or 'no stage'}); it shows only those "
            "results; continue the run with `jas-prune recipe run RECIPE --out DIR --resume`")


def write_report(run_dir: str | os.PathLike[str], *, metrics: Metrics | None = None) -> Path:
    """(Re)build ``report.md`` and ``figures/*.png`` in a run directory, without running a model.

    Args:
        metrics: the run's metrics when the caller holds them (default: read ``metrics.json``).

    Raises:
        MetricsSchemaError: a ``metrics.json`` of another schema version (rerun into a new --out).
    """
    from ..integrity import check_recorded_files

    data = load_run(run_dir, metrics)
    unfinished = unfinished_reason(data.metrics)
    if unfinished:
        log.warning("jas-prune: warning: %s: this run %s", data.run.root, unfinished)
    changed = [p.message for p in check_recorded_files(data.run, data.metrics)]
    for line in changed:
        log.warning("report: %s", line)
    figs = FigureList(data.run)
    pruning_figures(figs, [data.metrics], data.class_names)
    cls_mask_figures(figs, [data.metrics])
    path_figures(figs, data)
    table1_and_deployment_figures(figs, data.metrics)
    problem = data.recipe_problem if data.recipe_text else None
    text = render_report(data.metrics, data.recipe_text, figs.items, class_names=data.class_names,
                         semantic=data.semantic, recipe_problem=problem, changed_files=changed,
                         unfinished=unfinished)
    return atomic_write_text(data.run.report, text)
