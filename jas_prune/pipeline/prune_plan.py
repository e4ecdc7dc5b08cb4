"""What the prune stage makes, and what a resumed run can keep.

The class selections and their ratio slots come resolved on the run context
(:class:`~jas_prune.pruning.settings.ResolvedPrune`, ``ctx.prune``). Here: the refusal of a
selection whose classes lack probe or test images (:func:`check_prune_images`), :func:`plan`,
which keeps every finished entry whose recorded identity
(:meth:`~jas_prune.metrics.PrunedEntry.identity`) is the one asked for
(:meth:`~jas_prune.pruning.settings.ResolvedPrune.identity`), and :class:`Entries`, which keeps
``metrics.json``'s entries in the recipe's order however they were kept or made. The stage itself
(:mod:`jas_prune.pipeline.stages.prune`) scores, prunes, reconstructs and evaluates.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import DataError
from ..metrics import PrunedEntry
from ..pruning.settings import ResolvedPrune, Selection

log = logging.getLogger("jas_prune")

__all__ = ["Entries", "check_prune_images", "calibration_samples", "matches", "plan"]


def check_prune_images(prune: ResolvedPrune, source, probe_fraction: float) -> None:
    """Every class of ``prune.classes`` and of each ``prune.class_subsets`` draw has probe and
    test images.

    Raises:
        DataError: naming the key and the class.
    """
    for sel in prune.selections:
        if sel.classes is None:
            continue
        key = "prune.classes" if sel.subset is None else "prune.class_subsets"
        for part in ("probe", "test"):  # importance needs probe images, accuracy test images
            have = {s.label for s in source.subset(part, sel.classes)}
            empty = next((c for c in sel.classes if c not in have), None)
            if empty is not None:
                raise DataError(f"{key}: class {source.class_names[empty]!r} has no {part} images "
                                f"(data.probe_fraction {probe_fraction}, "
                                f"{sum(s.label == empty for s in source.samples)} image(s) in the data set)")


def calibration_samples(ctx, sel: Selection) -> list:
    """The probe images a reconstruction of ``sel`` is fit on (``prune.calibration.images_per_class``)."""
    from ..pruning.calibration import per_class_cap

    return per_class_cap(ctx.source.subset("probe", sel.classes), ctx.prune.settings.calibration.images_per_class)


def matches(ctx, e: PrunedEntry, want: dict[str, Any]) -> bool:
    """Whether finished entry ``e`` can be kept: its checkpoint is there, and it was made with
    the settings ``want`` (:meth:`ResolvedPrune.identity`)."""
    if not ctx.run.file(e.checkpoint).is_file():
        return False
    have = e.identity()
    return all(have.get(k) == v for k, v in want.items())


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


def plan(ctx, index: int, sel: Selection, before: list[PrunedEntry], entries: Entries) -> dict[str, list]:
    """Keep the selection's finished entries (one log line each); return what is left to make:
    method -> [(ratio slot, reconstruction index)]."""
    prune: ResolvedPrune = ctx.prune
    calib_images = len(calibration_samples(ctx, sel))
    mine = [e for e in before if e.classes == sel.classes]
    todo: dict[str, list[tuple[int, int]]] = {}
    for m, method in enumerate(prune.settings.methods):
        for j, ratio in enumerate(prune.slots(sel)):
            for r, recon in enumerate(sel.reconstructions):
                want = prune.identity(sel, method, ratio, recon, calib_images)
                old = next((e for e in mine if matches(ctx, e, want)), None)
                if old is not None:
                    entries.add((index, m, j, r), old)
                    log.info("prune %s: kept %s (already on disk, made with the same settings)", old.stem, old.checkpoint)
                else:
                    todo.setdefault(method, []).append((j, r))
    return todo
