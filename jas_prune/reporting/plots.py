"""Report figures drawn from numbers alone (``metrics.json``, the similarity matrix): pruning
trade-offs, the paper's CLS-mask protocol, Table 1, deployment latency and the semantic check.

Figures are matplotlib ``Figure`` objects drawn with the Agg canvas (no pyplot, no global
backend switch) and written atomically as PNG. Every ``*_figure`` function returns the written
path, or None when it has nothing to draw, so a report simply skips figures without data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..io import atomic_write
from ..metrics import InterventionRow, SemanticCheck
from .style import method_colour, method_label

__all__ = [
    "DPI",
    "Panel",
    "new_figure",
    "save_figure",
    "tradeoff_figure",
    "table1_figure",
    "LatencyPoint",
    "deployment_figure",
    "semantic_figure",
]

DPI = 150


def new_figure(width: float, height: float):
    """A matplotlib Figure with constrained layout, detached from pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, facecolor="white"))


@dataclass
class Panel:
    """One axes of a trade-off figure.

    Attributes:
        title: axes title.
        series: label -> list of (x, y, y_std or None), one line (or bar) per label.
        dense: reference y (drawn as a dotted line) and its std.
    """

    title: str
    series: dict[str, list[tuple[float, float, float | None]]]
    dense: float | None = None
    dense_std: float | None = None
    colours: dict[str, str] = field(default_factory=dict)
    #: label -> matplotlib line style (default solid)
    styles: dict[str, str] = field(default_factory=dict)


def _bars(ax, panel: Panel, ylabel: str, xlabel: str) -> None:
    labels = list(panel.series)
    ys = [panel.series[k][0][1] for k in labels]
    errs = [panel.series[k][0][2] for k in labels]
    has_err = any(e is not None for e in errs)
    pos = np.arange(len(labels))
    bars = ax.bar(pos, ys, color=[panel.colours.get(k, method_colour(k)) for k in labels], width=0.7,
                  yerr=[e or 0.0 for e in errs] if has_err else None, capsize=3)
    for b, y in zip(bars, ys):  # value inside the bar top, clear of the dense line
        inside = y > 12
        ax.annotate(f"{y:.1f}", (b.get_x() + b.get_width() / 2, y), xytext=(0, -3 if inside else 2),
                    textcoords="offset points", ha="center", va="top" if inside else "bottom", fontsize=7,
                    color="white" if inside else "black")
    ax.set_xticks(pos, [method_label(k) for k in labels], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel.format(x=panel.series[labels[0]][0][0]))
    ax.set_ylabel(ylabel)


def _lines(ax, panel: Panel, xlabel: str, ylabel: str) -> None:
    for label, pts in panel.series.items():
        pts = sorted(pts)
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        colour = panel.colours.get(label, method_colour(label))
        strong = label == "jas"
        ax.plot(x, y, marker="o", ms=4, lw=2.2 if strong else 1.3, color=colour, label=method_label(label),
                ls=panel.styles.get(label, "-"), zorder=3 if strong else 2)
        if any(p[2] is not None for p in pts):
            e = np.array([p[2] or 0.0 for p in pts])
            ax.fill_between(x, y - e, y + e, color=colour, alpha=0.15, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def tradeoff_figure(path: str | Path, panels: Sequence[Panel], *, title: str, xlabel: str, ylabel: str,
                    dense_label: str = "dense", bar_xlabel: str = "method (at {x:.0f} % removed)") -> Path | None:
    """Accuracy against a budget, one line per method per panel (bars when a panel has one budget).

    A shaded band (or error bar) is mean ± std when the series carry a std.
    """
    panels = [p for p in panels if p.series]
    if not panels:
        return None
    n = len(panels)
    fig = new_figure(min(5.2 * n, 15), 4.4)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    any_bars = False
    for ax, panel in zip(axes, panels):
        bars = len({p[0] for pts in panel.series.values() for p in pts}) == 1
        any_bars |= bars
        if bars:
            _bars(ax, panel, ylabel, bar_xlabel)
        else:
            _lines(ax, panel, xlabel, ylabel)
        if panel.dense is not None:
            text = f"{dense_label} {panel.dense:.1f}" + (f" ± {panel.dense_std:.1f}" if panel.dense_std else "")
            ax.axhline(panel.dense, color="black", ls=":", lw=1.3, label=text, zorder=1)
            if bars:  # bars leave no room for a legend: write on the line
                ax.annotate(text, (1.0, panel.dense), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                            textcoords="offset points", ha="right", va="bottom", fontsize=7)
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelleft=True)
        if not bars:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    if any_bars:  # bars start at zero
        axes[0].set_ylim(0, 109)
    else:
        lo = min(p[1] - (p[2] or 0) for panel in panels for pts in panel.series.values() for p in pts)
        axes[0].set_ylim(max(0.0, min([lo, *(p.dense for p in panels if p.dense is not None)]) - 5), 103)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


_T1 = (("removal_acc_dev", "removal\nΔacc (pp)"), ("removal_prob_dev_mean", "removal\nΔp mean (%)"),
       ("removal_prob_dev_median", "removal\nΔp median (%)"), ("enhancement_acc_dev", "enhance\nΔacc (pp)"),
       ("enhancement_prob_dev_mean", "enhance\nΔp mean (%)"),
       ("enhancement_prob_dev_median", "enhance\nΔp median (%)"))


def table1_figure(path: str | Path, table: Mapping[str, InterventionRow] | None) -> Path | None:
    """Paper Table 1 as bars: path JAS per method, and the removal / enhancement deviations."""
    if not table:
        return None
    methods = list(table)
    fig = new_figure(12, 4.2)
    ax_jas, ax_dev = fig.subplots(1, 2, width_ratios=[1, 3.2])
    pos = np.arange(len(methods))
    jas = [table[m].path_jas_mean or 0.0 for m in methods]
    ax_jas.bar(pos, jas, color=[method_colour(m) for m in methods], width=0.6)
    ax_jas.set_xticks(pos, [method_label(m) for m in methods], rotation=20, ha="right", fontsize=8)
    ax_jas.set_ylabel("mean JAS of the found path")
    ax_jas.set_title("Path JAS (higher = more influential)", fontsize=10)
    ax_jas.grid(True, axis="y", alpha=0.3)
    width = 0.8 / len(methods)
    cats = np.arange(len(_T1))
    for i, m in enumerate(methods):
        vals = [getattr(table[m], k) for k, _ in _T1]
        ax_dev.bar(cats + (i - (len(methods) - 1) / 2) * width, [v if v is not None else 0.0 for v in vals],
                   width=width, color=method_colour(m), label=method_label(m))
    ax_dev.axhline(0, color="black", lw=0.8)
    ax_dev.axvline(2.5, color="grey", lw=0.8, ls="--")
    ax_dev.set_xticks(cats, [lbl for _, lbl in _T1], fontsize=8)
    ax_dev.set_ylabel("deviation (accuracy: points; prob.: % relative)")
    ax_dev.set_title("Editing the path: removal (×0) should drop, enhancement (×2) should raise", fontsize=10)
    ax_dev.grid(True, axis="y", alpha=0.3)
    ax_dev.legend(fontsize=8, loc="best")
    fig.suptitle("Paper Table 1 on the test partition", fontsize=11)
    return save_figure(fig, path)


@dataclass
class LatencyPoint:
    """One point of the deployment figure: a model, or several models of identical shape.

    Attributes:
        ms: batch size -> p50 latency (ms per batch).
        spread: batch size -> (low, high) ms drawn as an error bar (measurement spread, or the
            range over the identical-shape models the point stands for).
        dense: the reference model (square marker, the "latency ∝ MACs" line goes through it).
    """

    label: str
    macs: float
    ms: dict[int, float]
    spread: dict[int, tuple[float, float]] = field(default_factory=dict)
    dense: bool = False


def deployment_figure(path: str | Path, points: Sequence[LatencyPoint], *,
                      provider: str | None = None) -> Path | None:
    """ONNX Runtime p50 latency against MACs per image, one labelled point per model shape."""
    pts = [p for p in points if p.ms and p.macs is not None]
    if not pts:
        return None
    batches = sorted({b for p in pts for b in p.ms})
    batches = sorted({batches[0], batches[-1]})
    fig = new_figure(5.4 * len(batches) + 2.6, 4.3)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    markers = "oD^vP*Xh<>pd"  # the square is the dense model's
    ref = next((p for p in pts if p.dense), None)
    for ax, b in zip(axes, batches):
        for k, p in enumerate(pts):
            if b not in p.ms:
                continue
            colour = "black" if p.dense else f"C{k % 10}"
            if b in p.spread:
                lo, hi = p.spread[b]
                ax.errorbar(p.macs / 1e6, p.ms[b], yerr=[[max(0.0, p.ms[b] - lo)], [max(0.0, hi - p.ms[b])]],
                            fmt="none", ecolor=colour, elinewidth=1.2, capsize=3, zorder=2)
            # hollow markers: models of the same size and speed stay visible on top of each other
            ax.scatter(p.macs / 1e6, p.ms[b], s=80 if p.dense else 55, marker="s" if p.dense else markers[k % 12],
                       facecolors="none", edgecolors=colour, linewidths=1.6, label=p.label, zorder=3)
        top_x = max(p.macs for p in pts) / 1e6
        top_y = max(max(p.ms[b], p.spread.get(b, (0.0, 0.0))[1]) for p in pts if b in p.ms)
        if ref is not None and b in ref.ms:
            xs = np.array([0.0, top_x * 1.1])
            ax.plot(xs, xs * ref.ms[b] / (ref.macs / 1e6), color="grey", ls="--", lw=1,
                    label="latency ∝ MACs (from dense)", zorder=1)
        ax.set_xlabel("MACs per image (M)")
        ax.set_ylabel(f"ONNX Runtime p50 latency (ms per batch of {b})")
        ax.set_title(f"batch size {b}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, top_y * 1.15)
        ax.set_xlim(0, top_x * 1.1)
    handles, lbls = axes[0].get_legend_handles_labels()
    fig.legend(handles, lbls, loc="outside right center", fontsize=7, title="model", title_fontsize=8)
    fig.suptitle(f"Deployment: measured latency vs compute ({provider or 'ONNX Runtime'})", fontsize=11)
    return save_figure(fig, path)


def semantic_figure(path: str | Path, groups: dict[str, np.ndarray] | None,
                    check: SemanticCheck | None) -> Path | None:
    """Path similarity of class pairs by what they share (shape only / colour only / nothing)."""
    from ..semantic import GROUPS

    if not groups or check is None or not any(len(groups[k]) for k, _ in GROUPS):
        return None
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    keys = [k for k, _ in GROUPS if len(groups[k])]
    data = [groups[k] for k in keys]
    ax.boxplot(data, positions=range(len(keys)), widths=0.5, showfliers=False, medianprops={"color": "black"})
    rng = np.random.default_rng(0)
    colours = {"shape_only": "#1f77b4", "colour_only": "#ff7f0e", "none": "#7f7f7f"}
    for i, (k, d) in enumerate(zip(keys, data)):
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(d)), d, s=6, alpha=0.45, color=colours[k], lw=0)
        ax.scatter([i], [float(np.mean(d))], marker="D", color="black", s=28, zorder=4,
                   label="mean" if i == 0 else None)
    names = dict(GROUPS)
    ax.set_xticks(range(len(keys)), [f"{names[k]}\n({len(groups[k])} pairs)" for k in keys], fontsize=8)
    ax.set_ylabel("path similarity of the class pair (cosine)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    auc = check.auc
    ax.set_title("Do classes sharing an attribute share neuron paths?\n"
                 f"ROC AUC shared vs nothing = {auc:.3f}" if auc is not None else
                 "Do classes sharing an attribute share neuron paths?", fontsize=10)
    return save_figure(fig, path)
