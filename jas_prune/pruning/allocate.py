"""Split a budget between FFN neurons, heads and head dimensions.

Two ways to reach a target cost (a :class:`~jas_prune.pruning.costs.CostTable` of MACs or
parameters, or a measured latency table) with every block's geometry ``(ffn, heads, head_dim)``:

- :func:`uniform_split` — the attention share fixed (``heads``, ``head_dims`` as
  ``prune.attention`` takes them), the smallest uniform FFN ratio (a multiple of ``step``) that
  meets the target: the baseline, and with no attention share the FFN-only cut.
- :func:`score_split` — greedy on score per cost saved: every block offers its cheapest-to-lose
  next unit of each type (its lowest-scoring FFN neuron, or ``round_to`` of them; its lowest
  head; its lowest head dimension); the one removing the least score per unit of cost saved
  goes, until the target is met. Floors: one head, one dimension and one neuron (``round_to``,
  the protected ones) per block.

Scores of different unit types are made comparable as **score-loss estimates**: each type's
scores (clamped at 0) are divided by their sum over the whole model, so removing every FFN
neuron loses 1 and removing every head loses ``attention_weight`` (the split's one free
parameter, chosen on probe images among candidates). A head's loss shrinks with the share of
its dimensions already gone, a dimension's (scored summed over heads) with the share of heads
gone. The geometry found is applied by :func:`~jas_prune.pruning.prune.prune_ffn` (``widths``)
and :func:`~jas_prune.pruning.attention.prune_attention` (``keep``), which remove the same
lowest-scoring units.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import BudgetError, InvalidArgumentError
from .costs import BlockCosts, Geometry

__all__ = ["UNITS", "NORMALISE", "UnitScores", "loss_increments", "Allocation", "uniform_split", "score_split", "removed_score",
           "floor_geometry", "check_split_reachable"]

#: the unit types a budget can spend over
UNITS = ("ffn", "heads", "head_dims")


def loss_increments(scores: Tensor) -> Tensor:
    """Per-unit losses from cumulative scores (``obs``: the block's error once the unit is removed,
    increasing in the greedy removal order): each unit's rise over the unit removed before it (the
    first: its own error), made non-decreasing along the order (running maximum) so that the
    lowest losses are the greedy prefix the pruning removes; their sum bounds its error from above
    (equals it when the rises already increase). The last unit, which the greedy never removes
    (its score is a cap), gets the largest rise of the others."""
    s = torch.as_tensor(scores).detach().double().cpu()
    if s.numel() < 2:
        return torch.zeros_like(s)
    order = torch.argsort(s, stable=True)
    ranked = s[order]
    rise = torch.cummax(torch.diff(ranked, prepend=ranked.new_zeros(1)).clamp_min(0.0), 0).values
    rise[-1] = rise[-2]
    out = torch.empty_like(s)
    out[order] = rise
    return out
#: how scores are made comparable across blocks (:meth:`UnitScores.shares`)
NORMALISE = ("model", "block")


@dataclass
class UnitScores:
    """Per block, scores (higher = keep) of FFN neurons ``[F]``, heads ``[H]`` and head
    dimensions ``[d]`` (summed over heads); units never removed (``protect_*``)."""

    ffn: dict[int, Tensor]
    heads: dict[int, Tensor] = field(default_factory=dict)
    dims: dict[int, Tensor] = field(default_factory=dict)
    protect_ffn: dict[int, list[int]] = field(default_factory=dict)
    protect_heads: dict[int, list[int]] = field(default_factory=dict)

    def shares(self, normalise: str = "model") -> dict[str, dict[int, Tensor]]:
        """The score-loss estimate of removing each unit: each type's scores clamped at 0, over
        their sum across the model (``model``), or over their block's sum and the number of
        blocks (``block``: every block's units of a type weigh alike in total); a uniform share
        where all are 0."""
        if normalise not in NORMALISE:
            raise InvalidArgumentError(f"normalise: {normalise!r}; choose one of {', '.join(NORMALISE)}")
        out = {}
        for name, per in (("ffn", self.ffn), ("heads", self.heads), ("head_dims", self.dims)):
            clean = {b: torch.as_tensor(s).detach().double().cpu().clamp_min(0) for b, s in per.items()}
            groups = [clean] if normalise == "model" else [{b: v} for b, v in clean.items()]
            out[name] = {}
            for g in groups:
                total = sum(float(v.sum()) for v in g.values())
                count = sum(v.numel() for v in g.values())
                share = 1.0 / len(groups)
                out[name].update({b: share * (v / total if total > 0 else torch.full_like(v, 1.0 / max(count, 1)))
                                  for b, v in g.items()})
        return out


@dataclass
class Allocation:
    """A geometry per block, what it costs and the score it removes (``split`` names how)."""

    split: str
    geometry: dict[int, Geometry]
    cost: float
    removed: float = 0.0
    #: uniform: the FFN ratio found and the attention shares; score: the attention weight
    params: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The split per block as ``metrics.json`` stores it."""
        return {"split": self.split, **self.params, "predicted": self.cost, "removed_score": self.removed,
                "blocks": {str(b): {"ffn": g[0], "heads": g[1], "head_dim": g[2]} for b, g in self.geometry.items()}}


def _order(s: Tensor, protect: Sequence[int] = ()) -> list[int]:
    """Removal order: lowest score first (stable, as the pruning functions), protected never."""
    p = set(protect)
    return [i for i in torch.sort(torch.as_tensor(s).float(), stable=True).indices.tolist() if i not in p]


def removed_score(scores: UnitScores, geometry: Mapping[int, Geometry], dense: Mapping[int, Geometry],
                  attention_weight: float = 1.0, normalise: str = "model") -> float:
    """The score-loss estimate of a geometry: the shares of the lowest-scoring units it removes
    (FFN neurons, heads scaled by the dimensions kept, dimensions by the heads kept; attention
    losses times ``attention_weight``) — what :func:`score_split` minimises."""
    sh = scores.shares(normalise)
    total = 0.0
    for b, (f, h, d) in geometry.items():
        F, H, D = dense[b]
        if b in sh["ffn"] and f < F:
            total += float(sh["ffn"][b][_order(scores.ffn[b], scores.protect_ffn.get(b, []))[:F - f]].sum())
        if b in sh["heads"] and h < H:
            total += attention_weight * (d / D) * float(
                sh["heads"][b][_order(scores.heads[b], scores.protect_heads.get(b, []))[:H - h]].sum())
        if b in sh["head_dims"] and d < D:
            total += attention_weight * (h / H) * float(sh["head_dims"][b][_order(scores.dims[b])[:D - d]].sum())
    return total


def _floor_ffn(width: int, protected: int, round_to: int | None) -> int:
    r = round_to or 1
    return max(r, math.ceil(max(1, protected) / r) * r) if width >= r else width


def _next_ffn(f: int, round_to: int | None) -> int:
    """The next narrower FFN width: one neuron less, or the next lower multiple of ``round_to``."""
    if not round_to:
        return f - 1
    return (f - 1) // round_to * round_to


def score_split(costs: BlockCosts, scores: UnitScores, dense: Mapping[int, Geometry], limit: float, *,
                units: Sequence[str] = UNITS, attention_weight: float = 1.0, normalise: str = "model",
                round_to: int | None = None, key: str = "budget") -> Allocation:
    """The geometry whose cost is at most ``limit``, removing units greedily by least score-loss
    per cost saved (see the module docstring).

    Args:
        costs: the cost model (``block(b, geometry)``, ``total(geometry)``).
        dense: block -> dense geometry (blocks not in ``dense`` are not pruned).
        limit: the cost to reach (MACs / parameters as counts, or milliseconds).
        units: which unit types may be removed.
        attention_weight: the loss of the attention units relative to the FFN neurons'.
        normalise: ``model`` or ``block`` (:meth:`UnitScores.shares`).

    Raises:
        BudgetError: ``limit`` not reached with every block at its floor (names ``key``).
        InvalidArgumentError: an unknown unit type or a negative ``attention_weight``.
    """
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise InvalidArgumentError(f"{key}.units: {bad or units} — choose from {', '.join(UNITS)}")
    if not attention_weight >= 0:
        raise InvalidArgumentError(f"{key}.weights: {attention_weight!r} must be ≥ 0")
    sh = scores.shares(normalise)
    geo = {b: tuple(g) for b, g in dense.items()}
    orders = {b: {"ffn": _order(scores.ffn[b], scores.protect_ffn.get(b, [])) if "ffn" in units else [],
                  "heads": _order(scores.heads[b], scores.protect_heads.get(b, [])) if "heads" in units else [],
                  "head_dims": _order(scores.dims[b]) if "head_dims" in units else []} for b in geo}
    floors = {b: _floor_ffn(dense[b][0], len(scores.protect_ffn.get(b, [])), round_to) for b in geo}
    cost = costs.total(geo)
    removed = 0.0
    version = {b: 0 for b in geo}
    heap: list[tuple[float, int, int, str, Geometry, float]] = []

    def offers(b: int) -> None:
        f, h, d = geo[b]
        F, H, D = dense[b]
        here = costs.block(b, geo[b])
        out: list[tuple[str, Geometry, float]] = []
        o = orders[b]
        nf = _next_ffn(f, round_to)
        if o["ffn"] and nf >= floors[b] and F - nf <= len(o["ffn"]):
            out.append(("ffn", (nf, h, d), float(sh["ffn"][b][o["ffn"][F - f:F - nf]].sum())))
        if o["heads"] and h > 1 and H - h < len(o["heads"]):
            out.append(("heads", (f, h - 1, d), attention_weight * (d / D) * float(sh["heads"][b][o["heads"][H - h]])))
        if o["head_dims"] and d > 1:
            out.append(("head_dims", (f, h, d - 1),
                        attention_weight * (h / H) * float(sh["head_dims"][b][o["head_dims"][D - d]])))
        for unit, g, loss in out:
            saved = here - costs.block(b, g)
            rate = loss / saved if saved > 0 else math.inf
            heapq.heappush(heap, (rate, b, version[b], unit, g, loss))

    for b in geo:
        offers(b)
    while cost > limit:
        while heap and heap[0][2] != version[heap[0][1]]:
            heapq.heappop(heap)
        if not heap:
            raise BudgetError(f"{key}: {limit:g} cannot be met: every block at its floor (one head, one head "
                              f"dimension, {round_to or 1} FFN neuron(s)) costs {cost:g}")
        _, b, _, _, g, loss = heapq.heappop(heap)
        cost += costs.block(b, g) - costs.block(b, geo[b])
        removed += loss
        geo[b] = g
        version[b] += 1
        offers(b)
    return Allocation("score", dict(geo), costs.total(geo), removed,
                      {"units": list(units), "attention_weight": attention_weight, "normalise": normalise})


def uniform_split(costs: BlockCosts, dense: Mapping[int, Geometry], limit: float, *, heads: float = 0.0,
                  head_dims: float = 0.0, step: float = 0.01, round_to: int | None = None,
                  key: str = "budget") -> Allocation:
    """The attention share fixed (``heads``, ``head_dims`` of every block, as
    :func:`~jas_prune.pruning.attention.prune_attention` removes them), the smallest uniform FFN
    ratio on :func:`~jas_prune.pruning.budget.ratio_grid` meeting ``limit``.

    Raises:
        BudgetError: not met even at the deepest uniform FFN cut with that attention share.
    """
    from .budget import bisect_first, ratio_grid
    from .prune import uniform_widths

    widths = {b: g[0] for b, g in dense.items()}

    def attn(g: Geometry) -> tuple[int, int]:
        H, D = g[1], g[2]
        return H - min(H - 1, round(H * heads)), D - min(D - 1, round(D * head_dims))

    def geometry(ratio: float) -> dict[int, Geometry]:
        w = uniform_widths(widths, ratio, round_to) if ratio > 0 else widths
        return {b: (w[b], *attn(g)) for b, g in dense.items()}

    grid = [0.0] + ratio_grid(widths, step)
    found = bisect_first(len(grid), lambda i: costs.total(geometry(grid[i])) <= limit)
    if found is None:
        raise BudgetError(f"{key}: {limit:g} cannot be met with heads {heads:g} and head_dims {head_dims:g} "
                          f"removed: the deepest uniform FFN cut costs {costs.total(geometry(grid[-1])):g}")
    geo = geometry(grid[found])
    return Allocation("uniform", geo, costs.total(geo), 0.0,
                      {"ffn_ratio": grid[found], "heads": heads, "head_dims": head_dims})


def floor_geometry(dense: Mapping[int, Geometry], units: Sequence[str], round_to: int | None = None,
                   protect_ffn: Mapping[int, Sequence[int]] | None = None) -> dict[int, Geometry]:
    """The deepest geometry a split over ``units`` can reach: one neuron (``round_to``, the
    protected ones) per block, one head, one dimension per head."""
    protect_ffn = protect_ffn or {}
    return {b: (_floor_ffn(f, len(protect_ffn.get(b, [])), round_to) if "ffn" in units else f,
                1 if "heads" in units else h, 1 if "head_dims" in units else d) for b, (f, h, d) in dense.items()}


def check_split_reachable(model: Any, budget: Any, *, round_to: int | None = None,
                          head_classes: Sequence[int | str] | None = None, class_names: Sequence[str] | None = None,
                          key: str = "budget") -> None:
    """Refuse, before any work, a split budget (:attr:`~jas_prune.pruning.budget.Budget.joint`)
    on a model whose attention cannot be pruned, or a MACs / params target that even the deepest
    geometry of its units misses (a latency target is only known once measured).

    Raises:
        UnsupportedModelError: a family other than timm ViT (the cost table is timm's).
        BudgetError: the target out of reach, naming ``<key>.<target>``.
    """
    from ..errors import UnsupportedModelError
    from .attention import AttentionSettings, check_attention
    from .costs import COST_FAMILIES, CostTable, dense_geometry
    from .graph import find_vit

    family = find_vit(model)[1].family
    if family not in COST_FAMILIES:  # the cost table follows timm's blocks and Torch-Pruning's counter
        raise UnsupportedModelError(f"{key}: a budget split over units is made for {', '.join(COST_FAMILIES)} "
                                    f"only, not {family}; leave {key}.units and {key}.split out")
    if set(budget.units) - {"ffn"}:  # e.g. head dimensions with query/key norms
        check_attention(model, AttentionSettings.model_construct(heads=0.5 if "heads" in budget.units else 0.0,
                                                                 head_dims=0.5 if "head_dims" in budget.units else 0.0))
    if budget.target == "latency_ms":
        return
    table = CostTable.from_model(model, budget.target, head_classes=head_classes, class_names=class_names)
    floor = table.total(floor_geometry(dense_geometry(model), budget.units, round_to)) / table.dense
    if floor > budget.value:
        raise BudgetError(f"{key}.{budget.target}: {budget.value:g} cannot be met: the deepest cut of "
                          f"{', '.join(budget.units)} leaves {floor:.3f} of the dense model's "
                          f"{'MACs' if budget.target == 'macs' else 'parameters'}; raise {key}.{budget.target}")
