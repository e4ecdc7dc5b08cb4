"""Prune: every ``prune.methods`` × ``prune.ratios`` (then ``prune.budget``) ×
``prune.reconstruction`` through one pipeline: criterion scores -> Torch-Pruning dependency graph
-> reconstruction (none, bias or least squares, on probe images) -> optional fine-tune -> test
accuracy of the kept classes -> checkpoint. The same for ``prune.classes`` and for every subset of
``prune.class_subsets``. ``prune.round_to`` rounds every kept width to a multiple.

``prune.budget`` adds, per method and reconstruction, the entry at the smallest uniform ratio
whose model meets the target (:mod:`jas_prune.pruning.budget`; searched once per head, since
the widths do not depend on the criterion, and read back from a finished entry on resume); a
budget split over heads and head dimensions is made per method (:mod:`..budget_split`).

Each (method, ratio) is pruned once; its reconstructions are made on copies of that model. The
test and calibration images are rendered once per class selection and held in memory (when
small), since dozens of models are evaluated on them. Finished entries (checkpoint on disk and
in metrics, same settings) are kept on resume (one log line each), and ``metrics.json`` lists
the entries in the recipe's order (selection, method, ratio then budget, reconstruction), so a
resumed run writes them as an uninterrupted one does. What to make and what to keep is planned
in :mod:`jas_prune.pipeline.prune_plan`; the settings come resolved once (``ctx.prune``,
:class:`~jas_prune.pruning.settings.ResolvedPrune`).

One entry is made by named steps, in this order: :func:`_score` (the criterion's importance,
once per method and selection) -> :func:`_prune` (once per ratio) -> :func:`_reconstruct` ->
:func:`_recover` (distillation ``prune.recover``, then fine-tune) -> :func:`_evaluate` ->
:func:`_record` (checkpoint and ``metrics.json`` entry). What they share for one class selection
(test batches, dense accuracy, calibration batches, the budget's ratio) is prepared once by
:func:`_prepare`."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import BudgetError, InvalidArgumentError, PruneSettingError, StageNotAvailableError
from ...evaluate import accuracy, count_params_macs, predict_logits
from ...metrics import PrunedEntry
from ...models import input_size
from ...pruning.attention import prune_attention, stage_head_scores
from ...pruning.settings import Selection
from ..budget_split import split_budget
from ..prune_plan import Entries, calibration_samples, plan
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
    before = list(ctx.metrics.pruned or [])
    sels = ctx.prune.selections
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


def _budget_record(ctx, sel: Selection, mine: list[PrunedEntry], example: torch.Tensor,
                   searched: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The ratio ``prune.budget`` gives for this selection, with what it achieves: read back from
    a finished entry made for the same budget (a resumed run keeps what it found, even for a
    latency target that a second measurement might place one step away), or searched once per
    head (the widths, hence MACs and latency, do not depend on the classes beyond the head)."""
    from ...deploy.latency import onnx_latency
    from ...pruning.budget import describe_record, find_ratio

    budget, round_to = ctx.prune.budget, ctx.prune.round_to
    old = next((e for e in mine if e.budget and e.identity()["budget"] == budget.spec() and e.round_to == round_to
                and (e.head or "keep") == sel.head and ctx.run.file(e.checkpoint).is_file()), None)
    if old is not None:
        return dict(old.budget)
    head = None if sel.head_classes is None else tuple(sel.head_classes)
    if head not in searched:
        onnx = ctx.recipe.export.onnx if ctx.recipe.export is not None else None
        t0 = time.perf_counter()
        result = find_ratio(ctx.model, budget, round_to=round_to, head_classes=sel.head_classes,
                            class_names=ctx.source.class_names, example_inputs=example, key="prune.budget",
                            latency=lambda m: onnx_latency(m, budget.batch_size or 1, threads=budget.threads,
                                                           providers=onnx.providers if onnx else ("cuda", "cpu")))
        searched[head] = result.record()
        log.info("budget %s (%s): %d models measured in %.1f s", describe_record(searched[head]),
                 "all classes" if sel.classes is None else f"classes {sel.classes}", result.models,
                 time.perf_counter() - t0)
    return searched[head]


@dataclass
class _Bench:
    """What every entry of one class selection shares, prepared once by :func:`_prepare`."""

    sel: Selection
    example: torch.Tensor
    size_in: tuple[int, ...]
    probe_images: int
    calibration_images: int
    test_batches: Any
    test_ids: list[str]
    dense: dict[str, Any]
    label_map: dict[int, int] | None
    #: cached calibration batches (None when no entry left to make reconstructs)
    calib: Any
    #: the ``prune.budget`` record (None when the budget entry is not made here)
    budget: dict[str, Any] | None
    before: list[PrunedEntry]
    #: the probe loader, made on first use (fine-tuning)
    probe_loader: Any = None
    #: the probe images a split budget's candidates are scored on, rendered on first use and
    #: shared by every method (:func:`..budget_split._choice_batches`)
    choice: Any = None

    def slot(self, ctx, j: int) -> tuple[float | None, float, str, str]:
        """Ratio slot ``j``: (the slot's ratio: None for the budget, the ratio pruned at, the
        allocation mode, the recipe key of the ratio)."""
        wanted = ctx.prune.slots(self.sel)[j]
        if wanted is None:
            return None, self.budget.get("ratio", 0.0), "uniform", "prune.budget"
        return wanted, wanted, ctx.prune.settings.mode_for(wanted), self.sel.ratios_key


def _prepare(ctx, sel: Selection, todo: dict[str, list[tuple[int, int]]], before: list[PrunedEntry],
             searched: dict[Any, dict[str, Any]]) -> _Bench:
    """The selection's test batches (rendered once) and dense accuracy on them, its calibration
    batches (when an entry reconstructs), and the budget's ratio (when the budget entry is made)."""
    from ...data import make_loader
    from ...pruning.calibration import cached_batches

    classes = sel.classes
    size_in = input_size(ctx.model)
    example = torch.zeros(1, *size_in, device=ctx.device, dtype=next(ctx.model.parameters()).dtype)
    slots = ctx.prune.slots(sel)
    budget_rec = None
    if any(slots[j] is None for pairs in todo.values() for j, _ in pairs):  # a split budget: per method, later
        budget_rec = {} if ctx.prune.budget.joint else _budget_record(
            ctx, sel, [e for e in before if e.classes == classes], example, searched)
    test_loader, test_samples = ctx.loader("test", classes)
    test_ids = [s.id for s in test_samples]
    test_batches = cached_batches(test_loader)
    dense_logits, test_labels = predict_logits(ctx.model, test_batches, device=ctx.device, sample_ids=test_ids,
                                               desc="evaluate dense subset")
    head = sel.head_classes
    calib_samples = calibration_samples(ctx, sel)
    calib: Any = None
    if any(sel.reconstructions[r] != "none" for pairs in todo.values() for _, r in pairs):
        d = ctx.recipe.data
        calib = cached_batches(make_loader(calib_samples, ctx.transform, batch_size=d.batch_size, workers=d.workers,
                                           seed=ctx.recipe.runtime.seed))
    return _Bench(sel, example, size_in, len(ctx.source.subset("probe", classes)), len(calib_samples), test_batches,
                  test_ids, accuracy(dense_logits, test_labels),
                  {c: j for j, c in enumerate(head)} if head is not None else None, calib, budget_rec, before)


def _prune_selection(ctx, index: int, sel: Selection, todo: dict[str, list[tuple[int, int]]],
                     before: list[PrunedEntry], entries: Entries, searched: dict[Any, dict[str, Any]]) -> None:
    """Make the selection's entries left to make: per method its scores once, per ratio one
    pruned model, per reconstruction a copy of it."""
    bench = _prepare(ctx, sel, todo, before, searched)
    for m, method in enumerate(ctx.prune.settings.methods):
        if method not in todo:
            continue
        scored, score_seconds = _score(ctx, bench, method)
        heads = _head_scores(ctx, bench, method)
        by_slot: dict[int, list[int]] = {}
        for j, r in todo[method]:
            by_slot.setdefault(j, []).append(r)
        for j, recon_ids in by_slot.items():
            split = bench.slot(ctx, j)[0] is None and ctx.prune.budget.joint
            logits = ctx.prune.budget.logits if split else None
            if split:  # spent over units, chosen on probe
                base, summary, attention, bench.budget = split_budget(
                    ctx, bench, method, scored, heads,
                    refit=lambda m, r=sel.reconstructions[recon_ids[0]]: _reconstruct(ctx, bench, m, r, logits))
            else:
                base, summary = _prune(ctx, bench, method, scored, j)
                attention = prune_attention(base, heads if ctx.prune.settings.attention is not None else None,
                                            settings=ctx.prune.settings.attention, example_inputs=bench.example)
            for i, r in enumerate(recon_ids):
                recon = sel.reconstructions[r]
                model = base if i == len(recon_ids) - 1 else copy.deepcopy(base)
                rec = _reconstruct(ctx, bench, model, recon, logits)
                ft, kd = _recover(ctx, bench, model, f"recover {method} {bench.slot(ctx, j)[1]:g}")
                acc = _evaluate(ctx, bench, model, method)
                _record(ctx, bench, entries, (index, m, j, r), model, method=method, recon=recon, summary=summary,
                        rec=rec, ft=ft, kd=kd, acc=acc, score_seconds=score_seconds, attention=attention)


def _score(ctx, bench: _Bench, method: str) -> tuple[Any, float]:
    """The criterion's scores on the selection's probe images, and the seconds they took."""
    from ...pruning.criteria import MasksRef

    aggregation = ctx.prune.aggregation
    t0 = time.perf_counter()
    scored = ctx.criterion(method, bench.sel.classes, example_inputs=bench.example,
                           masks=MasksRef(ctx.run.root, aggregation, ctx.digest) if aggregation else None)
    return scored, time.perf_counter() - t0


def _head_scores(ctx, bench: _Bench, method: str) -> Any:
    """Head and head-dimension scores of the criterion (``prune.attention``; None without)."""
    from ...pruning.criteria import MasksRef

    aggregation = ctx.prune.aggregation
    masks = MasksRef(ctx.run.root, aggregation, ctx.digest) if aggregation else None
    return stage_head_scores(ctx, method, bench.sel.classes, bench.example, masks)


def _prune(ctx, bench: _Bench, method: str, scored: Any, j: int) -> tuple[nn.Module, Any]:
    """A pruned copy of the dense model at ratio slot ``j``, and prune_ffn's summary.

    Raises:
        BudgetError: what must stay (class masks, ``global_min_keep``) exceeds the keep budget,
            naming the ratio's key and what to change.
    """
    from ...pruning.prune import prune_ffn

    slot, ratio, mode, key = bench.slot(ctx, j)
    budget = slot is None
    base = copy.deepcopy(ctx.model)
    try:
        summary = prune_ffn(base, scored.scores, ratio=ratio, mode=mode, protect=scored.protect,
                            example_inputs=bench.example, head_classes=bench.sel.head_classes,
                            class_names=ctx.source.class_names,
                            min_keep=float(ctx.prune.settings.global_min_keep * (1.0 - ratio)),
                            round_to=ctx.prune.round_to)
    except BudgetError as exc:  # what must stay (class masks, min_keep) exceeds the keep budget
        what = f"raise prune.budget.{bench.budget['target']}" if budget else f"lower {key}"
        hint = (f"{what} or {'lower ' if budget else ''}masks.topk") if exc.protected else what
        raise BudgetError(f"{key}: {ratio} with method '{method}' ({bench.sel.where}): {exc}; {hint}",
                          protected=exc.protected) from None
    return base, summary


def _reconstruct(ctx, bench: _Bench, model: nn.Module, recon: str, logits: str | None = None) -> Any:
    """Refit the pruned blocks on the calibration images (``prune.reconstruction``); its report
    (None for ``none``). ``logits``: the query/key compensation (None: ``prune.attention``'s)."""
    from ...pruning.reconstruct import reconstruct

    if recon == "none":
        return None
    c, attention = ctx.prune.settings.calibration, ctx.prune.settings.attention
    try:
        return reconstruct(model, ctx.model, bench.calib, method=recon, target=c.target, damping=c.damping,
                           logits=logits or (attention.logits if attention is not None else "none"))
    except PruneSettingError as exc:  # e.g. an fc2 without bias to refit
        raise PruneSettingError(f"prune.reconstruction: {exc}") from None
    except InvalidArgumentError as exc:
        raise PruneSettingError(f"prune.reconstruction: {recon} ({bench.sel.where}): {exc}") from None


def _recover(ctx, bench: _Bench, model: nn.Module, desc: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Recover accuracy after pruning, after the reconstruction and before the evaluation: the
    distillation from the dense model (``prune.recover``), then the optional fine-tune on the
    probe images (``prune.finetune``); their records (None without)."""
    from ...pruning.finetune import finetune
    from ...pruning.recover import recover_entry

    kd = recover_entry(ctx, ctx.prune.settings.recover, model, bench.sel.classes, bench.sel.head_classes, desc=desc)
    ft = ctx.prune.settings.finetune
    if ft is None or ft.epochs <= 0:
        return None, kd
    if bench.probe_loader is None:
        bench.probe_loader, _ = ctx.loader("probe", bench.sel.classes)
    return finetune(model, bench.probe_loader, epochs=ft.epochs, lr=ft.lr, head_classes=bench.sel.head_classes,
                    device=ctx.device), kd


def _evaluate(ctx, bench: _Bench, model: nn.Module, method: str) -> dict[str, Any]:
    """Top-1/top-5 of the pruned model on the selection's test images (the cut head's labels mapped)."""
    logits, labels = predict_logits(model, bench.test_batches, device=ctx.device, sample_ids=bench.test_ids,
                                    desc=f"evaluate {method}")
    return accuracy(logits, labels, label_map=bench.label_map)


def _record(ctx, bench: _Bench, entries: Entries, key: tuple[int, int, int, int], model: nn.Module, *,
            method: str, recon: str, summary: Any, rec: Any, ft: dict[str, Any] | None,
            kd: dict[str, Any] | None, acc: dict[str, Any], score_seconds: float, attention: Any = None) -> None:
    """Save the checkpoint, add its ``metrics.json`` entry (the identity it was made with, then
    what was measured) and rewrite ``metrics.json``."""
    from ...checkpoint import save_pruned
    from ...io import file_record
    from ...pruning.budget import describe_record
    from ...pruning.choices import RECONSTRUCTION_SUFFIX

    sel, prune = bench.sel, ctx.prune
    slot, ratio, _, _ = bench.slot(ctx, key[2])
    budget = slot is None
    identity = prune.identity(sel, method, slot, recon, bench.calibration_images)
    suffixes = [s for s in (RECONSTRUCTION_SUFFIX[recon], f"rt{prune.round_to}" if prune.round_to else None,
                            prune.budget.suffix() if budget else None) if s]
    stem = ctx.run.pruned_name(method, ratio, sel.classes, suffixes=suffixes)
    extra = {"method": method, "ratio": ratio, "bias_compensation": recon == "bias",
             "reconstruction": recon, "classes": sel.classes, "class_names": ctx.source.class_names}
    if prune.round_to is not None:
        extra["round_to"] = prune.round_to
    if budget:
        extra["budget"] = bench.budget
    if attention is not None:
        extra["attention"] = attention.to_dict()
    ckpt = save_pruned(model, ctx.run.checkpoint(stem), extra=extra)
    size = count_params_macs(model, bench.size_in)
    entry = PrunedEntry(
        **{**identity, "ratio": ratio, "budget": dict(bench.budget) if budget else None,
           "attention": _attention_record(attention, identity, rec), "recover": kd},
        top1=acc["top1"], top5=acc["top5"], params=size["params"], macs=size["macs"],
        bias_compensation=recon == "bias", checkpoint=ckpt.name, dense_top1=bench.dense["top1"],
        dense_top5=bench.dense["top5"], test_images=acc["n"], removed_fraction=summary.removed_fraction,
        widths={str(b): w for b, w in summary.widths_after.items()}, finetune=ft, score_seconds=score_seconds,
        checkpoint_file=file_record(ckpt, ctx.run.root),  # tamper evidence
        importance_seconds=_importance_seconds(ctx, method, score_seconds, bench.probe_images, bench.before),
        class_subset=sel.subset, probe_images=bench.probe_images,
        **(_reconstruction_fields(rec) if rec is not None else {}))
    entries.add(key, entry)
    ctx.metrics.pruned = entries.ordered()
    ctx.save_metrics()
    log.info("pruned %-10s ratio %.2f %-4s %s: top1 %.4f (dense %.4f) params %d%s%s", method, ratio, recon,
             "all classes" if sel.classes is None else f"classes {sel.classes}", acc["top1"],
             bench.dense["top1"], size["params"],
             f", reconstruction {rec.seconds:.1f} s" if rec is not None else "",
             f", budget {describe_record(bench.budget)}" if budget else "")


def _attention_record(attention, identity: dict[str, Any], rec) -> dict[str, Any] | None:
    """What ``prune.attention`` removed, with ``logits`` (when applied) and the blocks where the
    logit compensation was kept (``logits_kept``)."""
    if attention is None:
        return None
    out = {**attention.to_dict(), **(identity["attention"] or {})}  # a split budget: no prune.attention
    if rec is not None and rec.logits:
        out["logits_kept"] = {str(r.block): r.kept for r in rec.logits}
    return out


def _reconstruction_fields(rec) -> dict[str, Any]:
    """What a reconstruction measured, as PrunedEntry fields (what it was made with is the entry's identity)."""
    def rows(blocks) -> list[dict[str, Any]]:
        return [{"block": b.block, "width": b.width, "relative_before": b.relative_before,
                 "relative_after": b.relative_after, "refit": b.refit} for b in blocks]

    return {"reconstruction_seconds": rec.seconds, "reconstruction_blocks": rows(rec.blocks),
            **({"reconstruction_attention": rows(rec.attention)} if rec.attention else {})}


def _check(recipe) -> None:
    if recipe.prune is not None and "jas" in recipe.prune.methods and recipe.masks is None:
        raise StageNotAvailableError("prune.methods: 'jas' needs the attribution and masks sections "
                                     "(JAS importance comes from the class masks)")
    budget = recipe.prune.budget if recipe.prune is not None else None
    if recipe.prune is not None and (recipe.prune.attention is not None
                                     or (budget is not None and set(budget.units) - {"ffn"})):
        from ...pruning.attention import check_head_methods

        check_head_methods(recipe.prune.methods,
                           "prune.attention" if recipe.prune.attention is not None else "prune.budget.units")


@STAGES.register
def _prune_stage() -> Stage:
    return Stage("prune", "structured FFN pruning, every method × ratio × reconstruction (× class subset) "
                 "-> pruned-*.safetensors, metrics.pruned", enabled=lambda r: r.prune is not None, run=run_prune,
                 check=_check, order=70)
