"""Latency in the report: exported models grouped by shape, speed-ups with their spread, and
plain sentences on what the measurements can and cannot tell apart.

Models whose FFN widths (and head) are identical run the same operations: any latency
difference between them is measurement noise, so they form one *shape group* with one
speed-up, and the report never tells them apart by latency. A speed-up's spread is the bootstrap
interval of an interleaved benchmark (``deploy.latency.benchmark_many``) when the run has one,
else the range over the group's models; a model timed alone has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..metrics import ExportRecord, Metrics, PrunedEntry

__all__ = ["ShapeGroup", "Speedup", "shape_groups", "speedups", "latency_notes"]


@dataclass
class ShapeGroup:
    """Exported models of identical shape (the dense model is a group of its own)."""

    name: str
    records: list[ExportRecord]
    entries: list[PrunedEntry | None] = field(default_factory=list)

    @property
    def dense(self) -> bool:
        return self.name == "dense"

    @property
    def labels(self) -> list[str]:
        return [r.model for r in self.records]

    def p50(self, batch_size: int) -> tuple[float, float, float] | None:
        """(median, low, high) p50 ms over the group's models at ``batch_size``; low/high is the
        models' median p25 and p75 (interleaved benchmarks record them), else the range of their
        p50s."""
        lats = [lat for r in self.records if (lat := r.latency_at(batch_size)) and lat.latency_ms_p50]
        if not lats:
            return None
        p50 = [float(lat.latency_ms_p50) for lat in lats]  # type: ignore[arg-type]
        lo = [lat.latency_ms_p25 for lat in lats if lat.latency_ms_p25 is not None]
        hi = [lat.latency_ms_p75 for lat in lats if lat.latency_ms_p75 is not None]
        if lo and hi:
            return float(np.median(p50)), float(np.median(lo)), float(np.median(hi))
        low, high = min(p50), max(p50)
        return float(np.median(p50)), low, high

    def p50_range(self, batch_size: int) -> tuple[float, float] | None:
        """(lowest, highest) p50 ms of the group's models at ``batch_size``."""
        p50 = [float(lat.latency_ms_p50) for r in self.records
               if (lat := r.latency_at(batch_size)) and lat.latency_ms_p50]
        return (min(p50), max(p50)) if p50 else None


@dataclass
class Speedup:
    """A shape group's speed-up over the dense model at one batch size.

    Attributes:
        low, high: the spread (None when none was measured).
        spread: ``"ci"`` (bootstrap interval of interleaved timings; for several models the
            median of their bounds), ``"range"`` (min–max over the group's models timed one after
            another) or None.
    """

    value: float
    batch_size: int
    provider: str | None
    group: str
    members: int
    low: float | None = None
    high: float | None = None
    spread: str | None = None
    confidence: float | None = None

    def text(self) -> str:
        """``1.33× (1.29–1.38, b=32)``, or ``1.33× (b=32)`` without a spread."""
        spread = f"{self.low:.2f}–{self.high:.2f}, " if self.low is not None and self.high is not None else ""
        return f"{self.value:.2f}× ({spread}b={self.batch_size})"

    def overlaps(self, other: "Speedup") -> bool:
        """Whether the two intervals (a value without spread is a point) overlap."""
        lo, hi = self.interval()
        olo, ohi = other.interval()
        return lo <= ohi and olo <= hi

    def interval(self) -> tuple[float, float]:
        return (self.low if self.low is not None else self.value, self.high if self.high is not None else self.value)


def _shape_key(rec: ExportRecord, entry: PrunedEntry | None) -> tuple:
    if rec.checkpoint is None:
        return ("dense",)
    sig = entry.width_signature() if entry is not None else None
    if sig is None:  # shape unknown: a group of its own
        return ("model", rec.model)
    outputs = len(entry.classes) if entry.head == "cut" and entry.classes is not None else None  # type: ignore
    return ("shape", sig, outputs)


def shape_groups(metrics: Metrics) -> list[ShapeGroup]:
    """The successfully exported models by shape: ``dense`` first, then ``A``, ``B``, ... in
    the order of their first model."""
    by_ckpt = metrics.pruned_by_checkpoint()
    groups: dict[tuple, ShapeGroup] = {}
    for rec in metrics.export or []:
        if not rec.ok:
            continue
        entry = by_ckpt.get(rec.checkpoint) if rec.checkpoint is not None else None
        key = _shape_key(rec, entry)
        if key not in groups:
            i = sum(k != ("dense",) for k in groups)
            name = "dense" if key == ("dense",) else chr(ord("A") + i % 26) + (str(i // 26 + 1) if i >= 26 else "")
            groups[key] = ShapeGroup(name, [])
        groups[key].records.append(rec)
        groups[key].entries.append(entry)
    return sorted(groups.values(), key=lambda g: not g.dense)


def _model_speedup(dense: ExportRecord, rec: ExportRecord, b: int) -> tuple[float, float | None, float | None] | None:
    lat, ref = rec.latency_at(b), dense.latency_at(b)
    if lat is None or ref is None:
        return None
    if lat.speedup is not None and lat.speedup.reference == dense.model:
        return lat.speedup.median, lat.speedup.low, lat.speedup.high
    if lat.latency_ms_p50 and ref.latency_ms_p50:
        return ref.latency_ms_p50 / lat.latency_ms_p50, None, None
    return None


def _group_speedup(dense: ExportRecord, group: ShapeGroup) -> Speedup | None:
    common = set.intersection(*({x.batch_size for x in r.latency if x.latency_ms_p50} for r in group.records),
                              {x.batch_size for x in dense.latency if x.latency_ms_p50})
    if not common:
        return None
    b = max(common)
    per = [s for r in group.records if (s := _model_speedup(dense, r, b)) is not None]
    if not per:
        return None
    values = [v for v, _, _ in per]
    provider = group.records[0].latency_at(b).provider  # type: ignore[union-attr]
    sp = Speedup(float(np.median(values)), b, provider, group.name, len(group.records))
    cis = [(lo, hi) for _, lo, hi in per if lo is not None and hi is not None]
    if cis:  # a typical model's interval: the median of their bounds (around the group's value)
        sp.low = min(sp.value, float(np.median([lo for lo, _ in cis])))
        sp.high = max(sp.value, float(np.median([hi for _, hi in cis])))
        sp.spread = "ci"
        sp.confidence = next((lat.speedup.confidence for r in group.records
                              if (lat := r.latency_at(b)) and lat.speedup is not None), None)
    elif len(values) > 1:
        sp.low, sp.high, sp.spread = min(values), max(values), "range"
    return sp


def speedups(metrics: Metrics) -> dict[str, Speedup]:
    """Checkpoint -> the speed-up of its shape group over dense, at the largest batch size timed
    for both (identical-shape models get the same value)."""
    groups = shape_groups(metrics)
    dense = next((g.records[0] for g in groups if g.dense), None)
    if dense is None:
        return {}
    out: dict[str, Speedup] = {}
    for g in groups:
        sp = None if g.dense else _group_speedup(dense, g)
        if sp is not None:
            out.update({r.checkpoint: sp for r in g.records if r.checkpoint is not None})
    return out


def _names(group: ShapeGroup) -> str:
    return ", ".join(f"`{label}`" for label in group.labels)


def latency_notes(groups: Sequence[ShapeGroup], speed: dict[str, Speedup]) -> list[str]:
    """Sentences on what the timings can tell apart: identical shapes, overlapping spreads."""
    by_group = {sp.group: sp for sp in speed.values()}
    notes = []
    for g in groups:
        if len(g.records) > 1:
            b = by_group[g.name].batch_size if g.name in by_group else None
            p50 = g.p50_range(b) if b is not None else None
            spread = f" (p50 {p50[0]:.3f}–{p50[1]:.3f} ms at b={b})" if p50 else ""
            notes.append(f"- Shape {g.name}: {len(g.records)} models with identical FFN widths ({_names(g)}) run the "
                         f"same operations; their latency differences{spread} are measurement noise, so they "
                         "share one speed-up and are not ranked by latency.")
    pruned = [by_group[g.name] for g in groups if g.name in by_group]
    for sp in pruned:
        lo, hi = sp.interval()
        if sp.spread is not None and lo <= 1.0 <= hi:
            notes.append(f"- Shape {sp.group}: the speed-up {sp.text()} is within the measurement spread of no "
                         "speed-up at all.")
    for i, a in enumerate(pruned):
        for b in pruned[i + 1:]:
            if a.batch_size == b.batch_size and (a.spread or b.spread) and a.overlaps(b):
                notes.append(f"- Shapes {a.group} and {b.group}: speed-ups {a.text()} and {b.text()} are within "
                             "the measurement spread of each other.")
    alone = [sp.group for sp in pruned if sp.spread is None]
    if alone:
        notes.append(f"- Shape{'s' if len(alone) > 1 else ''} {', '.join(alone)}: timed once, without repeats to "
                     "measure a spread; speed-ups a few per cent apart cannot be told apart.")
    if any(sp.spread == "range" for sp in pruned):
        notes.append("- A spread a–b without interval is the range over a group's identical-shape models timed one "
                     "after another (not interleaved).")
    ci = next((sp for sp in pruned if sp.spread == "ci"), None)
    if ci is not None:
        level = f"{100 * ci.confidence:.0f} % " if ci.confidence else ""
        notes.append(f"- Spreads are {level}bootstrap intervals of the median speed-up over repetitions that time "
                     "every model in turn (interleaved); for a shape of several models, the median of their bounds.")
    return notes
