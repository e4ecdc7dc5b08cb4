"""The report's markdown sections after the summary: dense model, neuron paths, semantic check,
paper Table 1 and CLS-mask protocol, pruning table, ONNX export and latency by model shape."""

from __future__ import annotations

from typing import Sequence

from ..metrics import Metrics, SemanticCheck
from .format import md_text, mean_std, millions, num, pct, pct_pm, table
from .latency import latency_notes, shape_groups, speedups
from .stats import RECONSTRUCTION_ORDER, PairedDifference, PruneStat

__all__ = ["classes_label", "dense_section", "locate_section", "semantic_section", "paper_section",
           "cls_mask_section", "pruned_section", "comparison_section", "paired_section", "selection_label",
           "recon_text", "export_section", "figures_section", "budget_split_section"]


def classes_label(classes: Sequence[int] | None, names: Sequence[str] | None, limit: int = 4) -> str:
    """``all``, or the classes' names (the first ``limit``, then a count)."""
    if classes is None:
        return "all"
    shown = [md_text(names[c]) if names and c < len(names) else str(c) for c in classes]
    more = f", … ({len(shown)} classes)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def dense_section(metrics: Metrics) -> list[str]:
    dense, data = metrics.dense, metrics.data
    if dense is None:
        return []
    test = data.test if data is not None and data.test is not None else dense.test_images
    return ["## Dense model", "",
            f"Test partition: {test} images of {data.classes if data else None} classes "
            f"({data.kind if data else None}).", "",
            *table(["top-1", "top-5", "params", "MACs / image"],
                   [[pct(dense.top1), pct(dense.top5), millions(dense.params), millions(dense.macs)]])]


def locate_section(metrics: Metrics) -> list[str]:
    loc = metrics.locate
    if loc is None:
        return []
    settings = ", ".join(f"{k}={v}" for k, v in loc.shown_settings().items())
    out = ["## Neuron paths", "",
           f"Located {loc.images} probe images with {', '.join(loc.methods)} ({settings}); "
           f"{loc.images_this_run or 0} computed in this run in {loc.seconds or 0:.1f} s "
           f"({num(loc.images_per_second)} images/s on {loc.device}).", ""]
    masks = metrics.masks
    if masks is not None:
        out += [f"Class masks: top-{masks.topk} neurons per layer for {masks.classes} classes from "
                f"{masks.probe_images} probe images ({masks.method} paths) in `{masks.file}`.", ""]
    return out


def semantic_section(semantic: SemanticCheck | None, sds: dict[str, float | None] | None = None) -> list[str]:
    """Finding 4's table; ``sds``: std over runs per key (``auc``, group keys) in a combined report."""
    from ..semantic import GROUPS

    if semantic is None:
        return []
    sds = sds or {}

    def f(key: str, value: float | None) -> str:
        sd = sds.get(key)
        return num(value, "{:.3f}") + (f" ± {sd:.3f}" if sd is not None else "")

    rows = [[label, str(semantic.pairs.get(k)), f(k, semantic.mean.get(k))] for k, label in GROUPS]
    return ["## Semantic check (paper Finding 4)", "",
            "Class pairs of the shape × colour data by what they share; path similarity = cosine of the classes' "
            f"neuron-utilisation matrices. ROC AUC (Mann–Whitney) of 'shares an attribute' vs 'shares nothing': "
            f"**{f('auc', semantic.auc)}** (shape only {f('auc_shape', semantic.auc_shape)}, colour "
            f"only {f('auc_colour', semantic.auc_colour)}; 0.5 = paths ignore the attributes).", "",
            *table(["class pairs sharing", "pairs", "mean path similarity"], rows, "---|---:|---:")]


def paper_section(metrics: Metrics) -> list[str]:
    """Paper Table 1 (when run), then the CLS-mask protocol."""
    table1 = metrics.paper.intervention if metrics.paper is not None else None
    out: list[str] = []
    if table1:
        out += ["## Paper Table 1: editing the found paths", "",
                "Test partition; path neurons scaled by 0 (removal) or 2 (enhancement) at the attribution scope. "
                "Accuracy deviation in percentage points, probability deviation = relative change of the target "
                "class probability.", "",
                *table(["method", "path JAS", "removal Δacc", "removal Δp mean / median",
                        "enhance Δacc", "enhance Δp mean / median"],
                       [[m, num(r.path_jas_mean, "{:.4g}"), num(r.removal_acc_dev),
                         f"{num(r.removal_prob_dev_mean)} / {num(r.removal_prob_dev_median)} %",
                         num(r.enhancement_acc_dev),
                         f"{num(r.enhancement_prob_dev_mean)} / {num(r.enhancement_prob_dev_median)} %"]
                        for m, r in table1.items()], "---|" + "|".join(["---:"] * 5))]
    return out + cls_mask_section([metrics])


def cls_mask_section(runs: Sequence[Metrics]) -> list[str]:
    """The CLS-mask protocol (and its ablation, when run): top-5 (top-1), mean ± std over runs."""
    cms = [m.paper.cls_mask if m.paper is not None else None for m in runs]
    cm = cms[0]
    if cm is None:
        return []
    over = f"mean ± sample std over {len(runs)} runs" if len(runs) > 1 else f"{cm.test_images} test images"
    results = [c.results if c is not None else {} for c in cms]
    fr = cm.fractions

    def cell(points_per_run, i: int) -> str:
        at = [pts[i] for pts in points_per_run if i < len(pts)]
        t5, t1 = mean_std([p.top5 for p in at]), mean_std([p.top1 for p in at])
        return f"{pct_pm(*t5)} ({pct_pm(*t1)})"

    rows = [[name, *[cell([res.get(name, []) for res in results], i) for i in range(len(fr))]]
            for name in results[0]]
    out = ["## Paper protocol: CLS-token masking", "",
           f"Keep each class's top-{cm.topk} neurons per layer, zero a random fraction p of the others at the "
           f"class token in the first {cm.depth} blocks; top-5 (top-1), {over}.",
           "", *table(["mask", *[f"p = {p:g}" for p in fr]], rows, "---|" + "|".join(["---:"] * len(fr)))]
    if cm.ablation:
        keys = list(dict.fromkeys((r.mask, r.topk, r.depth) for r in cm.ablation))
        by_run = [{(r.mask, r.topk, r.depth, r.fraction): r for r in (c.ablation or [] if c is not None else [])}
                  for c in cms]
        rows = [[mask, str(k), str(d), *[cell([[b[(mask, k, d, p)]] if (mask, k, d, p) in b else [] for b in by_run], 0)
                                        for p in fr]]
                for mask, k, d in sorted(keys, key=lambda t: (t[1], t[2], t[0] == "random"))]
        out += ["### Ablation: top-K × depth × fraction (paper Table 3)", "",
                f"The class's K most frequent path neurons (or K random ones) kept in every block, the others "
                f"zeroed with probability p at the class token in the first `depth` blocks; top-5 (top-1), {over}.",
                "", *table(["mask", "K", "depth", *[f"p = {p:g}" for p in fr]], rows,
                           "---|---:|---:|" + "|".join(["---:"] * len(fr)))]
    return out


def selection_label(s: PruneStat, names: Sequence[str] | None) -> str:
    """``all``, the classes of ``prune.classes``, or ``N random subsets of K classes``."""
    if s.subset_size is not None:
        return f"{s.subsets} random subsets of {s.subset_size} classes" + (" (per run)" if s.runs > 1 else "")
    return classes_label(s.classes, names)


def recon_text(s: PruneStat) -> str:
    """The reconstruction of a setting; runs that predate ``prune.reconstruction`` say yes / no."""
    return s.reconstruction if s.recorded_reconstruction else ("yes" if s.bias_compensation else "no")


def seconds(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def pruned_section(stats: Sequence[PruneStat], names: Sequence[str] | None, combined: bool) -> list[str]:
    if not stats:
        return []
    new = any(s.recorded_reconstruction for s in stats)
    rows = []
    for s in stats:
        rows.append([s.method, f"{100 * s.ratio:.0f} %", recon_text(s), selection_label(s, names),
                     pct_pm(s.top1, s.top1_std),
                     "n/a" if s.kept is None else (f"{100 * s.kept:.1f}" + (f" ± {100 * s.kept_std:.1f}"
                                                                           if s.kept_std is not None else "") + " %"),
                     pct_pm(s.top5, s.top5_std), millions(s.params), millions(s.macs)]
                    + ([seconds(s.cost_seconds)] if new else []) + ([str(s.runs)] if combined else []))
    out = ["## Structured FFN pruning", "",
           "FFN neurons removed for real (smaller fc1/fc2); accuracy on the test partition of the classes kept; "
           "'kept' = top-1 relative to the dense model on the same images"
           + ("; reconstruction = how fc2 was refit on probe images after pruning (none, bias, lsq = ridge least "
              "squares); cost = seconds of the criterion's importance (JAS: locating) + the reconstruction"
              if new else "") + ("; mean ± sample std over runs." if combined else "."), ""]
    subsets = sorted({s.classes for s in stats if s.classes is not None})
    for cls in subsets:
        out += [f"Class subset {list(cls)}: {classes_label(cls, names, limit=len(cls))}.", ""]
    out += comparison_section(stats, names, combined) if new else []
    return out + table(["method", "removed", "reconstruction" if new else "bias comp.", "classes", "top-1", "kept",
                        "top-5", "params", "MACs"] + (["cost (s)"] if new else []) + (["runs"] if combined else []),
                       rows, "---|---:|---|---:|---:|---:|---:|---:|---:" + ("|---:" if new else "")
                       + ("|---:" if combined else ""))


def comparison_section(stats: Sequence[PruneStat], names: Sequence[str] | None, combined: bool) -> list[str]:
    """One table per class selection: methods × (ratio, reconstruction), top-1 (mean ± std), and
    each method's cost (importance + the reconstruction's mean seconds)."""
    out: list[str] = []
    for sel in dict.fromkeys(s.selection for s in stats):
        sub = [s for s in stats if s.selection == sel]
        cols = sorted({(s.ratio, s.reconstruction) for s in sub}, key=lambda c: (c[0], RECONSTRUCTION_ORDER.index(c[1])
                                                                                 if c[1] in RECONSTRUCTION_ORDER else 9))
        recons = list(dict.fromkeys(c[1] for c in sorted(cols, key=lambda c: RECONSTRUCTION_ORDER.index(c[1])
                                                             if c[1] in RECONSTRUCTION_ORDER else 9)))
        by = {(s.method, s.ratio, s.reconstruction): s for s in sub}
        best = {c: max((s.top1 for s in sub if (s.ratio, s.reconstruction) == c), default=None) for c in cols}
        methods = list(dict.fromkeys(s.method for s in sorted(sub, key=lambda s: -s.top1)))
        rows = []
        for m in methods:
            cells = []
            for c in cols:
                s = by.get((m, *c))
                cell = "—" if s is None else (f"{100 * s.top1:.2f}" + (f" ± {100 * s.top1_std:.2f}"
                                                                       if s.top1_std is not None else ""))
                cells.append(f"**{cell}**" if s is not None and s.top1 == best[c] else cell)
            imp = next((s.importance_seconds for s in sub if s.method == m and s.importance_seconds is not None), None)
            rec = {r: mean_std([s.reconstruction_seconds for s in sub if s.method == m and s.reconstruction == r])[0]
                   for r in recons if r != "none"}
            rows.append([m, *cells, seconds(imp), *[seconds(rec[r]) for r in rec]])
        first = sub[0]
        dense, dense_sd = first.dense_top1, first.dense_top1_std
        label = selection_label(first, names)
        images = f", {first.test_images:.0f} test images" if first.test_images else ""
        out += [f"### Top-1 (%) by method and budget: {label}", "",
                f"Dense {pct_pm(dense, dense_sd)}{images}"
                + (f" per subset, mean over each run's subsets" if first.subset_size is not None else "")
                + ("; mean ± std over runs" if combined else "") + "; best per column in bold. "
                "Importance s = the criterion's scoring (JAS: locating the probe images); "
                + ", ".join(f"{r} s = its reconstruction" for r in recons if r != "none") + ".", "",
                *table(["method", *[f"{100 * r:.0f} % {rc}" for r, rc in cols], "importance s",
                        *[f"{r} s" for r in recons if r != "none"]], rows)]
    return out


def paired_section(diffs: Sequence[PairedDifference], runs: int) -> list[str]:
    """``method`` − the best other criterion, per run, at every setting (mean ± std, range, wins)."""
    if not diffs:
        return []
    method = diffs[0].method
    rows = []
    for d in diffs:
        sel = "all classes" if d.selection == ("all",) else (
            f"random subsets of {d.selection[1]} classes" if d.selection[0] == "subsets" else
            f"classes {list(d.selection[1:])}")
        rows.append([sel, f"{100 * d.ratio:.0f} %", d.reconstruction,
                     f"{100 * d.mean:+.2f}" + (f" ± {100 * d.std:.2f}" if d.std is not None else ""),
                     f"{100 * d.low:+.2f} … {100 * d.high:+.2f}" if len(d.per_run) > 1 else "—",
                     f"{d.wins} / {len(d.per_run)}", ", ".join(b for _, b in d.per_run)])
    return [f"## {method.upper() if method == 'jas' else method} against the best other criterion", "",
            f"Per run: {method}'s test top-1 minus the best other criterion's at the same budget and reconstruction "
            f"(the best one chosen in each run, so the comparison is paired and as hard as it gets); "
            f"percentage points, mean ± sample std over {runs} run{'s' if runs > 1 else ''}, the range, and in "
            f"how many runs {method} was at least as good.", "",
            *table(["classes", "removed", "reconstruction", "difference (pp)", "range", f"{method} ≥ best",
                    "best other criterion per run"], rows, "---|---:|---|---:|---:|---:|---")]


def budget_split_section(metrics: Metrics) -> list[str]:
    """The split budgets (``prune.budget`` over FFN neurons, heads and head dimensions): per entry
    the target, what it achieved, the split chosen on the probe images, and every block's kept
    FFN width, heads and head dimension."""
    entries = [e for e in metrics.pruned or [] if e.budget and "blocks" in e.budget]
    if not entries:
        return []
    out = ["## Budget split", "",
           "`prune.budget` spent over " + ", ".join(entries[0].budget.get("units", [])) + "; the split chosen on "
           "probe images (top-1); achieved = Torch-Pruning's count of the pruned model over the dense model's "
           "(latency: ONNX Runtime p50 in ms). Per block: kept FFN neurons / heads × head dimension.", ""]
    blocks = sorted({int(b) for e in entries for b in e.budget["blocks"]})
    rows = []
    for e in entries:
        b = e.budget
        unit = " ms" if b["target"] == "latency_ms" else ""
        value = f"{b['value']:g}{unit}" if unit else f"{100 * b['value']:g} %"
        achieved = f"{b['achieved']:.3g}{unit}" if unit else f"{100 * b['achieved']:.1f} %"
        per = [f"{b['blocks'][str(i)]['ffn']} / {b['blocks'][str(i)]['heads']}×{b['blocks'][str(i)]['head_dim']}"
               if str(i) in b["blocks"] else "—" for i in blocks]
        rows.append([md_text(e.stem), f"{b['target']} ≤ {value}", achieved, md_text(str(b.get("chosen", ""))),
                     pct(e.top1), *per])
    return out + table(["model", "target", "achieved", "split", "test top-1", *[f"block {i}" for i in blocks]],
                       rows, "---|---|---:|---|---:|" + "|".join(["---:"] * len(blocks))) + [""]


def export_section(metrics: Metrics) -> list[str]:
    """Parity per exported model, then latency and speed-up per model *shape*, with the notes on
    what the timings can tell apart."""
    records = metrics.export
    if not records:
        return []
    groups = shape_groups(metrics)
    shape_of = {r.model: g.name for g in groups for r in g.records}
    rows = [[r.model, shape_of.get(r.model, "—"), num(r.parity_max_abs, "{:.1e}"), pct(r.top1_agreement),
             str(r.provider) + (f" (failed: {r.error})" if r.error else "")] for r in records]
    out = ["## ONNX export", "",
           "Parity = max |Δlogit| vs PyTorch on a real test batch (fp32 tolerance 1e-4); shape = models with "
           "identical FFN widths share a letter.", "",
           *table(["model", "shape", "parity", "top-1 agree", "provider"], rows, "---|---|---:|---:|---")]
    batches = sorted({x.batch_size for r in records for x in r.latency if x.latency_ms_p50})
    if not batches:
        return out
    shown = sorted({batches[0], batches[-1]})
    speed = speedups(metrics)
    by_group = {sp.group: sp for sp in speed.values()}
    dense_macs = metrics.dense.macs if metrics.dense is not None else None
    by_ckpt = metrics.pruned_by_checkpoint()

    def p50(g, b: int) -> str:
        v = g.p50(b)
        if v is None:
            return "n/a"
        return f"{v[0]:.3f}" + (f" ({v[1]:.3f}–{v[2]:.3f})" if len(g.records) > 1 or v[1] != v[2] else "")

    rows = []
    for g in groups:
        macs = dense_macs if g.dense else next((by_ckpt[c].macs for c in (r.checkpoint for r in g.records)
                                                if c in by_ckpt), None)
        sp = by_group.get(g.name)
        rows.append([g.name, ", ".join(g.labels), num(dense_macs / macs if dense_macs and macs else None, "{:.2f}×"),
                     *[p50(g, b) for b in shown], "1.00×" if g.dense else (sp.text() if sp else "n/a")])
    big = shown[-1]
    out += ["### Latency by model shape", "",
            f"ONNX Runtime p50 latency in ms per batch (low–high: interquartile range of the timings, the median "
            f"over the shape's models, or, without one, the range of their p50s); speed-up = dense p50 / pruned p50 at the largest batch (b={big}) with its "
            "spread. Models of one shape are timed as one: latency never ranks methods whose pruned shapes are "
            "identical.", "",
            *table(["shape", "models", "MACs ratio", *[f"p50 ms (b={b})" for b in shown], "speed-up"], rows,
                   "---|---|---:|" + "|".join(["---:"] * len(shown)) + "|---:")]
    notes = latency_notes(groups, speed)
    return out + (notes + [""] if notes else [])


def figures_section(figures: Sequence[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    out = ["## Figures", ""]
    for i, (rel, caption) in enumerate(figures, 1):
        out += [f"![{caption}]({rel})", "", f"*Figure {i}. {caption}*", ""]
    return out
