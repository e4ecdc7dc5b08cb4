"""Masks: per-class utilisation, class similarity, TopK masks and dense importance from the
probe paths (paper App. D.2/E.2), read back one chunk at a time."""

from __future__ import annotations

import logging

from ...aggregate import aggregate_store, save_masks
from ...errors import StageNotAvailableError
from ...metrics import MasksInfo, SemanticCheck
from ...models import discover_ffn
from .base import STAGES, Stage

log = logging.getLogger("jas_prune")


def probe_chunks(ctx):
    """The stored probe chunks, one at a time."""
    return ctx.run.path_store("probe").iter_chunks(len(ctx.source.subset("probe")))


def run_masks(ctx) -> None:
    method = ctx.recipe.attribution.methods[0]
    topk = ctx.recipe.masks.topk  # checked against the FFN widths before the run started
    masks = aggregate_store(probe_chunks(ctx), method, num_classes=ctx.source.num_classes,
                            widths=discover_ffn(ctx.model).widths[0], topk=topk, class_names=ctx.source.class_names,
                            fingerprint={"model": ctx.metrics.fingerprint.model, "method": method,
                                         "attribution": ctx.locate.settings.as_dict()})
    if "heads" in ctx.locate.settings.units:  # per-class head masks beside the FFN ones
        from ...models.heads import discover_heads

        # a class's head mask: as many heads per block as a path holds (attribution.topk, capped)
        n_heads = discover_heads(discover_ffn(ctx.model))[0].heads
        masks.heads = aggregate_store(probe_chunks(ctx), method, num_classes=ctx.source.num_classes, widths=n_heads,
                                      topk=ctx.locate_settings().head_topk, class_names=ctx.source.class_names,
                                      fingerprint=masks.fingerprint, heads=True)
    path = save_masks(masks, ctx.run.masks)
    ctx.metrics.masks = MasksInfo(file=path.name, method=method, topk=topk, importance=ctx.recipe.masks.importance,
                                  classes=ctx.source.num_classes, layers=masks.layers,
                                  probe_images=int(masks.counts.sum()))
    log.info("masks: top-%d per layer for %d classes -> %s", topk, ctx.source.num_classes, path.name)
    from ...semantic import semantic_check  # paper Finding 4, where class names carry the truth (shapes)

    semantic = semantic_check(masks.similarity, masks.class_names, valid=masks.counts > 0)
    if semantic is not None:
        ctx.paper.semantic = SemanticCheck.from_dict(semantic)


def _check(recipe) -> None:
    if recipe.masks is not None and recipe.attribution is None:
        raise StageNotAvailableError("masks: needs the attribution section (the masks are built from its paths)")


@STAGES.register
def _masks_stage() -> Stage:
    return Stage("masks", "class masks, similarity and importance from paths/probe/ -> masks.safetensors",
                 enabled=lambda r: r.masks is not None, run=run_masks, check=_check, order=40)
