"""Which figures a report gets and what each is drawn from. A figure whose data the run lacks is
left out; one that fails to draw is logged and skipped, so a broken figure never loses the report.
A figure the operating system refuses to write (no space, read-only) stops the report instead:
the report could not be written either."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import StorageError
from ..metrics import Metrics
from ..rundir import RunDir
from .format import mean_std
from .latency import shape_groups, speedups
from .rundata import RunData
from .stats import PruneStat, prune_stats
from .style import hex_rgb, method_colour, method_label
from .tables import classes_label

__all__ = ["FigureList", "pruning_figures", "cls_mask_figures", "path_figures", "table1_and_deployment_figures"]

log = logging.getLogger("jas_prune")


class FigureList:
    """Collects (path relative to the report, caption) of the figures written into ``out``."""

    def __init__(self, out: RunDir):
        self.out = out
        self.items: list[tuple[str, str]] = []

    def add(self, name: str, caption: str | Callable[[], str], draw: Callable[[Path], Path | None]) -> None:
        path = self.out.figure(name)
        try:
            written = draw(path)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the report
            log.warning("report: figure %s skipped (%s: %s)", name, type(exc).__name__, exc)
            return
        if written is not None:
            rel = path.relative_to(self.out.root).as_posix()
            self.items.append((rel, caption() if callable(caption) else caption))


# -- pruning trade-off and CLS-mask protocol (single and combined reports) ------------------------


def _tradeoff_panels(stats: Sequence[PruneStat], names: Sequence[str] | None, *, by_classes: bool):
    """One panel per (class selection, reconstruction); the line style names the reconstruction."""
    from .plots import Panel
    from .stats import RECONSTRUCTION_ORDER
    from .style import reconstruction_label, reconstruction_style
    from .tables import recon_text, selection_label

    panels = []
    selections = list(dict.fromkeys(s.selection for s in stats)) if by_classes else [("all",)]
    recons = sorted({s.reconstruction for s in stats},
                    key=lambda r: RECONSTRUCTION_ORDER.index(r) if r in RECONSTRUCTION_ORDER else 9)
    for sel in selections:
        for recon in recons:
            sel_stats = [s for s in stats if s.selection == sel and s.reconstruction == recon]
            if not sel_stats:
                continue
            series: dict[str, list] = {}
            for s in sel_stats:
                series.setdefault(s.method, []).append((100 * s.removed, 100 * s.top1,
                                                        None if s.top1_std is None else 100 * s.top1_std))
            dense, _ = mean_std([s.dense_top1 for s in sel_stats])
            sd = next((s.dense_top1_std for s in sel_stats if s.dense_top1_std is not None), None)
            first = sel_stats[0]
            if first.recorded_reconstruction:
                title = f"reconstruction: {reconstruction_label(recon)}"
            else:
                title = ("with" if recon_text(first) == "yes" else "without") + " bias compensation"
            if sel != ("all",):
                which = selection_label(first, names) if first.subset_size else classes_label(first.classes, names, 3)
                title = f"{which}\n{title}"
            panels.append(Panel(title, series, None if dense is None else 100 * dense,
                                None if sd is None else 100 * sd,
                                styles={m: reconstruction_style(recon) for m in series}))
    return panels


def pruning_figures(figs: FigureList, runs: Sequence[Metrics], names: Sequence[str] | None) -> None:
    from .plots import tradeoff_figure

    stats = prune_stats(runs)
    band = f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""
    styles = "; line style = reconstruction (dotted none, dashed bias, solid least squares)" \
        if any(s.recorded_reconstruction for s in stats) else ""
    if any(s.general for s in stats):
        general = [s for s in stats if s.general]
        figs.add("pruning_tradeoff",
                 f"Structured FFN pruning: test top-1 vs share of FFN neurons removed, per method{band}{styles}; "
                 "dotted black = dense. Higher is better.",
                 lambda p: tradeoff_figure(p, _tradeoff_panels(general, names, by_classes=False),
                                           title=f"Pruning trade-off (all classes){band}",
                                           xlabel="FFN neurons removed (%)", ylabel="test top-1 (%)"))
    if any(not s.general for s in stats):
        spec = [s for s in stats if not s.general]
        figs.add("pruning_classes",
                 f"Class-specialised pruning: top-1 on the kept classes' test images{band}{styles}; dotted black = "
                 "dense on the same images.",
                 lambda p: tradeoff_figure(p, _tradeoff_panels(spec, names, by_classes=True),
                                           title=f"Class-specialised pruning{band}",
                                           xlabel="FFN neurons removed (%)",
                                           ylabel="test top-1 on the kept classes (%)"))


def _dense_mean_std(runs: Sequence[Metrics], metric: str) -> tuple[float | None, float | None]:
    return mean_std([getattr(m.dense, metric) if m.dense is not None else None for m in runs])


def _cls_mask_panels(runs: Sequence[Metrics]):
    from .plots import Panel

    results = [m.paper.cls_mask.results if m.paper is not None and m.paper.cls_mask is not None else {}
               for m in runs]
    panels = []
    for metric, title in (("top5", "top-5 (the paper's metric)"), ("top1", "top-1")):
        series: dict[str, list] = {}
        for name in results[0]:
            pts = []
            for i, point in enumerate(results[0][name]):
                mean, sd = mean_std([getattr(res[name][i], metric) for res in results
                                     if name in res and i < len(res[name])])
                pts.append((100 * point.fraction, 100 * mean, None if sd is None else 100 * sd))
            series[name] = pts
        dense, sd = _dense_mean_std(runs, metric)
        panels.append(Panel(title, series, None if dense is None else 100 * dense, None if sd is None else 100 * sd))
    return panels


def _cls_mask_ablation_panels(runs: Sequence[Metrics]):
    from .plots import Panel

    rows = [r for m in runs if m.paper is not None and m.paper.cls_mask is not None
            for r in m.paper.cls_mask.ablation or []]
    depths = sorted({r.depth for r in rows})
    ks = sorted({r.topk for r in rows})
    shade = {k: 0.45 + 0.55 * (i + 1) / len(ks) for i, k in enumerate(ks)}
    panels = []
    for d in depths:
        series: dict[str, list] = {}
        colours: dict[str, str] = {}
        for mask in dict.fromkeys(r.mask for r in rows):
            for k in ks:
                at = [r for r in rows if r.mask == mask and r.topk == k and r.depth == d]
                if not at:
                    continue
                label = f"{mask} K={k}"
                series[label] = []
                for p in sorted({r.fraction for r in at}):
                    mean, sd = mean_std([r.top5 for r in at if r.fraction == p])
                    series[label].append((100 * p, 100 * mean, None if sd is None else 100 * sd))
                rgb = np.array(hex_rgb(method_colour(mask)))
                colours[label] = "#%02x%02x%02x" % tuple(int(c) for c in 255 - (255 - rgb) * shade[k])
        dense, sd = _dense_mean_std(runs, "top5")
        panels.append(Panel(f"first {d} block{'s' if d > 1 else ''} masked", series,
                            None if dense is None else 100 * dense, None if sd is None else 100 * sd, colours))
    return panels


def cls_mask_figures(figs: FigureList, runs: Sequence[Metrics]) -> None:
    from .plots import tradeoff_figure

    cm = runs[0].paper.cls_mask if runs[0].paper is not None else None
    if cm is None or not cm.results:
        return
    over = f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""
    figs.add("cls_mask_protocol",
             f"Paper protocol (Fig. 6): keep each class's top-{cm.topk} neurons per layer, zero a random share p "
             f"of the others at the class token in the first {cm.depth} blocks; higher = the kept mask carries "
             "the class" + ("; mean ± std over runs." if len(runs) > 1 else "."),
             lambda p: tradeoff_figure(p, _cls_mask_panels(runs), title="CLS-token masking protocol" + over,
                                       xlabel="share p of non-mask neurons zeroed (%)", ylabel="test accuracy (%)",
                                       bar_xlabel="mask (at p = {x:.0f} %)"))
    if cm.ablation:
        figs.add("cls_mask_ablation",
                 "Paper protocol ablation (Table 3): top-5 vs share p of the other neurons zeroed, one panel per "
                 "masked depth; darker = more neurons K kept per block; random masks of the same K in grey.",
                 lambda p: tradeoff_figure(p, _cls_mask_ablation_panels(runs),
                                           title="CLS-token masking ablation: top-K × depth × p" + over,
                                           xlabel="share p of non-mask neurons zeroed (%)",
                                           ylabel="test top-5 (%)", bar_xlabel="mask (at p = {x:.0f} %)"))


# -- figures of one run --------------------------------------------------------------------------


def _sample_images(data: RunData, classes: Iterable[int]) -> dict[int, np.ndarray]:
    """One probe image per class (un-normalised RGB), from the data source the recipe names."""
    from ..data import ImageDataset, source_for

    if data.recipe is None:
        raise ValueError(f"recipe.yaml {data.recipe_problem}: the data source of the sample images is unknown")
    d, seed = data.recipe.data, data.recipe.runtime.seed
    source = source_for(d, seed)
    want = set(int(c) for c in classes)
    first: dict[int, Any] = {}
    for s in source.subset("probe"):
        if s.label in want and s.label not in first:
            first[s.label] = s
    ds = ImageDataset([], transform=None, shapes_seed=seed)
    out = {}
    for c, sample in first.items():
        im = ds.load_image(sample)
        im.thumbnail((128, 128))
        out[c] = np.asarray(im.convert("RGB"))
    return out


def path_figures(figs: FigureList, data: RunData) -> None:
    """Neuron paths per class, class similarity, similar classes' images, the semantic check."""
    from ..classes import choose_classes
    from .path_plots import neuron_paths_figure, similar_images_figure, similarity_figure
    from .plots import semantic_figure

    masks, metrics = data.masks, data.metrics
    if masks is None:
        return
    counts = masks.counts.numpy()
    sim = masks.similarity.numpy()
    names = masks.class_names
    valid = counts > 0
    chosen = choose_classes(counts, sim, k=4)
    n_probe = (metrics.data.probe if metrics.data is not None else None) or \
        (metrics.locate.images if metrics.locate is not None else None)
    if n_probe and data.run.paths_dir("probe").is_dir():
        def draw_paths(p: Path) -> Path | None:
            located = data.run.path_store("probe").read(int(n_probe), scores=False)
            method = (metrics.masks.method if metrics.masks is not None else None) or next(iter(located.paths))
            paths = located.paths.get(method)
            if paths is None:
                return None
            return neuron_paths_figure(p, paths.numpy(), located.labels.numpy(), chosen, names, located.layers,
                                       int(masks.utilisation.shape[-1]), method=method)

        figs.add("neuron_paths",
                 f"Neuron paths per class (paper Fig. 4) for {', '.join(names[c] for c in chosen)} (well-populated, "
                 "mutually dissimilar classes): per block, the distribution of the neurons on the class's paths; "
                 "the line joins the most frequent neuron per block.", draw_paths)
    figs.add("class_similarity",
             "Class similarity of neuron paths (paper Fig. 5): cosine of the per-class neuron-utilisation matrices, "
             "classes ordered by hierarchical clustering so that groups of similar classes form bright blocks.",
             lambda p: similarity_figure(p, sim, names, valid))
    strip = chosen[:3]

    def draw_images(p: Path) -> Path | None:
        need = set(strip)
        for c in strip:
            order = [int(o) for o in np.argsort(-sim[c], kind="stable") if o != c and valid[o]]
            need |= set(order[:3]) | set(order[-3:])
        return similar_images_figure(p, sim, names, strip, _sample_images(data, need), valid=valid)

    figs.add("similar_classes",
             f"Sample probe images of {', '.join(names[c] for c in strip)} next to the 3 most (green) and 3 least "
             "(red) similar classes by neuron path.", draw_images)
    if data.semantic is not None:
        figs.add("semantic_check",
                 "Semantic check (paper Finding 4): path similarity of class pairs sharing the shape only, the colour "
                 "only, or nothing; ROC AUC well above 0.5 = paths follow the visual attributes.",
                 lambda p: semantic_figure(p, data.groups, data.semantic))


def _latency_points(metrics: Metrics):
    """One deployment-figure point per model shape (identical-shape models are one point)."""
    from .plots import LatencyPoint

    dense_macs = metrics.dense.macs if metrics.dense is not None else None
    points = []
    for g in shape_groups(metrics):
        entries = [e for e in g.entries if e is not None]
        macs = dense_macs if g.dense else (entries[0].macs if entries else None)
        if macs is None:
            continue
        if g.dense:
            label = "dense"
        else:
            ratios = sorted({f"{100 * e.ratio:.0f} %" + {"bias": " +bc", "lsq": " +lsq"}.get(e.reconstruction_name, "")
                             + ("" if e.classes is None else f" ({len(e.classes)} cl.)") for e in entries})
            methods = list(dict.fromkeys(method_label(e.method) for e in entries)) or g.labels
            label = f"{g.name}: {' / '.join(methods)} {', '.join(ratios)}".strip()
        ms, spread = {}, {}
        for b in sorted({x.batch_size for r in g.records for x in r.latency}):
            v = g.p50(b)
            if v is not None:
                ms[b] = v[0]
                if v[1] != v[2]:
                    spread[b] = (v[1], v[2])
        points.append(LatencyPoint(label, float(macs), ms, spread, dense=g.dense))
    return points


def table1_and_deployment_figures(figs: FigureList, metrics: Metrics) -> None:
    from .plots import deployment_figure, table1_figure

    table1 = metrics.paper.intervention if metrics.paper is not None else None
    if table1:
        figs.add("table1", "Paper Table 1: mean JAS of each method's paths, and the accuracy / probability change "
                 "when the path neurons are removed (×0) or enhanced (×2); JAS should move both the most.",
                 lambda p: table1_figure(p, table1))
    if metrics.export:
        provider = next((sp.provider for sp in speedups(metrics).values()), None) or \
            next((r.provider for r in metrics.export if r.ok), None)
        figs.add("deployment", "Deployment: measured ONNX Runtime p50 latency against MACs per image, one point per "
                 "model shape (models of identical FFN widths are one point; bars = measurement spread or their "
                 "range; lower-left is better).",
                 lambda p: deployment_figure(p, _latency_points(metrics), provider=provider))
        from .frontier import frontier_figure

        figs.add("frontier", "Deployment frontier: ONNX Runtime p50 latency against test top-1 through ONNX Runtime, "
                 "one point per model × precision (float32, INT8, float16); the line is the Pareto front (no file "
                 "is both faster and more accurate than a point on it).", lambda p: frontier_figure(p, metrics))
