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
resumed run writes them as an uninterrupted one does."""

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

__all__ = ["Selection", "prune_classes", "selections", "check_prune_classes", "check_prune_model", "run_prune"]


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


def _round_to(recipe) -> int | None:
    """``prune.round_to`` as used (None for null and 1: no rounding)."""
    from ...pruning.prune import check_round_to

    return check_round_to(recipe.prune.round_to, "prune.round_to")


def _budget(recipe):
    """``prune.budget`` as a :class:`~jas_prune.pruning.budget.Budget` (None without one)."""
    from ...pruning.budget import Budget

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
    from ...models import discover_ffn
    from ...pruning.budget import check_reachable

    round_to = _round_to(recipe)
    if round_to is not None:
        narrow = next((l for l in discover_ffn(model).layers if l.hidden < round_to), None)
        if narrow is not None:
            raise PruneSettingError(f"prune.round_to: {round_to} exceeds the FFN width {narrow.hidden} of block "
                                    f"{narrow.index}; lower prune.round_to")
    budget = _budget(recipe)
    if budget is not None:
        p = recipe.prune
        classes = None if p.classes is None else resolve_classes(p.classes, source.class_names, key="prune.classes")
        check_reachable(model, budget, round_to=round_to, head_classes=classes if p.head == "cut" else None,
                        class_names=source.class_names, key="prune.budget")


# -- what identifies a finished entry -----------------------------------------------------------

#: the keys of a budget record that identify the budget (the rest is what was found)
_BUDGET_SPEC = ("target", "value", "step", "batch_size")


def _budget_spec(record: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else {k: record[k] for k in _BUDGET_SPEC if k in record}


def _wanted(ctx, sel: Selection, method: str, ratio: float | None, recon: str, aggregation: str | None,
            calib_images: int) -> dict[str, Any]:
    """The settings an entry must have been made with to be kept on resume (``ratio`` None: the
    ``prune.budget`` entry, identified by its budget instead of its ratio)."""
    p = ctx.recipe.prune
    budget = _budget(ctx.recipe) if ratio is None else None
    mode = "uniform" if ratio is None else p.mode_for(ratio)
    want: dict[str, Any] = {"method": method, "classes": sel.classes, "head": sel.head,
                            "mode": mode, "reconstruction": recon,
                            "global_min_keep": p.global_min_keep if mode == "global" else None,
                            "importance": aggregation if method == "jas" else None,
                            "criterion_options": _criterion_options(ctx, method, sel.classes),
                            "round_to": _round_to(ctx.recipe),
                            "budget": budget.spec() if budget is not None else None}
    if ratio is not None:
        want["ratio"] = ratio
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
            "calibration_images": e.calibration_images, "criterion_options": e.criterion_options,
            "round_to": e.round_to, "budget": _budget_spec(e.budget)}
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


#: where an entry stands in the recipe: (selection, method, ratio slot, reconstruction); the
#: budget is the slot after the selection's ratios
_Key = tuple[int, int, int, int]


class _Entries:
    """The stage's entries in the recipe's order, whatever order they were kept or made in."""

    def __init__(self, others: list[PrunedEntry]) -> None:
        self.others = others  # entries of class selections this recipe no longer prunes: first, as they were
        self.by_key: dict[_Key, PrunedEntry] = {}

    def add(self, key: _Key, entry: PrunedEntry) -> None:
        self.by_key[key] = entry

    def ordered(self) -> list[PrunedEntry]:
        return self.others + [self.by_key[k] for k in sorted(self.by_key)]


def run_prune(ctx) -> None:
    check_prune_model(ctx.recipe, ctx.model, ctx.source)  # cheap; also run before any work where wired in
    before = list(ctx.metrics.pruned or [])
    sels = selections(ctx)
    chosen = {None if s.classes is None else tuple(s.classes) for s in sels}
    # entries of class selections this recipe no longer prunes are kept as they are
    entries = _Entries([e for e in before if (None if e.classes is None else tuple(e.classes)) not in chosen])
    # every finished entry of every selection first: an interruption while the first selection is
    # pruned must not drop the later selections' finished entries from metrics.json
    plans = [(i, sel, _plan(ctx, i, sel, before, entries)) for i, sel in enumerate(sels)]
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

    budget, round_to = _budget(ctx.recipe), _round_to(ctx.recipe)
    old = next((e for e in mine if e.budget and _budget_spec(e.budget) == budget.spec() and e.round_to == round_to
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


def _slots(ctx, sel: Selection) -> list[float | None]:
    """The selection's ratio slots: its ratios in recipe order, then ``None`` for the budget
    (whose ratio is found later)."""
    return list(sel.ratios) + ([None] if ctx.recipe.prune.budget is not None else [])


def _plan(ctx, index: int, sel: Selection, before: list[PrunedEntry], entries: _Entries) -> dict[str, list]:
    """Keep the selection's finished entries (one log line each); return what is left to make:
    method -> [(ratio slot, reconstruction index)]."""
    from ...pruning.calibration import per_class_cap

    p = ctx.recipe.prune
    aggregation = ctx.recipe.masks.importance if ctx.recipe.masks is not None else None
    calib_images = len(per_class_cap(ctx.source.subset("probe", sel.classes), p.calibration.images_per_class))
    mine = [e for e in before if e.classes == sel.classes]
    todo: dict[str, list[tuple[int, int]]] = {}
    for m, method in enumerate(p.methods):
        for j, ratio in enumerate(_slots(ctx, sel)):
            for r, recon in enumerate(sel.reconstructions):
                want = _wanted(ctx, sel, method, ratio, recon, aggregation, calib_images)
                old = next((e for e in mine if _matches(ctx, e, want)), None)
                if old is not None:
                    entries.add((index, m, j, r), old)
                    log.info("prune %s: kept %s (already on disk, made with the same settings)", old.stem, old.checkpoint)
                else:
                    todo.setdefault(method, []).append((j, r))
    return todo


def _prune_selection(ctx, index: int, sel: Selection, todo: dict[str, list[tuple[int, int]]],
                     before: list[PrunedEntry], entries: _Entries, searched: dict[Any, dict[str, Any]]) -> None:
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
    round_to = _round_to(ctx.recipe)
    slots = _slots(ctx, sel)
    size_in = input_size(ctx.model)
    example = torch.zeros(1, *size_in, device=ctx.device, dtype=next(ctx.model.parameters()).dtype)
    budget_rec = None
    if any(slots[j] is None for pairs in todo.values() for j, _ in pairs):
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
            budget = slots[j] is None
            ratio = budget_rec["ratio"] if budget else slots[j]
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
                                        _budget(ctx.recipe).suffix() if budget else None) if s]
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
                    criterion_options=_criterion_options(ctx, method, classes), probe_images=len(probe_samples),
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
