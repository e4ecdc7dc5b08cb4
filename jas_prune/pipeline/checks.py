"""Refusals that come before any work: a recipe whose stages lack what they need, and settings
that cannot fit the model or the data. Nothing is written before these pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..attribution import LocateSettings, ResolvedSettings
from ..classes import resolve_classes
from ..data import DataSource
from ..errors import DataError, RecipeError
from ..models import discover_ffn, num_outputs
from ..recipe import Recipe
from .stages import STAGES
from ..pruning.settings import ResolvedPrune
from .prune_plan import check_prune_images

__all__ = ["check_stages", "check_head", "check_against_model", "Resolved"]


@dataclass(frozen=True)
class Resolved:
    """The recipe's settings resolved against the model and data, once: carried on the run context."""

    #: ``attribution`` (None without the section)
    locate: ResolvedSettings | None = None
    #: ``prune`` (None without the section)
    prune: ResolvedPrune | None = None


def check_stages(recipe: Recipe) -> None:
    """Refuse a recipe that enables a stage without the stages it needs.

    Raises:
        StageNotAvailableError: naming the recipe key.
    """
    for stage in STAGES:
        stage.check(recipe)


def check_head(recipe: Recipe, model: nn.Module, source: DataSource) -> None:
    """Refuse, before any stage, a model whose classifier does not have one output per class of
    the data set: labels are positions in the sorted class list, so any other count scores
    images against the wrong outputs (and the export could not name them).

    Raises:
        UnsupportedModelError: a model without a classifier (``num_classes`` 0), naming the fix.
        DataError: the counts differ, naming both and the settings that make them agree.
    """
    name, count = recipe.model.name, source.num_classes
    n_out = num_outputs(model, fix=f"model.num_classes: {count} (a new, untrained head)")
    if n_out == count:
        return
    what = f"data.root {source.root}" if source.root else f"data.kind {source.kind}"
    fixes = [f"data.classes: {n_out} (its first {n_out} classes)"] if count > n_out else []
    fixes.append(f"model.num_classes: {count} (a new, untrained head)")
    raise DataError(f"data: {count} classes ({what}) but model '{name}' has {n_out} outputs; use a data set "
                    f"with the model's {n_out} classes in label order, or set {' or '.join(fixes)}")


def check_against_model(recipe: Recipe, model: nn.Module, source: DataSource) -> Resolved:
    """Refuse, once the model and data are known but before any work, settings that cannot fit
    them; return the attribution and prune settings resolved against them.

    Raises:
        AttributionSettingError: ``attribution.layers`` out of range, ``attribution.topk`` above an
            FFN width, ``attribution.scope: cls`` for a model without a class token.
        RecipeError: ``masks.topk`` above an FFN width (naming the block and the width),
            ``evaluate.cls_mask.depth`` above the model's depth.
        DataError / InvalidArgumentError: a ``report.atlas.classes`` entry that is not a class.
        DataError: a ``prune.classes`` entry that is not a class of the data set, or has no probe
            or no test images.
        PruneSettingError / BudgetError: see :meth:`~jas_prune.pruning.settings.PruneSettings.resolve`.
    """
    info = discover_ffn(model)
    resolved = None
    blocks = list(range(info.depth))
    if recipe.attribution is not None:
        resolved = LocateSettings.from_section(recipe.attribution).resolve(info)
        blocks = list(resolved.blocks)
    if recipe.masks is not None:
        k = recipe.masks.topk
        narrow = next((l for l in blocks if k > info.layers[l].hidden), None)
        if narrow is not None:
            raise RecipeError(f"masks.topk: {k} exceeds the FFN width {info.layers[narrow].hidden} of block {narrow}")
    cm = recipe.evaluate.cls_mask
    if "paper_cls_mask" in recipe.evaluate.protocols:
        ablation = cm.ablation
        for key, depths in (("evaluate.cls_mask.depth", [cm.depth] if cm.depth is not None else []),
                            ("evaluate.cls_mask.ablation.depth", (ablation.depth or []) if ablation else [])):
            deep = next((d for d in depths if d > info.depth), None)
            if deep is not None:
                raise RecipeError(f"{key}: {deep} exceeds the {info.depth} blocks of model '{recipe.model.name}'")
        wide = next((k for k in (ablation.topk if ablation else []) if k > min(info.widths)), None)
        if wide is not None:
            raise RecipeError(f"evaluate.cls_mask.ablation.topk: {wide} exceeds the FFN width {min(info.widths)}")
    atlas = recipe.report.atlas
    if atlas is not None and atlas.classes:  # refused now, not after the locating the atlas needs
        resolve_classes(list(atlas.classes), source.class_names, key="report.atlas.classes")
    prune = None
    if recipe.prune is not None:
        prune = recipe.prune.resolve(model, source, seed=recipe.runtime.seed, masks=recipe.masks)
        check_prune_images(prune, source, recipe.data.probe_fraction)
    return Resolved(resolved, prune)
