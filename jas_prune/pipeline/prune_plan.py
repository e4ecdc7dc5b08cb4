"""What the prune stage makes, and what a resumed run can keep.

The class selections (``prune.classes``, then each ``prune.class_subsets`` draw), their ratio
slots (``prune.ratios``, then the ``prune.budget`` slot), the settings a finished entry must have
been made with to be kept (:func:`wanted` / :func:`matches`), the refusals that can be made before
any work (:func:`check_prune_classes`, :func:`check_prune_model`), and :class:`Entries`, which
keeps ``metrics.json``'s entries in the recipe's order however they were kept or made. The stage
itself (:mod:`jas_prune.pipeline.stages.prune`) scores, prunes, reconstructs and evaluates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..classes import resolve_classes
from ..errors import DataError, InvalidArgumentError, PruneSettingError, RecipeError
from ..metrics import PrunedEntry

log = logging.getLogger("jas_prune")

__all__ = ["Selection", "Entries", "prune_classes", "selections", "check_prune_classes", "check_prune_model",
           "round_to_of", "budget_of", "budget_spec", "criterion_options", "wanted", "matches", "slots", "plan"]


@dataclass(frozen=True)
class Selection:
    """One class selection the stage prunes for: its classes, ratios and head."""

    classes: list[int] | None
    ratios: list[float]
    head: str
    reconstructions: list[str]
    #: index of the ``prune.class_subsets`` draw (None: ``prune.classes``)
    subset: int | None = None
    #: the recipe key of ``ratios`` (for messages)
    ratios_key: str = "prune.ratios"


def prune_classes(ctx) -> list[int] | None:
    """``prune.classes`` as sorted class indices (``None``: every class)."""
    p = ctx.recipe.prune
    return None if p.classes is None else resolve_classes(p.classes, ctx.source.class_names, key="prune.classes")


def _subsets(recipe, num_classes: int) -> list[list[int]]:
    """The class subsets ``prune.class_subsets`` draws from ``runtime.seed``.

    Raises:
        RecipeError: a subset size above the number of classes, or more subsets than exist.
    """
    from ..pruning.calibration import draw_class_subsets

    cs = recipe.prune.class_subsets
    if cs is None:
        return []
    try:
        return draw_class_subsets(num_classes, cs.count, cs.size, recipe.runtime.seed)
    except InvalidArgumentError as exc:
        raise RecipeError(str(exc)) from None


def selections(ctx) -> list[Selection]:
    """``prune.classes`` (all classes when null), then each drawn ``prune.class_subsets`` subset."""
    p = ctx.recipe.prune
    out = [Selection(prune_classes(ctx), list(p.ratios), p.head, p.reconstructions)]
    cs = p.class_subsets
    for i, classes in enumerate(_subsets(ctx.recipe, ctx.source.num_classes)):
        out.append(Selection(classes, list(cs.ratios or p.ratios), cs.head or p.head,
                             list(cs.reconstruction or p.reconstructions), subset=i,
                             ratios_key="prune.class_subsets.ratios" if cs.ratios else "prune.ratios"))
    return out


def check_prune_classes(recipe, source) -> None:
    """Every ``prune.classes`` entry is a class of the data set with probe and test images, and
    ``prune.class_subsets`` can be drawn from the data set's classes.

    Raises:
        ClassSelectionError / DataError / InvalidArgumentError: naming the entry or key.
    """
    if recipe.prune is None:
        return
    for key, classes in [("prune.classes", None if recipe.prune.classes is None else
                          resolve_classes(recipe.prune.classes, source.class_names, key="prune.classes")),
                         *(("prune.class_subsets", c) for c in _subsets(recipe, source.num_classes))]:
        if classes is None:
            continue
        for part in ("probe", "test"):  # importance needs probe images, accuracy test images
            have = {s.label for s in source.subset(part, classes)}
            empty = next((c for c in classes if c not in have), None)
            if empty is not None:
                raise DataError(f"{key}: class {source.class_names[empty]!r} has no {part} images "
                                f"(data.probe_fraction {recipe.data.probe_fraction}, "
                                f"{sum(s.label == empty for s in source.samples)} image(s) in the data set)")


def round_to_of(recipe) -> int | None:
    """``prune.round_to`` as used (None for null and 1: no rounding)."""
    from ..pruning.prune import check_round_to

    return check_round_to(recipe.prune.round_to, "prune.round_to")


def budget_of(recipe):
    """``prune.budget`` as a :class:`~jas_prune.pruning.budget.Budget` (None without one)."""
    from ..pruning.budget import Budget

    b = recipe.prune.budget
    return None if b is None else Budget.from_section(b)


def check_prune_model(recipe, model, source) -> None:
    """Refuse, before any work, prune settings the model cannot meet: ``prune.round_to`` above
    an FFN width, a MACs or params ``prune.budget`` that even one neuron (``round_to`` neurons)
    per block misses, for ``prune.classes`` with its head.

    Raises:
        PruneSettingError: naming ``prune.round_to``; BudgetError: naming ``prune.budget.<target>``.
    """
    if recipe.prune is None:
        return
    from ..models import discover_ffn
    from ..pruning.budget import check_reachable

    round_to = round_to_of(recipe)
    if round_to is not None:
        narrow = next((l for l in discover_ffn(model).layers if l.hidden < round_to), None)
        if narrow is not None:
            raise PruneSettingError(f"prune.round_to: {round_to} exceeds the FFN width {narrow.hidden} of block "
                                    f"{narrow.index}; lower prune.round_to")
    budget = budget_of(recipe)
    if budget is not None:
        p = recipe.prune
        classes = None if p.classes is None else resolve_classes(p.classes, source.class_names, key="prune.classes")
        check_reachable(model, budget, round_to=round_to, head_classes=classes if p.head == "cut" else None,
                        class_names=source.class_names, key="prune.budget")


# -- what identifies a finished entry -----------------------------------------------------------

#: the keys of a budget record that identify the budget (the rest is what was found)
_BUDGET_SPEC = ("target", "value", "step", "batch_size")


def budget_spec(record: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else {k: record[k] for k in _BUDGET_SPEC if k in record}


def wanted(ctx, sel: Selection, method: str, ratio: float | None, recon: str, aggregation: str | None,
            calib_images: int) -> dict[str, Any]:
    """The settings an entry must have been made with to be kept on resume (``ratio`` None: the
    ``prune.budget`` entry, identified by its budget instead of its ratio)."""
    p = ctx.recipe.prune
    budget = budget_of(ctx.recipe) if ratio is None else None
    mode = "uniform" if ratio is None else p.mode_for(ratio)
    want: dict[str, Any] = {"method": method, "classes": sel.classes, "head": sel.head,
                            "mode": mode, "reconstruction": recon,
                            "global_min_keep": p.global_min_keep if mode == "global" else None,
                            "importance": aggregation if method == "jas" else None,
                            "criterion_options": criterion_options(ctx, method, sel.classes),
                            "round_to": round_to_of(ctx.recipe),
                            "budget": budget.spec() if budget is not None else None}
    if ratio is not None:
        want["ratio"] = ratio
    if recon != "none":
        c = p.calibration
        want.update(reconstruction_target=c.target, reconstruction_damping=c.damping if recon == "lsq" else None,
                    calibration_images=calib_images)
    return want


def matches(ctx, e: PrunedEntry, want: dict[str, Any]) -> bool:
    if not ctx.run.file(e.checkpoint).is_file():
        return False
    have = {"method": e.method, "ratio": e.ratio, "classes": e.classes, "head": e.head or "keep",
            "mode": e.mode or "uniform", "reconstruction": e.reconstruction or ("none" if not e.bias_compensation
                                                                               else "bias (mean shift)"),
            "global_min_keep": e.global_min_keep,
            "importance": (e.importance or "mean") if e.method == "jas" else None,
            "reconstruction_target": e.reconstruction_target, "reconstruction_damping": e.reconstruction_damping,
            "calibration_images": e.calibration_images, "criterion_options": e.criterion_options,
            "round_to": e.round_to, "budget": budget_spec(e.budget)}
    return all(have.get(k) == v for k, v in want.items())


def criterion_options(ctx, method: str, classes: list[int] | None) -> dict[str, Any] | None:
    """What a criterion's scores depend on beyond the data: its recipe options, and for JAS on a
    class subset the size of the protected class masks."""
    p = ctx.recipe.prune
    opts = p.options_for(method)
    out = opts.model_dump(mode="json", by_alias=True) if opts is not None else {}
    if method == "jas" and classes is not None and ctx.recipe.masks is not None:
        out["masks_topk"] = ctx.recipe.masks.topk
    return out or None


#: where an entry stands in the recipe: (selection, method, ratio slot, reconstruction); the
#: budget is the slot after the selection's ratios
_Key = tuple[int, int, int, int]


class Entries:
    """The stage's entries in the recipe's order, whatever order they were kept or made in."""

    def __init__(self, others: list[PrunedEntry]) -> None:
        self.others = others  # entries of class selections this recipe no longer prunes: first, as they were
        self.by_key: dict[_Key, PrunedEntry] = {}

    def add(self, key: _Key, entry: PrunedEntry) -> None:
        self.by_key[key] = entry

    def ordered(self) -> list[PrunedEntry]:
        return self.others + [self.by_key[k] for k in sorted(self.by_key)]


def slots(ctx, sel: Selection) -> list[float | None]:
    """The selection's ratio slots: its ratios in recipe order, then ``None`` for the budget
    (whose ratio is found later)."""
    return list(sel.ratios) + ([None] if ctx.recipe.prune.budget is not None else [])


def plan(ctx, index: int, sel: Selection, before: list[PrunedEntry], entries: Entries) -> dict[str, list]:
    """Keep the selection's finished entries (one log line each); return what is left to make:
    method -> [(ratio slot, reconstruction index)]."""
    from ..pruning.calibration import per_class_cap

    p = ctx.recipe.prune
    aggregation = ctx.recipe.masks.importance if ctx.recipe.masks is not None else None
    calib_images = len(per_class_cap(ctx.source.subset("probe", sel.classes), p.calibration.images_per_class))
    mine = [e for e in before if e.classes == sel.classes]
    todo: dict[str, list[tuple[int, int]]] = {}
    for m, method in enumerate(p.methods):
        for j, ratio in enumerate(slots(ctx, sel)):
            for r, recon in enumerate(sel.reconstructions):
                want = wanted(ctx, sel, method, ratio, recon, aggregation, calib_images)
                old = next((e for e in mine if matches(ctx, e, want)), None)
                if old is not None:
                    entries.add((index, m, j, r), old)
                    log.info("prune %s: kept %s (already on disk, made with the same settings)", old.stem, old.checkpoint)
                else:
                    todo.setdefault(method, []).append((j, r))
    return todo
