"""Budgets: the smallest uniform FFN removal ratio whose pruned model meets a target.

A :class:`Budget` is one target: at most a fraction of the dense model's MACs or parameters, or
at most a p50 latency in ONNX Runtime at a batch size. :func:`find_ratio` searches the ratios
``step, 2·step, …`` (plus the ratio that keeps one neuron per block, the most a uniform cut can
remove) by bisection for the smallest one whose pruned model meets it: the least pruning, hence
the most accuracy kept, under the target. Under a uniform allocation the kept widths depend only
on the ratio (and ``round_to``), not on the criterion's scores, so the search prunes a copy of the
model with neutral scores and the ratio found holds for every criterion. A measurement is taken
once per distinct set of widths (ratios that round to the same widths share it).

MACs and parameters are counted by :func:`jas_prune.evaluate.count_params_macs` (Torch-Pruning's
counter, as ``metrics.json`` ``dense`` and ``pruned`` record them): exact and monotone in the
ratio. Latency is measured: each candidate is exported to ONNX in a temporary directory and timed
by :func:`jas_prune.deploy.latency.benchmark_onnx`, so the ratio found is minimal only to within
the timing noise of the machine (the result records every measurement).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import BudgetError, InvalidArgumentError
from .graph import find_vit
from .prune import check_round_to, prune_ffn, uniform_widths

__all__ = ["TARGETS", "Budget", "BudgetResult", "ratio_grid", "bisect_first", "find_ratio", "check_reachable",
           "describe_record"]

#: what a budget bounds: a fraction of the dense MACs or parameters, or the p50 in milliseconds
TARGETS = ("macs", "params", "latency_ms")


@dataclass(frozen=True)
class Budget:
    """One target: ``value`` is a fraction in (0, 1] of the dense model's ``macs`` / ``params``,
    or milliseconds (p50 in ONNX Runtime at ``batch_size`` with ``threads`` intra-op threads) for
    ``latency_ms``. Ratios are searched on multiples of ``step``.

    Raises:
        InvalidArgumentError: an unknown target or a value out of range (naming it).
    """

    target: str
    value: float
    batch_size: int | None = None
    step: float = 0.01
    threads: int | None = None
    #: what the budget spends over (:data:`~jas_prune.pruning.allocate.UNITS`); ``("ffn",)`` with
    #: no ``split``: the uniform FFN ratio of :func:`find_ratio`
    units: tuple[str, ...] = ("ffn",)
    #: the candidate splits (:mod:`jas_prune.pruning.allocate`); empty: :func:`find_ratio`
    split: tuple[str, ...] = ()
    #: uniform split: the attention shares removed (candidates)
    shares: tuple[float, ...] = ()
    #: score split: the attention weights (candidates)
    weights: tuple[float, ...] = ()
    #: score split: ``block`` or ``model`` (:meth:`~jas_prune.pruning.allocate.UnitScores.shares`)
    normalise: str = "block"
    #: latency split: grid points per width axis of the measured table
    points: int = 5
    #: query/key logit compensation of the head dimensions a split removes (``none``: not tried)
    logits: str = "none"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidArgumentError(f"budget: unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InvalidArgumentError(f"budget.{self.target}: expected a finite number > 0, got {v!r}")
        if self.target != "latency_ms" and v > 1:
            raise InvalidArgumentError(f"budget.{self.target}: {v} is a fraction of the dense model's; "
                                       "expected (0, 1]")
        if not 0 < self.step < 1:
            raise InvalidArgumentError(f"budget.step: {self.step!r} is outside (0, 1)")
        if self.target == "latency_ms" and self.batch_size is None:
            object.__setattr__(self, "batch_size", 1)
        if self.target != "latency_ms" and self.batch_size is not None:
            raise InvalidArgumentError("budget.batch_size: only with latency_ms")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidArgumentError(f"budget.batch_size: must be ≥ 1, got {self.batch_size}")

    @classmethod
    def from_section(cls, section: Any) -> "Budget":
        """From the recipe's ``prune.budget`` section (its split keys too, when it has them)."""
        if callable(getattr(section, "budget", None)):
            return section.budget()
        target = section.target
        return cls(target=target, value=float(getattr(section, target)), batch_size=section.batch_size,
                   step=float(section.step))

    @property
    def joint(self) -> bool:
        """Whether the budget is split by :mod:`jas_prune.pruning.allocate` (per criterion, over
        the units listed) rather than met by :func:`find_ratio`'s uniform FFN ratio."""
        return bool(self.split) or tuple(self.units) != ("ffn",)

    def spec(self) -> dict[str, Any]:
        """What identifies the budget (an entry made for another spec is not reused on resume)."""
        out: dict[str, Any] = {"target": self.target, "value": self.value, "step": self.step}
        if self.target == "latency_ms":
            out["batch_size"] = self.batch_size
        if self.joint:
            out.update(units=list(self.units), split=list(self.split), shares=list(self.shares),
                       weights=list(self.weights), normalise=self.normalise)
            if self.target == "latency_ms":
                out["points"] = self.points
            if self.logits != "none":  # only when set: entries made before the key still resume
                out["logits"] = self.logits
        return out

    def suffix(self) -> str:
        """A checkpoint-name suffix: ``macs60``, ``params45``, ``lat12p5ms-bs8`` (``-split`` when
        the budget is split over units)."""
        end = "-split" if self.joint else ""
        if self.target == "latency_ms":
            return f"lat{_number(self.value)}ms-bs{self.batch_size}{end}"
        return f"{self.target}{_number(self.value * 100)}{end}"


def _number(v: float) -> str:
    """A number for a file name: ``60``, ``12p5`` (no dots: a stem's dot would read as a suffix)."""
    return f"{round(v, 3):g}".replace(".", "p")


@dataclass
class BudgetResult:
    """What :func:`find_ratio` found.

    ``achieved`` is the fraction of the dense MACs/params (``dense`` is the dense count), or the
    p50 in ms (``dense`` None); ``measured`` lists (ratio, value) in the order measured;
    ``latency`` the benchmark record of the chosen model (latency targets only).
    """

    budget: Budget
    ratio: float
    achieved: float
    widths: dict[int, int]
    round_to: int | None
    dense: float | None = None
    measured: list[tuple[float, float]] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    #: distinct models pruned and measured (ratios with the same widths share one)
    models: int = 0

    def record(self) -> dict[str, Any]:
        """The ``budget`` field of a ``metrics.json`` pruned entry: the spec, ``ratio``,
        ``achieved``, ``models_measured`` (and for latency the provider, threads, p90, iters)."""
        out = {**self.budget.spec(), "ratio": self.ratio, "achieved": self.achieved, "models_measured": self.models}
        if self.latency is not None:
            out.update(provider=self.latency.get("provider"), threads=self.latency.get("threads"),
                       latency_ms_p90=self.latency.get("latency_ms_p90"), iters=self.latency.get("iters"))
        return out

    def describe(self) -> str:
        """``MACs ≤ 60 % of dense: ratio 0.42 gives 59.1 %`` (for the log)."""
        return describe_record(self.record())


def describe_record(rec: dict[str, Any]) -> str:
    """A budget record (:meth:`BudgetResult.record`) in words, e.g.
    ``MACs ≤ 60 % of dense: ratio 0.42 gives 59.1 %``."""
    target, value = rec["target"], rec["value"]
    if target == "latency_ms":
        return (f"p50 ≤ {value:g} ms at batch {rec.get('batch_size', 1)}: ratio {rec['ratio']:g} gives "
                f"{rec['achieved']:.2f} ms")
    name = "MACs" if target == "macs" else "params"
    return f"{name} ≤ {value * 100:g} % of dense: ratio {rec['ratio']:g} gives {rec['achieved'] * 100:.1f} %"


def ratio_grid(widths: dict[int, int] | Sequence[int], step: float) -> list[float]:
    """The candidate ratios: ``step, 2·step, …`` below 1, then the ratio that leaves one neuron
    in every block (the most a uniform cut removes) when the grid stops short of it."""
    ns = list(widths.values()) if isinstance(widths, dict) else list(widths)
    grid = [round(i * step, 10) for i in range(1, math.ceil(1 / step)) if round(i * step, 10) < 1]
    n_max = max(ns)
    last = (n_max - 1) / n_max if n_max > 1 else grid[-1]
    if not grid or last > grid[-1]:
        grid.append(last)
    return grid


def bisect_first(n: int, meets: Callable[[int], bool]) -> int | None:
    """The smallest i in [0, n) with ``meets(i)``, for a ``meets`` that is monotone (False ... True);
    None when even ``n - 1`` fails. Calls ``meets`` on the last index first, then the first, then
    bisects (so a generous budget costs two evaluations)."""
    if n == 0 or not meets(n - 1):
        return None
    if meets(0):
        return 0
    lo, hi = 0, n - 1  # meets(lo) False, meets(hi) True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def find_ratio(model: nn.Module, budget: Budget, *, round_to: int | None = None,
               head_classes: Sequence[int | str] | None = None, class_names: Sequence[str] | None = None,
               example_inputs: torch.Tensor | None = None, key: str = "budget",
               latency: Callable[[nn.Module], dict[str, Any]] | None = None) -> BudgetResult:
    """The smallest ratio of :func:`ratio_grid` whose uniform cut of ``model`` meets ``budget``.

    Args:
        model: the dense ViT (not modified: candidates are pruned copies).
        round_to: kept widths a multiple of this, as :func:`~jas_prune.pruning.prune.prune_ffn`.
        head_classes, class_names: the head cut the pruned models will have (it counts in MACs,
            parameters and latency).
        key: the budget's name in messages (the recipe's ``prune.budget``).
        latency: model -> a latency record with ``latency_ms_p50``; needed by a latency budget
            (e.g. :func:`jas_prune.deploy.onnx_latency` at the budget's batch size and threads:
            pruning sits below deployment and does not export models itself).

    Raises:
        BudgetError: the budget cannot be met, even keeping only one neuron (``round_to``
            neurons) per block; the message names ``<key>.<target>``.
        PruneSettingError: ``round_to`` above a block's width.
    """
    round_to = check_round_to(round_to)
    _, info = find_vit(model)
    widths = {l.index: l.hidden for l in info.layers}
    uniform_widths(widths, budget.step, round_to)  # round_to wider than a block: refused before any work
    grid = ratio_grid(widths, budget.step)
    from ..evaluate import count_params_macs
    from ..models import input_size

    size = input_size(model)
    dense = None
    if budget.target != "latency_ms":
        dense = float(count_params_macs(model, size)[budget.target])
    if budget.target == "latency_ms" and latency is None:
        raise InvalidArgumentError(f"{key}.latency_ms: find_ratio needs latency=, a function model -> latency "
                                   "record (jas_prune.deploy.onnx_latency)")
    neutral = {b: torch.zeros(n) for b, n in widths.items()}
    cache: dict[tuple[int, ...], tuple[float, dict[str, Any] | None]] = {}
    measured: list[tuple[float, float]] = []

    def value(i: int) -> float:
        ratio = grid[i]
        sig = tuple(uniform_widths(widths, ratio, round_to).values())
        if sig not in cache:
            pruned = copy.deepcopy(model)
            prune_ffn(pruned, neutral, ratio=ratio, round_to=round_to, example_inputs=example_inputs,
                      head_classes=head_classes, class_names=class_names)
            if budget.target == "latency_ms":
                rec = latency(pruned)
                cache[sig] = (float(rec["latency_ms_p50"]), rec)
            else:
                cache[sig] = (count_params_macs(pruned, size)[budget.target] / dense, None)
            del pruned
        v = cache[sig][0]
        measured.append((ratio, v))
        return v

    found = bisect_first(len(grid), lambda i: value(i) <= budget.value)
    if found is None:
        raise _unreachable(budget, measured[-1][1], round_to, key)
    ratio = grid[found]
    w = uniform_widths(widths, ratio, round_to)
    achieved, rec = cache[tuple(w.values())]
    return BudgetResult(budget=budget, ratio=ratio, achieved=achieved, widths=w, round_to=round_to, dense=dense,
                        measured=measured, latency=rec, models=len(cache))


def _unreachable(budget: Budget, floor: float, round_to: int | None, key: str) -> BudgetError:
    keep = "one FFN neuron" if round_to is None else f"{round_to} FFN neurons"
    what = (f"takes {floor:.3g} ms p50 at batch {budget.batch_size} in ONNX Runtime"
            if budget.target == "latency_ms" else
            f"leaves {floor:.3f} of the dense model's {'MACs' if budget.target == 'macs' else 'parameters'}")
    return BudgetError(f"{key}.{budget.target}: {budget.value:g} cannot be met: keeping {keep} per block "
                       f"{what}; raise {key}.{budget.target}")


def check_reachable(model: nn.Module, budget: Budget, *, round_to: int | None = None,
                    head_classes: Sequence[int | str] | None = None, class_names: Sequence[str] | None = None,
                    example_inputs: torch.Tensor | None = None, key: str = "budget") -> None:
    """Refuse, before any search, a MACs or params budget that even the deepest uniform cut
    misses (one model pruned and counted; a latency budget is only known once measured, by
    :func:`find_ratio`).

    Raises:
        BudgetError: as :func:`find_ratio` (the same message).
        PruneSettingError: ``round_to`` above a block's width.
    """
    round_to = check_round_to(round_to)
    if budget.target == "latency_ms":
        return
    from ..evaluate import count_params_macs
    from ..models import input_size

    _, info = find_vit(model)
    widths = {l.index: l.hidden for l in info.layers}
    ratio = ratio_grid(widths, budget.step)[-1]
    pruned = copy.deepcopy(model)
    prune_ffn(pruned, {b: torch.zeros(n) for b, n in widths.items()}, ratio=ratio, round_to=round_to,
              example_inputs=example_inputs, head_classes=head_classes, class_names=class_names)
    size = input_size(model)
    floor = count_params_macs(pruned, size)[budget.target] / count_params_macs(model, size)[budget.target]
    if floor > budget.value:
        raise _unreachable(budget, floor, round_to, key)
