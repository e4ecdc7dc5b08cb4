"""The prune stage's split budget (``prune.budget`` with ``units`` beyond ``[ffn]`` or a ``split``):
per criterion, the geometry of every block (kept FFN width, heads, head dimension) that meets
the target, chosen among the candidate splits on held-out probe images.

The cost model is the exact MACs / parameters table (:class:`~jas_prune.pruning.costs.CostTable`)
or, for ``latency_ms``, the measured block table (:class:`~jas_prune.deploy.block_latency.LatencyTable`,
cached under the run directory's ``budget/`` so a resumed run does not measure again). Each
candidate (:mod:`jas_prune.pruning.allocate`) is pruned, refit with the entry's first
reconstruction and scored on the probe images the calibration did not read (all probe images
when it read every one, recorded as ``held_out: false``) — never on test images; the best top-1
(ties: the cheaper) is kept. The record (``metrics.json`` entry ``budget``) holds the target,
what the chosen model achieves, its geometry per block and every candidate's probe top-1.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

from torch import nn

from ..errors import BudgetError
from ..evaluate import accuracy, count_params_macs, predict_logits
from ..models import input_size
from ..pruning.allocate import Allocation, UnitScores, loss_increments, score_split, uniform_split
from ..pruning.attention import AttentionSummary, prune_attention
from ..pruning.costs import CostTable, dense_geometry
from ..pruning.prune import PruneSummary, prune_ffn

log = logging.getLogger("jas_prune")

__all__ = ["split_budget", "candidates"]


def _label(a: Allocation) -> str:
    p = a.params
    if a.split == "uniform":
        return f"uniform: attention {p.get('heads', 0):g} heads / {p.get('head_dims', 0):g} dims, FFN {p['ffn_ratio']:g}"
    return f"score: weight {p['attention_weight']:g}, {p['normalise']}"


def candidates(budget: Any, costs: Any, scores: UnitScores, dense: dict, limit: float, round_to: int | None,
               key: str = "prune.budget") -> list[Allocation]:
    """Every candidate split of ``budget`` that meets ``limit`` (uniform ones first, in the
    recipe's order). Raises BudgetError when none does."""
    out: list[Allocation] = []
    attention = [u for u in budget.units if u != "ffn"]
    last: BudgetError | None = None
    for split in budget.split:
        if split == "uniform":
            for share in budget.shares or [0.0]:
                on = "head_dims" if "head_dims" in attention else "heads"
                kw = {on: share} if attention else {}
                try:
                    out.append(uniform_split(costs, dense, limit, step=budget.step, round_to=round_to, key=key, **kw))
                except BudgetError as exc:
                    last = exc
        else:
            for w in budget.weights:
                try:
                    out.append(score_split(costs, scores, dense, limit, units=budget.units, attention_weight=w,
                                           normalise=budget.normalise, round_to=round_to, key=key))
                except BudgetError as exc:
                    last = exc
    if not out:
        raise last or BudgetError(f"{key}: no split candidate")
    return out


def _apply(ctx, bench, alloc: Allocation, scored: Any, heads: Any) -> tuple[nn.Module, PruneSummary,
                                                                              AttentionSummary | None]:
    model = copy.deepcopy(ctx.model)
    widths = {b: g[0] for b, g in alloc.geometry.items()}
    total = sum(g[0] for g in dense_geometry(ctx.model).values())
    removed = 1.0 - sum(widths.values()) / total
    summary = prune_ffn(model, scored.scores, ratio=min(max(removed, 1e-9), 1 - 1e-9), protect=scored.protect,
                        keep_widths=widths, example_inputs=bench.example, head_classes=bench.sel.head_classes,
                        class_names=ctx.source.class_names)
    attention = None
    if heads is not None and set(ctx.prune.budget.units) - {"ffn"}:
        attention = prune_attention(model, heads, keep={b: g[1:] for b, g in alloc.geometry.items()},
                                    example_inputs=bench.example)
    return model, summary, attention


def _costs(ctx, bench) -> Any:
    budget = ctx.prune.budget
    if budget.target != "latency_ms":
        return CostTable.from_model(ctx.model, budget.target, head_classes=bench.sel.head_classes,
                                    class_names=ctx.source.class_names)
    from ..deploy.block_latency import LatencyTable

    onnx = ctx.recipe.export.onnx if ctx.recipe.export is not None else None
    table = LatencyTable.measure(ctx.model, batch_size=budget.batch_size or 1, threads=budget.threads,
                                 providers=onnx.providers if onnx else ("cuda", "cpu"), points=budget.points,
                                 cache_dir=ctx.run.root / "budget")
    log.info("budget latency table: %s (%s)", table.record["key"], "cached" if table.record["cached"] else "measured")
    return table


def _choice_batches(ctx, bench) -> tuple[Any, list[str], bool]:
    """The probe images the calibration did not read (all of them when it read every one), their
    ids and whether they are held out; rendered once per class selection (kept on ``bench``)."""
    if bench.choice is None:
        bench.choice = _render_choice(ctx, bench)
    return bench.choice


def _render_choice(ctx, bench) -> tuple[Any, list[str], bool]:
    from ..data import make_loader
    from ..pruning.calibration import cached_batches
    from .prune_plan import calibration_samples

    probe = ctx.source.subset("probe", bench.sel.classes)
    used = {s.id for s in calibration_samples(ctx, bench.sel)}
    held = [s for s in probe if s.id not in used]
    samples = held or probe
    d = ctx.recipe.data
    batches = cached_batches(make_loader(samples, ctx.transform, batch_size=d.batch_size, workers=d.workers,
                                         seed=ctx.recipe.runtime.seed))
    return batches, [s.id for s in samples], bool(held)


def split_budget(ctx, bench, method: str, scored: Any, heads: Any,
                 refit: Callable[[nn.Module], Any]) -> tuple[nn.Module, PruneSummary, AttentionSummary | None,
                                                             dict[str, Any]]:
    """The pruned model of the split budget for ``method`` (before its reconstruction), prune_ffn's
    and prune_attention's summaries and the budget record. ``refit`` reconstructs a candidate in
    place (the entry's first reconstruction) before it is scored on the probe images."""
    budget = ctx.prune.budget
    costs = _costs(ctx, bench)
    dense = dense_geometry(ctx.model)
    limit = budget.value * costs.dense if budget.target != "latency_ms" else budget.value

    def fraction(cost: float) -> float:  # of the dense model's MACs / params; latency: ms as they are
        return cost / (costs.dense if budget.target != "latency_ms" else 1.0)

    def losses(per: Any, cumulative: bool) -> dict[int, Any]:  # obs: a ranking; its losses are the rises
        return {b: loss_increments(s) for b, s in per.items()} if cumulative else dict(per)

    scores = UnitScores(losses(scored.scores, scored.cumulative),
                        losses(heads.heads, heads.cumulative) if heads is not None else {},
                        losses(heads.dims, heads.cumulative) if heads is not None else {},
                        protect_ffn=dict(scored.protect or {}),
                        protect_heads=dict(heads.protect) if heads is not None else {})
    cands = candidates(budget, costs, scores, dense, limit, ctx.prune.round_to)
    rows: list[dict[str, Any]] = []
    best: tuple[Any, ...] | None = None
    choice: dict[str, Any] = {}
    if len(cands) > 1:
        batches, ids, held = _choice_batches(ctx, bench)
        choice = {"choice_images": len(ids), "held_out": held}
    for a in cands:
        made = _apply(ctx, bench, a, scored, heads)
        if len(cands) == 1:
            best = (a, made)
            break
        trial = copy.deepcopy(made[0])
        refit(trial)
        logits, labels = predict_logits(trial, batches, device=ctx.device, sample_ids=ids,
                                        desc=f"budget candidate {method}")
        top1 = accuracy(logits, labels, label_map=bench.label_map)["top1"]
        rows.append({"candidate": _label(a), "probe_top1": top1, "predicted": fraction(a.cost), **a.params})
        if best is None or (top1, -a.cost) > (best[2], -best[0].cost):
            best = (a, made, top1)
        del trial
    alloc, (model, summary, attention) = best[0], best[1]
    achieved, latency = _achieved(ctx, budget, model, costs)
    record = {**budget.spec(), "ratio": summary.removed_fraction, "achieved": achieved,
              "predicted": fraction(alloc.cost),
              "met": achieved <= budget.value, "chosen": _label(alloc), "chosen_split": alloc.split,
              "blocks": alloc.record()["blocks"], "candidates": rows, "models_measured": len(cands), **choice}
    if budget.target == "latency_ms":
        record.update(provider=latency.get("provider"), threads=latency.get("threads"),
                      latency_ms_p90=latency.get("latency_ms_p90"), iters=latency.get("iters"),
                      dense_ms=costs.dense, table=costs.record["key"], table_cached=costs.record["cached"])
    log.info("budget split %s: %s of %d candidates, achieved %.4g (target %g)", method, _label(alloc), len(cands),
             achieved, budget.value)
    return model, summary, attention, record


def _achieved(ctx, budget: Any, model: nn.Module, costs: Any) -> tuple[float, dict[str, Any]]:
    if budget.target != "latency_ms":
        dense = count_params_macs(ctx.model, input_size(ctx.model))[budget.target]
        return count_params_macs(model, input_size(model))[budget.target] / dense, {}
    from ..deploy.latency import onnx_latency

    onnx = ctx.recipe.export.onnx if ctx.recipe.export is not None else None
    rec = onnx_latency(model, budget.batch_size or 1, threads=budget.threads,
                       providers=onnx.providers if onnx else ("cuda", "cpu"))
    return float(rec["latency_ms_p50"]), rec
