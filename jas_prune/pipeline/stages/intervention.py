"""Intervention (paper Table 1) on the test partition: path JAS and the removal (×0) /
enhancement (×2) deviations of each method's paths, from ``paths/test/``."""

from __future__ import annotations

import logging

from ...errors import StageNotAvailableError
from ...evaluate import intervention_metrics
from ...metrics import InterventionRow
from .base import STAGES, Stage
from .locate import TABLE1_METHODS

log = logging.getLogger("jas_prune")


def run_intervention(ctx) -> None:
    loader, samples = ctx.loader("test")
    located = ctx.run.path_store("test").read(len(samples), scores=False)
    scope = ctx.recipe.attribution.scope
    table = {}
    for method in TABLE1_METHODS:
        batches = ((x, y, located.targets[method][pos], located.paths[method][pos]) for x, y, pos in loader)
        m = intervention_metrics(ctx.model, batches, located.layers, scope=scope)
        m["path_jas_mean"] = located.jas[method].mean().item()
        table[method] = InterventionRow.from_dict(m)
    ctx.paper.intervention = table
    log.info("intervention (Table 1) on %d test images", len(samples))


def _check(recipe) -> None:
    if recipe.evaluate.intervention and recipe.attribution is None:
        raise StageNotAvailableError("evaluate.intervention: needs the attribution section")


@STAGES.register
def _intervention_stage() -> Stage:
    return Stage("intervention", "paper Table 1 on the test partition -> metrics.paper.intervention",
                 enabled=lambda r: r.evaluate.intervention, run=run_intervention, check=_check, order=50)
