"""Report figures drawn from the stored neuron paths and class masks: neuron paths per class
(paper Fig. 4), the class-similarity heatmap and sample images of the most and least similar
classes (paper Fig. 5). Nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .plots import new_figure, save_figure

__all__ = ["leaf_order", "neuron_paths_figure", "similarity_figure", "similar_images_figure"]


def leaf_order(similarity: Any) -> list[int]:
    """Leaf order of average-linkage agglomerative clustering on ``1 - similarity`` (numpy only).

    Similar classes end up next to each other, so block structure shows in a heatmap.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    if n <= 2:
        return list(range(n))
    dist = 1.0 - np.nan_to_num(sim, nan=0.0)
    np.fill_diagonal(dist, np.inf)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    sizes = np.ones(n)
    for _ in range(n - 1):
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        i, j = (int(i), int(j)) if i < j else (int(j), int(i))
        # Lance–Williams update for average linkage: cluster i becomes i ∪ j, j is gone
        new = (sizes[i] * dist[i] + sizes[j] * dist[j]) / (sizes[i] + sizes[j])
        dist[i, :], dist[:, i] = new, new
        dist[i, i] = np.inf
        dist[j, :], dist[:, j] = np.inf, np.inf
        sizes[i] += sizes[j]
        members[i] = members[i] + members.pop(j)
    return next(iter(members.values()))


def _violin(ax, x: float, values: np.ndarray, n: int, colour: str, width: float = 0.42) -> None:
    """A violin of neuron indices (Gaussian KDE, bandwidth n/40) plus one dot per distinct neuron."""
    grid = np.linspace(-0.5, n - 0.5, 400)
    bw = max(n / 40.0, 1.0)
    dens = np.exp(-0.5 * ((grid[:, None] - values[None, :]) / bw) ** 2).sum(axis=1)
    dens = dens / dens.max() * width
    dens[dens < 0.01 * width] = np.nan  # no outline where no neuron was picked
    ax.fill_betweenx(grid, x - dens, x + dens, color=colour, alpha=0.35, lw=0)
    ax.plot(x - dens, grid, color=colour, lw=0.6)
    ax.plot(x + dens, grid, color=colour, lw=0.6)
    uniq, cnt = np.unique(values, return_counts=True)
    ax.scatter(np.full(len(uniq), x), uniq, s=6 + 40 * cnt / cnt.max(), color="black", alpha=0.5, lw=0, zorder=3)


def neuron_paths_figure(path: str | Path, paths: Any, labels: Any, classes: Sequence[int],
                        class_names: Sequence[str], layers: Sequence[int], width: int, *,
                        method: str = "jas") -> Path | None:
    """Per chosen class: per layer, the distribution of the neurons in its images' paths (violin,
    dots sized by how often a neuron is picked), the most frequent neuron per layer joined by a line.

    Args:
        paths: [N, L, K] neuron indices per probe image.
        labels: [N] class of each image.
        classes: the classes to show (up to 4 fit well).
        width: FFN neurons per layer (the y range).
    """
    paths, labels = np.asarray(paths), np.asarray(labels)
    classes = [c for c in classes if (labels == c).any()]
    if not classes or paths.ndim != 3:
        return None
    ncol = 2 if len(classes) > 1 else 1
    nrow = (len(classes) + ncol - 1) // ncol
    fig = new_figure(6.0 * ncol, 4.0 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()
    xs = np.arange(len(layers))
    colour, line = "#4c72b0", "#c44e52"  # the same for every class: class names may be colour names
    for ax, c in zip(axes, classes):
        sel = paths[labels == c]  # [n_c, L, K]
        modes = []
        for j in range(len(layers)):
            vals = sel[:, j, :].ravel().astype(np.float64)
            _violin(ax, xs[j], vals, width, colour)
            uniq, cnt = np.unique(vals, return_counts=True)
            modes.append((uniq[np.argmax(cnt)], cnt.max() / len(vals)))
        my = [m for m, _ in modes]
        ax.plot(xs, my, color=line, lw=2, marker="o", ms=5, zorder=4, label="most frequent neuron")
        for x, (m, share) in zip(xs, modes):
            ax.annotate(f"{int(m)}\n{100 * share:.0f}%", (x, m), xytext=(9, 0), textcoords="offset points",
                        fontsize=6.5, va="center", ha="left", zorder=5,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
        ax.set_title(f"{class_names[c]} ({len(sel)} probe images)", fontsize=10)
        ax.set_xticks(xs, [str(b) for b in layers])
        ax.set_xlim(-0.6, len(layers) - 0.2)
        ax.set_ylim(-0.5 - 0.04 * width, width - 0.5 + 0.1 * width)
        ax.set_xlabel("block (layer)")
        ax.set_ylabel("FFN neuron index")
        ax.tick_params(labelleft=True)
        ax.grid(True, axis="y", alpha=0.25)
        ax.axhspan(width - 0.5, width * 1.2, color="#eeeeee", zorder=0)
        ax.axhspan(-width * 0.2, -0.5, color="#eeeeee", zorder=0)
    for ax in axes[len(classes):]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, alpha=0.35, label="neurons on the class's paths (density over its images)"),
               Line2D([], [], color="black", alpha=0.5, marker="o", ls="", label="one neuron (size = images using it)"),
               Line2D([], [], color=line, lw=2, marker="o", label="most frequent neuron per block")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Neuron paths per class ({method} paths on the probe partition; "
                 "label = neuron index and share of images)", fontsize=11)
    return save_figure(fig, path)


def similarity_figure(path: str | Path, similarity: Any, class_names: Sequence[str],
                      valid: Any = None) -> Path | None:
    """Heatmap of the class similarity, classes in hierarchical-clustering leaf order."""
    sim = np.asarray(similarity, dtype=np.float64)
    keep = np.arange(len(sim)) if valid is None else np.flatnonzero(np.asarray(valid, dtype=bool))
    if keep.size < 2:
        return None
    sub = sim[np.ix_(keep, keep)]
    order = leaf_order(sub)
    sub = sub[np.ix_(order, order)]
    names = [str(class_names[keep[i]]) for i in order]
    n = len(names)
    off = sub[~np.eye(n, dtype=bool)]
    vmax = float(np.ceil(np.nanmax(off) * 10) / 10) if off.size else 1.0
    side = float(np.clip(3 + 0.13 * min(n, 80), 6, 13))
    fig = new_figure(side + 1.4, side)
    ax = fig.subplots()
    im = ax.imshow(sub, cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-6), interpolation="nearest")
    step = max(1, int(np.ceil(n / 80)))
    ticks = np.arange(0, n, step)
    fs = 7 if n <= 32 else (5.5 if n <= 60 else 4.5)
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=fs)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=fs)
    ax.set_xlabel("class (clustered order)")
    ax.set_ylabel("class (clustered order)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"path similarity (cosine of neuron utilisation; diagonal 1, scale capped at {vmax:.1f})")
    ax.set_title("Class similarity of neuron paths (average-linkage leaf order)", fontsize=11)
    return save_figure(fig, path)


def similar_images_figure(path: str | Path, similarity: Any, class_names: Sequence[str],
                          classes: Sequence[int], images: dict[int, np.ndarray], n_side: int = 3,
                          valid: Any = None) -> Path | None:
    """For each chosen class: its sample image, the ``n_side`` most and least similar classes.

    Args:
        images: class -> an un-normalised RGB uint8 image [H, W, 3].
    """
    sim = np.asarray(similarity, dtype=np.float64)
    ok = np.ones(len(sim), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = []
    for c in classes:
        if c not in images:
            continue
        others = [o for o in np.argsort(-sim[c], kind="stable") if o != c and ok[o] and o in images]
        if len(others) < 2 * n_side:
            continue
        rows.append((c, [int(o) for o in others[:n_side]], [int(o) for o in others[::-1][:n_side]]))
    if not rows:
        return None
    ncol = 1 + 2 * n_side
    fig = new_figure(1.55 * ncol + 0.4, 2.0 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (c, most, least) in enumerate(rows):
        tiles = [(c, "class", None)] + [(o, f"most similar #{i + 1}", sim[c, o]) for i, o in enumerate(most)] + \
                [(o, f"least similar #{i + 1}", sim[c, o]) for i, o in enumerate(least)]
        for ax, (o, role, s) in zip(axes[r], tiles):
            ax.imshow(images[o], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            head = f"{role}\n{class_names[o]}" + (f"\nsimilarity {s:.2f}" if s is not None else "")
            colour = "black" if s is None else ("#1a7f37" if "most" in role else "#b42318")
            ax.set_title(head, fontsize=6.5, color=colour)
            if s is None:
                for sp in ax.spines.values():
                    sp.set_linewidth(2.5)
    fig.suptitle("Sample images of the most and least similar classes by neuron path", fontsize=11)
    return save_figure(fig, path)
