"""Prune: every ``prune.methods`` × ``prune.ratios`` × ``prune.reconstruction`` through one
pipeline: criterion scores -> Torch-Pruning dependency graph -> reconstruction (none, bias or
least squares, on probe images) -> optional fine-tune -> test accuracy of the kept classes ->
checkpoint. The same for ``prune.classes`` and for every subset of ``prune.class_subsets``.

Each (method, ratio) is pruned once; its reconstructions are made on copies of that model. The
test and calibration images are rendered once per class selection and held in memory (when
small), since dozens of models are evaluated on them. Finished entries (checkpoint on disk and
in metrics, same settings) are skipped on resume."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...classes import resolve_classes
from ...errors import (BudgetError, DataError, InvalidArgumentError, PruneSettingError, RecipeError,
                      StageNotAvailableError)
from ...evaluate import accuracy, count_params_macs, predict_logits
from ...metrics import PrunedEntry
from ...models import input_size
from .base import STAGES, Stage

log = logging.getLogger("jas_prune")

__all__ = ["Selection", "prune_classes", "selections", "check_prune_classes", "run_prune"]


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
    from ...pruning.calibration import draw_class_subsets

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


# -- what identifies a finished entry -----------------------------------------------------------


def _wanted(ctx, sel: Selection, method: str, ratio: float, recon: str, aggregation: str | None,
            calib_images: int) -> dict[str, Any]:
    """The settings an entry must have been made with to be kept on resume."""
    p = ctx.recipe.prune
    mode = p.mode_for(ratio)
    want: dict[str, Any] = {"method": method, "ratio": ratio, "classes": sel.classes, "head": sel.head,
                            "mode": mode, "reconstruction": recon,
                            "global_min_keep": p.global_min_keep if mode == "global" else None,
                            "importance": aggregation if method == "jas" else None,
                            "criterion_options": _criterion_options(ctx, method, sel.classes)}
    if recon != "none":
        c = p.calibration
        want.update(reconstruction_target=c.target, reconstruction_damping=c.damping if recon == "lsq" else None,
                    calibration_images=calib_images)
    return want


def _matches(ctx, e: PrunedEntry, want: dict[str, Any]) -> bool:
    if not ctx.run.file(e.checkpoint).is_file():
        return False
    have = {"method": e.method, "ratio": e.ratio, "classes": e.classes, "head": e.head or "keep",
            "mode": e.mode or "uniform", "reconstruction": e.reconstruction or ("none" if not e.bias_compensation
                                                                               else "bias (mean shift)"),
            "global_min_keep": e.global_min_keep,
            "importance": (e.importance or "mean") if e.method == "jas" else None,
            "reconstruction_target": e.reconstruction_target, "reconstruction_damping": e.reconstruction_damping,
            "calibration_images": e.calibration_images, "criterion_options": e.criterion_options}
    return all(have.get(k) == v for k, v in want.items())


def _criterion_options(ctx, method: str, classes: list[int] | None) -> dict[str, Any] | None:
    """What a criterion's scores depend on beyond the data: its recipe options, and for JAS on a
    class subset the size of the protected class masks."""
    p = ctx.recipe.prune
    opts = p.options_for(method)
    out = opts.model_dump(mode="json", by_alias=True) if opts is not None else {}
    if method == "jas" and classes is not None and ctx.recipe.masks is not None:
        out["masks_topk"] = ctx.recipe.masks.topk
    return out or None


# -- the stage ------------------------------------------------------------------------------------


def _locate_rate(ctx, before: list[PrunedEntry]) -> float | None:
    """Seconds of locating per probe image: this run's locating, or, when every chunk was resumed
    from an earlier run, what an earlier JAS entry of this run directory recorded."""
    loc = ctx.metrics.locate
    if loc is not None and loc.seconds and loc.images_this_run:
        return loc.seconds / loc.images_this_run
    for e in before:
        if e.method == "jas" and e.importance_seconds is not None and e.probe_images:
            return (e.importance_seconds - (e.score_seconds or 0.0)) / e.probe_images
    return None


def _importance_seconds(ctx, method: str, score_seconds: float, probe_images: int,
                        before: list[PrunedEntry]) -> float | None:
    """What the criterion's importance cost: its scoring time; for JAS from the run's masks, plus
    the locating of the selection's probe images (None when unknown)."""
    if method != "jas" or ctx.recipe.masks is None:
        return score_seconds
    rate = _locate_rate(ctx, before)
    return None if rate is None else score_seconds + rate * probe_images


def run_prune(ctx) -> None:
    before = list(ctx.metrics.pruned or [])
    sels = selections(ctx)
    chosen = {None if s.classes is None else tuple(s.classes) for s in sels}
    # entries of class selections this recipe no longer prunes are kept as they are
    keep_others = [e for e in before if (None if e.classes is None else tuple(e.classes)) not in chosen]
    entries: list[PrunedEntry] = []
    for sel in sels:
        _prune_selection(ctx, sel, before, keep_others, entries)
    ctx.metrics.pruned = keep_others + entries
    ctx.save_metrics()


def _prune_selection(ctx, sel: Selection, before: list[PrunedEntry], others: list[PrunedEntry],
                     entries: list[PrunedEntry]) -> None:
    from ...checkpoint import save_pruned
    from ...data import make_loader
    from ...io import file_record
    from ...pruning.calibration import cached_batches, per_class_cap
    from ...pruning.criteria import MasksRef
    from ...pruning.finetune import finetune
    from ...pruning.prune import prune_ffn
    from ...pruning.reconstruct import reconstruct

    p = ctx.recipe.prune
    classes = sel.classes
    head_classes = classes if (classes is not None and sel.head == "cut") else None
    aggregation = ctx.recipe.masks.importance if ctx.recipe.masks is not None else None
    probe_samples = ctx.source.subset("probe", classes)
    calib_samples = per_class_cap(probe_samples, p.calibration.images_per_class)
    mine = [e for e in before if e.classes == classes]
    todo: dict[str, list[tuple[float, str]]] = {}
    for method in p.methods:
        for ratio in sel.ratios:
            for recon in sel.reconstructions:
                want = _wanted(ctx, sel, method, ratio, recon, aggregation, len(calib_samples))
                old = next((e for e in mine if _matches(ctx, e, want)), None)
                if old is not None:
                    entries.append(old)
                else:
                    todo.setdefault(method, []).append((ratio, recon))
    if not todo:
        return
    size_in = input_size(ctx.model)
    example = torch.zeros(1, *size_in, device=ctx.device, dtype=next(ctx.model.parameters()).dtype)
    test_loader, test_samples = ctx.loader("test", classes)
    test_ids = [s.id for s in test_samples]
    test_batches = cached_batches(test_loader)
    dense_logits, test_labels = predict_logits(ctx.model, test_batches, device=ctx.device, sample_ids=test_ids,
                                               desc="evaluate dense subset")
    dense_sub = accuracy(dense_logits, test_labels)
    label_map = {c: j for j, c in enumerate(head_classes)} if head_classes is not None else None
    calib: Any = None
    if any(r != "none" for pairs in todo.values() for _, r in pairs):
        calib = cached_batches(make_loader(calib_samples, ctx.transform, batch_size=ctx.recipe.data.batch_size,
                                           workers=ctx.recipe.data.workers, seed=ctx.recipe.runtime.seed))
    probe_loader = None
    where = "prune" if sel.subset is None else f"prune.class_subsets[{sel.subset}] {classes}"
    for method in p.methods:
        if method not in todo:
            continue
        t0 = time.perf_counter()
        scored = ctx.criterion(method, classes, example_inputs=example,
                               masks=MasksRef(ctx.run.root, aggregation, ctx.digest) if aggregation else None)
        score_seconds = time.perf_counter() - t0
        importance_seconds = _importance_seconds(ctx, method, score_seconds, len(probe_samples), before)
        by_ratio: dict[float, list[str]] = {}
        for ratio, recon in todo[method]:
            by_ratio.setdefault(ratio, []).append(recon)
        for ratio, recons in by_ratio.items():
            mode = p.mode_for(ratio)
            base = copy.deepcopy(ctx.model)
            try:
                summary = prune_ffn(base, scored.scores, ratio=ratio, mode=mode, protect=scored.protect,
                                    example_inputs=example, head_classes=head_classes,
                                    class_names=ctx.source.class_names,
                                    min_keep=float(p.global_min_keep * (1.0 - ratio)))
            except BudgetError as exc:  # what must stay (class masks, min_keep) exceeds the keep budget
                hint = f"lower {sel.ratios_key} or masks.topk" if exc.protected else f"lower {sel.ratios_key}"
                raise BudgetError(f"{sel.ratios_key}: {ratio} with method '{method}' ({where}): {exc}; {hint}",
                                  protected=exc.protected) from None
            for i, recon in enumerate(recons):
                model = base if i == len(recons) - 1 else copy.deepcopy(base)
                rec = None
                if recon != "none":
                    c = p.calibration
                    try:
                        rec = reconstruct(model, ctx.model, calib, method=recon, target=c.target, damping=c.damping)
                    except PruneSettingError as exc:  # e.g. an fc2 without bias to refit
                        raise PruneSettingError(f"prune.reconstruction: {exc}") from None
                    except InvalidArgumentError as exc:
                        raise PruneSettingError(f"prune.reconstruction: {recon} ({where}): {exc}") from None
                ft = None
                if p.finetune is not None and p.finetune.epochs > 0:
                    if probe_loader is None:
                        probe_loader, _ = ctx.loader("probe", classes)
                    ft = finetune(model, probe_loader, epochs=p.finetune.epochs, lr=p.finetune.lr,
                                  head_classes=head_classes, device=ctx.device)
                logits, labels = predict_logits(model, test_batches, device=ctx.device, sample_ids=test_ids,
                                                desc=f"evaluate {method}")
                acc = accuracy(logits, labels, label_map=label_map)
                suffix = _suffix(recon)
                stem = ctx.run.pruned_name(method, ratio, classes, suffixes=[suffix] if suffix else [])
                ckpt = save_pruned(model, ctx.run.checkpoint(stem),
                                   extra={"method": method, "ratio": ratio, "bias_compensation": recon == "bias",
                                          "reconstruction": recon, "classes": classes,
                                          "class_names": ctx.source.class_names})
                size = count_params_macs(model, size_in)
                entry = PrunedEntry(
                    method=method, ratio=ratio, classes=classes, top1=acc["top1"], top5=acc["top5"],
                    params=size["params"], macs=size["macs"], bias_compensation=recon == "bias",
                    checkpoint=ckpt.name, mode=mode, head=sel.head, dense_top1=dense_sub["top1"],
                    dense_top5=dense_sub["top5"], test_images=acc["n"], removed_fraction=summary.removed_fraction,
                    widths={str(b): w for b, w in summary.widths_after.items()}, finetune=ft,
                    score_seconds=score_seconds, importance=aggregation if method == "jas" else None,
                    checkpoint_file=file_record(ckpt, ctx.run.root),  # tamper evidence
                    reconstruction=recon, importance_seconds=importance_seconds, class_subset=sel.subset,
                    global_min_keep=p.global_min_keep if mode == "global" else None,
                    criterion_options=_criterion_options(ctx, method, classes), probe_images=len(probe_samples),
                    **(_reconstruction_fields(rec, len(calib_samples)) if rec is not None else {}))
                entries.append(entry)
                ctx.metrics.pruned = others + entries
                ctx.save_metrics()
                log.info("pruned %-10s ratio %.2f %-4s %s: top1 %.4f (dense %.4f) params %d%s", method, ratio, recon,
                         "all classes" if classes is None else f"classes {classes}", acc["top1"],
                         dense_sub["top1"], size["params"],
                         f", reconstruction {rec.seconds:.1f} s" if rec is not None else "")


def _suffix(recon: str) -> str | None:
    from ...pruning.choices import RECONSTRUCTION_SUFFIX

    return RECONSTRUCTION_SUFFIX[recon]


def _reconstruction_fields(rec, calib_images: int) -> dict[str, Any]:
    """A reconstruction report as PrunedEntry fields."""
    return {"reconstruction_target": rec.target,
            "reconstruction_damping": rec.damping if rec.method == "lsq" else None,
            "calibration_images": calib_images, "reconstruction_seconds": rec.seconds,
            "reconstruction_blocks": [{"block": b.block, "width": b.width, "relative_before": b.relative_before,
                                       "relative_after": b.relative_after, "refit": b.refit}
                                      for b in rec.blocks]}


def _check(recipe) -> None:
    if recipe.prune is not None and "jas" in recipe.prune.methods and recipe.masks is None:
        raise StageNotAvailableError("prune.methods: 'jas' needs the attribution and masks sections "
                                     "(JAS importance comes from the class masks)")


STAGES.add(Stage("prune", "structured FFN pruning, every method × ratio × reconstruction (× class subset) "
                 "-> pruned-*.safetensors, metrics.pruned", enabled=lambda r: r.prune is not None, run=run_prune,
                 check=_check))
