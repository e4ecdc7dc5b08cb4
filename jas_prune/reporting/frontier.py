"""Speed/accuracy frontier of a run's deployable files: every exported model in every precision
(float32, INT8, float16) as one point of ONNX Runtime latency against test-partition top-1
through ONNX Runtime, the Pareto front marked, and the best file for each latency budget.

A point is on the front when no other file is both at least as fast and at least as accurate
(and better in one). The budget table walks the front from the fastest file: for a budget of at
least that file's latency, it is the most accurate file that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..metrics import Metrics
from .format import pct, table

__all__ = ["FrontierPoint", "frontier_points", "pareto_front", "frontier_figure", "frontier_section"]


@dataclass(frozen=True)
class FrontierPoint:
    """One file: model label, precision, p50 latency (ms per batch) and test top-1."""

    model: str
    precision: str
    ms: float
    top1: float
    size_bytes: int | None = None

    @property
    def label(self) -> str:
        return self.model if self.precision == "fp32" else f"{self.model} {self.precision}"


def _batches(metrics: Metrics) -> list[int]:
    return sorted({x.batch_size for r in metrics.export or [] for x in r.latency if x.latency_ms_p50})


def frontier_points(metrics: Metrics, batch_size: int) -> list[FrontierPoint]:
    """Every exported file with a test top-1 and a latency at ``batch_size``."""
    out = []
    for r in metrics.export or []:
        if not r.ok:
            continue
        lat = r.latency_at(batch_size)
        if r.test_top1 is not None and lat is not None and lat.latency_ms_p50:
            size = (r.onnx_file or {}).get("bytes")
            out.append(FrontierPoint(r.model, "fp32", float(lat.latency_ms_p50), float(r.test_top1), size))
        for p in r.precisions or []:
            plat = p.latency_at(batch_size)
            if p.ok and p.test_top1 is not None and plat is not None and plat.latency_ms_p50:
                out.append(FrontierPoint(r.model, p.precision, float(plat.latency_ms_p50), float(p.test_top1),
                                         p.size_bytes))
    return out


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point beats on both latency and top-1, fastest first."""
    front: list[FrontierPoint] = []
    for p in sorted(points, key=lambda q: (q.ms, -q.top1)):
        if not front or p.top1 > front[-1].top1:
            front.append(p)
    return front


def frontier_figure(path: str | Path, metrics: Metrics) -> Path | None:
    """Latency (x, log scale) against test top-1 (y), one panel per shown batch size."""
    from .plots import new_figure, save_figure

    batches = _batches(metrics)
    shown = sorted({batches[0], batches[-1]}) if batches else []
    panels = [(b, frontier_points(metrics, b)) for b in shown]
    panels = [(b, pts) for b, pts in panels if len(pts) >= 2]
    if not panels:
        return None
    markers = {"fp32": "o", "int8_static": "s", "int8_dynamic": "D", "fp16": "^"}
    models = sorted({p.model for _, pts in panels for p in pts})
    colour = {m: f"C{k % 10}" for k, m in enumerate(models)}
    fig = new_figure(5.2 * len(panels) + 2.4, 4.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (b, pts) in zip(axes, panels):
        for p in pts:
            ax.scatter(p.ms, 100 * p.top1, marker=markers.get(p.precision, "x"), s=55, facecolors="none",
                       edgecolors=colour[p.model], linewidths=1.5, zorder=3)
        front = pareto_front(pts)
        ax.step([p.ms for p in front], [100 * p.top1 for p in front], where="post", color="black", lw=1.2,
                alpha=0.7, zorder=2)
        ax.scatter([p.ms for p in front], [100 * p.top1 for p in front], s=12, color="black", zorder=4)
        ax.set_xscale("log")
        from matplotlib.ticker import FormatStrFormatter

        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(f"ONNX Runtime p50 latency (ms per batch of {b}, log scale)")
        ax.set_ylabel("test top-1 through ONNX Runtime (%)")
        ax.set_title(f"batch size {b}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", mfc="none", mec=colour[m], label=m) for m in models]
    handles += [Line2D([], [], ls="none", marker=mk, mfc="none", mec="grey", label=p) for p, mk in markers.items()
                if any(q.precision == p for _, pts in panels for q in pts)]
    handles.append(Line2D([], [], color="black", lw=1.2, label="Pareto front"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7)
    fig.suptitle("Deployment frontier: every model × precision (upper left is better)", fontsize=11)
    return save_figure(fig, path)


def frontier_section(metrics: Metrics) -> list[str]:
    """Per precision the test top-1 of every model, then the best file per latency budget."""
    records = [r for r in metrics.export or [] if r.ok and r.test_top1 is not None]
    if not records:
        return []
    precisions = ["fp32"] + sorted({p.precision for r in records for p in r.precisions or []})
    rows = []
    for r in records:
        by = {p.precision: p for p in r.precisions or []}
        cells = [r.model, pct(r.test_top1)]
        for name in precisions[1:]:
            p = by.get(name)
            if p is None:
                cells.append("—")
            elif p.error:
                cells.append("failed")
            elif p.test_top1 is None:
                cells.append("untested")
            else:
                cells.append(f"{pct(p.test_top1)} (agree {pct(p.top1_agreement)})")
        rows.append(cells)
    out = ["## Precisions", "",
           "Test top-1 through ONNX Runtime (CPU) of every exported file; agree = top-1 agreement with the same "
           "model's float32 file on the test partition.", "",
           *table(["model", *precisions], rows, "---|" + "|".join(["---:"] * len(precisions)))]
    floats = sorted({", ".join(p.float_ops or []) for r in records for p in r.precisions or []
                     if p.precision == "int8_static" and p.ok})
    if floats:
        out += ["INT8 static kept in float (chosen on the probe partition): " + "; ".join(f"[{f}]" for f in floats)
                + ".", ""]
    batches = _batches(metrics)
    for b in sorted({batches[0], batches[-1]}) if batches else []:
        front = pareto_front(frontier_points(metrics, b))
        if not front:
            continue
        rows = [[f"≥ {p.ms:.3f}", p.label, pct(p.top1), f"{p.ms:.3f}",
                 f"{p.size_bytes / 1e6:.2f}" if p.size_bytes else "—"] for p in front]
        out += [f"### Best file per latency budget (batch {b})", "",
                "For a budget of at least the first column (ms per batch), the most accurate file that fits; every "
                "other file is slower or less accurate than one of these (Pareto front).", "",
                *table(["budget ms", "file", "test top-1", "p50 ms", "MB"], rows, "---:|---|---:|---:|---:")]
    return out
