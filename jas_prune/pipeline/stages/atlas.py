"""Atlas: what each class's path neurons see (``report.atlas``), from ``paths/probe/`` and one
pass of the probe images -> ``atlas/`` (:mod:`jas_prune.atlas`)."""

from __future__ import annotations

from ...errors import StageNotAvailableError
from .base import STAGES, Stage


def run_atlas(ctx) -> None:
    from ...atlas.build import build_atlas

    r = ctx.recipe
    ctx.metrics.atlas = build_atlas(ctx.run, ctx.model, ctx.source, method=r.attribution.methods[0],
                                    scope=ctx.locate.scope, settings=r.report.atlas,
                                    batch_size=r.data.batch_size, seed=r.runtime.seed)


def _check(recipe) -> None:
    if recipe.report.atlas is not None and recipe.attribution is None:
        raise StageNotAvailableError("report.atlas: needs the attribution section (the atlas shows its paths' neurons)")


@STAGES.register
def _atlas_stage() -> Stage:
    return Stage("atlas", "each class's path neurons: top images, patch heatmaps, per-class use -> atlas/",
                 enabled=lambda r: r.report.atlas is not None, run=run_atlas, check=_check, order=45)
