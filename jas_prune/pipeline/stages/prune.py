"""Prune: every ``prune.methods`` × ``prune.ratios`` (then ``prune.budget``) ×
``prune.reconstruction`` through one pipeline: criterion scores -> Torch-Pruning dependency graph
-> reconstruction (none, bias or least squares, on probe images) -> optional fine-tune -> test
accuracy of the kept classes -> checkpoint. The same for ``prune.classes`` and for every subset of
``prune.class_subsets``. ``prune.round_to`` rounds every kept width to a multiple.

``prune.budget`` adds, per method and reconstruction, the entry at the smallest uniform ratio
whose model meets the target (:mod:`jas_prune.pruning.budget`; searched once per head, since
the widths do not depend on the criterion, and read back from a finished entry on resume).

Each (method, ratio) is pruned once; its reconstructions are made on copies of that model. The
test and calibration images are rendered once per class selection and held in memory (when
small), since dozens of models are evaluated on them. Finished entries (checkpoint on disk and
in metrics, same settings) are kept on resume (one log line each), and ``metrics.json`` lists
the entries in the recipe's order (selection, method, ratio then budget, reconstruction), so a
resumed run writes them as an uninterrupted one does. What to make and what to keep is planned
in :mod:`jas_prune.pipeline.prune_plan`."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from ...errors import BudgetError, InvalidArgumentError, PruneSettingError, StageNotAvailableError
from ...evaluate import accuracy, count_params_macs, predict_logits
from ...metrics import PrunedEntry
from ...models import input_size
from ..prune_plan import (Entries, Selection, budget_of, budget_spec, check_prune_model, criterion_options, plan,
                          round_to_of, selections, slots)
from .base import STAGES, Stage

log = logging.getLogger("jas_prune")

__all__ = ["run_prune"]



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
    check_prune_model(ctx.recipe, ctx.model, ctx.source)  # cheap; also run before any work where wired in
    before = list(ctx.metrics.pruned or [])
    sels = selections(ctx)
    chosen = {None if s.classes is None else tuple(s.classes) for s in sels}
    # entries of class selections this recipe no longer prunes are kept as they are
    entries = Entries([e for e in before if (None if e.classes is None else tuple(e.classes)) not in chosen])
    # every finished entry of every selection first: an interruption while the first selection is
    # pruned must not drop the later selections' finished entries from metrics.json
    plans = [(i, sel, plan(ctx, i, sel, before, entries)) for i, sel in enumerate(sels)]
    searched: dict[Any, dict[str, Any]] = {}  # head classes -> budget record (one search per head)
    for i, sel, todo in plans:
        if todo:
            _prune_selection(ctx, i, sel, todo, before, entries, searched)
    ctx.metrics.pruned = entries.ordered()
    ctx.save_metrics()


def _budget_record(ctx, sel: Selection, mine: list[PrunedEntry], head_classes: list[int] | None,
                   example: torch.Tensor, searched: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The ratio ``prune.budget`` gives for this selection, with what it achieves: read back from
    a finished entry made for the same budget (a resumed run keeps what it found, even for a
    latency target that a second measurement might place one step away), or searched once per
    head (the widths, hence MACs and latency, do not depend on the classes beyond the head)."""
    from ...pruning.budget import describe_record, find_ratio

    budget, round_to = budget_of(ctx.recipe), round_to_of(ctx.recipe)
    old = next((e for e in mine if e.budget and budget_spec(e.budget) == budget.spec() and e.round_to == round_to
                and (e.head or "keep") == sel.head and ctx.run.file(e.checkpoint).is_file()), None)
    if old is not None:
        return dict(old.budget)
    head = None if head_classes is None else tuple(head_classes)
    if head not in searched:
        onnx = ctx.recipe.export.onnx if ctx.recipe.export is not None else None
        t0 = time.perf_counter()
        result = find_ratio(ctx.model, budget, round_to=round_to, head_classes=head_classes,
                            class_names=ctx.source.class_names, example_inputs=example, key="prune.budget",
                            providers=tuple(onnx.providers) if onnx is not None else ("cuda", "cpu"))
        searched[head] = result.record()
        log.info("budget %s (%s): %d models measured in %.1f s", describe_record(searched[head]),
                 "all classes" if sel.classes is None else f"classes {sel.classes}", result.models,
                 time.perf_counter() - t0)
    return searched[head]


def _prune_selection(ctx, index: int, sel: Selection, todo: dict[str, list[tuple[int, int]]],
                     before: list[PrunedEntry], entries: Entries, searched: dict[Any, dict[str, Any]]) -> None:
    from ...checkpoint import save_pruned
    from ...data import make_loader
    from ...io import file_record
    from ...pruning.budget import describe_record
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
    round_to = round_to_of(ctx.recipe)
    ratio_slots = slots(ctx, sel)
    size_in = input_size(ctx.model)
    example = torch.zeros(1, *size_in, device=ctx.device, dtype=next(ctx.model.parameters()).dtype)
    budget_rec = None
    if any(ratio_slots[j] is None for pairs in todo.values() for j, _ in pairs):
        budget_rec = _budget_record(ctx, sel, mine, head_classes, example, searched)
    test_loader, test_samples = ctx.loader("test", classes)
    test_ids = [s.id for s in test_samples]
    test_batches = cached_batches(test_loader)
    dense_logits, test_labels = predict_logits(ctx.model, test_batches, device=ctx.device, sample_ids=test_ids,
                                               desc="evaluate dense subset")
    dense_sub = accuracy(dense_logits, test_labels)
    label_map = {c: j for j, c in enumerate(head_classes)} if head_classes is not None else None
    calib: Any = None
    if any(sel.reconstructions[r] != "none" for pairs in todo.values() for _, r in pairs):
        calib = cached_batches(make_loader(calib_samples, ctx.transform, batch_size=ctx.recipe.data.batch_size,
                                           workers=ctx.recipe.data.workers, seed=ctx.recipe.runtime.seed))
    probe_loader = None
    where = "prune" if sel.subset is None else f"prune.class_subsets[{sel.subset}] {classes}"
    for m, method in enumerate(p.methods):
        if method not in todo:
            continue
        t0 = time.perf_counter()
        scored = ctx.criterion(method, classes, example_inputs=example,
                               masks=MasksRef(ctx.run.root, aggregation, ctx.digest) if aggregation else None)
        score_seconds = time.perf_counter() - t0
        importance_seconds = _importance_seconds(ctx, method, score_seconds, len(probe_samples), before)
        by_slot: dict[int, list[int]] = {}
        for j, r in todo[method]:
            by_slot.setdefault(j, []).append(r)
        for j, recon_ids in by_slot.items():
            budget = ratio_slots[j] is None
            ratio = budget_rec["ratio"] if budget else ratio_slots[j]
            mode = "uniform" if budget else p.mode_for(ratio)
            key = "prune.budget" if budget else sel.ratios_key
            base = copy.deepcopy(ctx.model)
            try:
                summary = prune_ffn(base, scored.scores, ratio=ratio, mode=mode, protect=scored.protect,
                                    example_inputs=example, head_classes=head_classes,
                                    class_names=ctx.source.class_names,
                                    min_keep=float(p.global_min_keep * (1.0 - ratio)), round_to=round_to)
            except BudgetError as exc:  # what must stay (class masks, min_keep) exceeds the keep budget
                what = f"raise prune.budget.{budget_rec['target']}" if budget else f"lower {key}"
                hint = (f"{what} or {'lower ' if budget else ''}masks.topk") if exc.protected else what
                raise BudgetError(f"{key}: {ratio} with method '{method}' ({where}): {exc}; {hint}",
                                  protected=exc.protected) from None
            for i, r in enumerate(recon_ids):
                recon = sel.reconstructions[r]
                model = base if i == len(recon_ids) - 1 else copy.deepcopy(base)
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
                suffixes = [s for s in (_suffix(recon), f"rt{round_to}" if round_to else None,
                                        budget_of(ctx.recipe).suffix() if budget else None) if s]
                stem = ctx.run.pruned_name(method, ratio, classes, suffixes=suffixes)
                extra = {"method": method, "ratio": ratio, "bias_compensation": recon == "bias",
                         "reconstruction": recon, "classes": classes, "class_names": ctx.source.class_names}
                if round_to is not None:
                    extra["round_to"] = round_to
                if budget:
                    extra["budget"] = budget_rec
                ckpt = save_pruned(model, ctx.run.checkpoint(stem), extra=extra)
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
                    criterion_options=criterion_options(ctx, method, classes), probe_images=len(probe_samples),
                    round_to=round_to, budget=dict(budget_rec) if budget else None,
                    **(_reconstruction_fields(rec, len(calib_samples)) if rec is not None else {}))
                entries.add((index, m, j, r), entry)
                ctx.metrics.pruned = entries.ordered()
                ctx.save_metrics()
                log.info("pruned %-10s ratio %.2f %-4s %s: top1 %.4f (dense %.4f) params %d%s%s", method, ratio, recon,
                         "all classes" if classes is None else f"classes {classes}", acc["top1"],
                         dense_sub["top1"], size["params"],
                         f", reconstruction {rec.seconds:.1f} s" if rec is not None else "",
                         f", budget {describe_record(budget_rec)}" if budget else "")


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
