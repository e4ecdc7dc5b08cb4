"""What a report reads from a run directory, loaded once: typed metrics, the parsed recipe, the
class masks, class names and the semantic check. Nothing here loads a model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, RecipeError, one_line
from ..metrics import Metrics, SemanticCheck, read_metrics
from ..recipe import Recipe, load_recipe
from ..rundir import RunDir

__all__ = ["RunData", "load_run", "class_names_of", "semantic_of", "load_masks_or_none"]

log = logging.getLogger("jas_prune")


@dataclass
class RunData:
    """One run directory as the report sees it.

    Attributes:
        recipe: the parsed ``recipe.yaml``; None when it is missing or cannot be parsed
            (``recipe_problem`` says why, on one line).
        recipe_text: ``recipe.yaml`` verbatim ("" when missing), shown in the report.
        groups: the semantic check's pair similarities (None without masks or shapes classes).
    """

    run: RunDir
    metrics: Metrics
    recipe: Recipe | None
    recipe_text: str
    recipe_problem: str | None
    masks: Any
    class_names: list[str] | None
    semantic: SemanticCheck | None
    groups: dict[str, np.ndarray] | None


def load_masks_or_none(run: RunDir):
    """The run's class masks, or None when there are none (or they cannot be read: logged)."""
    from ..aggregate import load_masks

    if not run.masks.is_file():
        return None
    try:
        return load_masks(run.masks)
    except CheckpointError as exc:
        log.warning("report: %s", exc)
        return None


def read_recipe(run: RunDir) -> tuple[Recipe | None, str, str | None]:
    """(parsed recipe, its text, the one-line reason it could not be parsed)."""
    if not run.recipe.is_file():
        return None, "", "not found"
    text = run.recipe.read_text(encoding="utf-8")
    try:
        return load_recipe(run.recipe), text, None
    except RecipeError as exc:
        return None, text, f"cannot be parsed by this jas-prune ({one_line(exc)})"


def class_names_of(metrics: Metrics, masks) -> list[str] | None:
    """Class names from the masks, else the built-in ``shapes`` names for a shapes run."""
    if masks is not None:
        return list(masks.class_names)
    if metrics.data is not None and metrics.data.kind == "shapes":
        from .. import shapes

        return list(shapes.CLASS_NAMES)
    return None


def semantic_of(metrics: Metrics, masks) -> tuple[SemanticCheck | None, dict[str, np.ndarray] | None]:
    """Finding 4: from ``metrics.paper.semantic``, else computed from the masks (older runs)."""
    from ..semantic import pair_groups, summarise_groups

    check = metrics.paper.semantic if metrics.paper is not None else None
    groups = None
    if masks is not None:
        groups = pair_groups(masks.similarity.numpy(), masks.class_names, (masks.counts > 0).numpy())
        if check is None and groups is not None:
            check = SemanticCheck.from_dict(summarise_groups(groups))
    return check, groups


def load_run(run_dir: str | os.PathLike[str], metrics: Metrics | None = None) -> RunData:
    """Read a run directory for its report.

    Args:
        metrics: the run's metrics when the caller holds them already (else ``metrics.json``).

    Raises:
        MetricsSchemaError: ``metrics.json`` of another schema version, or not a metrics file.
    """
    run = RunDir(run_dir)
    metrics = metrics if metrics is not None else read_metrics(run.metrics)
    recipe, text, problem = read_recipe(run)
    if problem is not None and text:
        log.warning("report: %s %s; the settings are shown as written, sample images left out", run.recipe, problem)
    masks = load_masks_or_none(run)
    try:
        semantic, groups = semantic_of(metrics, masks)
    except Exception as exc:  # noqa: BLE001 - a broken masks file must not lose the report
        log.warning("report: semantic check skipped (%s)", exc)
        semantic, groups = (metrics.paper.semantic if metrics.paper is not None else None), None
    return RunData(run, metrics, recipe, text, problem, masks, class_names_of(metrics, masks), semantic, groups)
