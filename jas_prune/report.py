"""``report.md`` and its figures, rebuilt from a run directory without recomputing any model work.

A run's report reads ``metrics.json``, ``recipe.yaml``, ``masks.safetensors`` and the stored
probe paths (``paths/probe/``); sample images come from the data source the recipe names
(rendered, for ``shapes``). ``jas-prune report RUN_DIR`` rebuilds it; ``jas-prune report
--combine DIR ... --out DIR`` writes one report over runs of the same recipe with different
``runtime.seed`` (mean ± std).

The report opens with a summary (best method per pruning budget), then the figures
(``figures/*.png``, each with a one-line caption), then the tables, the settings last. A figure
without its data is skipped, so a dense-only run still gets a report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import OutputDirError, RecipeError
from .io import atomic_write_text, read_json

__all__ = ["write_report", "render_report", "combine_reports", "render_combined", "PruneStat", "prune_stats",
           "best_per_budget", "FIGURES_DIR"]

log = logging.getLogger("jas_prune")

FIGURES_DIR = "figures"
#: Share of the dense top-1 the summary's recommendation asks to keep.
KEEP_TARGETS = (0.99, 0.95)


# -- formatting ----------------------------------------------------------------------------------


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _pct_pm(x: Any, sd: Any) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f} ± {100 * sd:.2f} %" if sd is not None else _pct(x)


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _millions(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e6:.3f} M"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "|".join(["---"] + ["---:"] * (len(header) - 1))
    return ["| " + " | ".join(header) + " |", f"|{align}|", *("| " + " | ".join(r) + " |" for r in rows), ""]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None for a single value) of the non-missing values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


# -- pruning statistics (one run, or mean ± std over runs) ---------------------------------------


@dataclass
class PruneStat:
    """One pruning setting, over one or more runs (``*_std`` is None for a single run)."""

    method: str
    ratio: float
    bias_compensation: bool
    classes: tuple[int, ...] | None
    top1: float
    top5: float | None
    params: float | None
    macs: float | None
    dense_top1: float | None
    removed: float
    checkpoint: str | None = None
    top1_std: float | None = None
    top5_std: float | None = None
    kept: float | None = None
    kept_std: float | None = None
    dense_top1_std: float | None = None
    runs: int = 1


def prune_stats(runs: Sequence[dict[str, Any]]) -> list[PruneStat]:
    """``metrics["pruned"]`` of one or more runs grouped by (classes, ratio, compensation, method).

    Top-1, top-5, params, MACs and "kept" (top-1 / dense top-1 of the same images) are averaged
    over the runs that have the setting; std is the sample std over runs.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for metrics in runs:
        dense = (metrics.get("dense") or {}).get("top1")
        for e in metrics.get("pruned") or []:
            cls = None if e.get("classes") is None else tuple(int(c) for c in e["classes"])
            key = (cls, float(e["ratio"]), bool(e.get("bias_compensation")), e["method"])
            groups.setdefault(key, []).append({**e, "_dense": e.get("dense_top1") or dense})
    out = []
    for (cls, ratio, comp, method), es in groups.items():
        top1, top1_sd = _mean_std([e["top1"] for e in es])
        top5, top5_sd = _mean_std([e.get("top5") for e in es])
        dense, dense_sd = _mean_std([e["_dense"] for e in es])
        kept, kept_sd = _mean_std([e["top1"] / e["_dense"] if e["_dense"] else None for e in es])
        removed, _ = _mean_std([e.get("removed_fraction", e["ratio"]) for e in es])
        out.append(PruneStat(method=method, ratio=ratio, bias_compensation=comp, classes=cls, top1=top1 or 0.0,
                             top5=top5, params=_mean_std([e.get("params") for e in es])[0],
                             macs=_mean_std([e.get("macs") for e in es])[0], dense_top1=dense,
                             removed=removed if removed is not None else ratio, checkpoint=es[0].get("checkpoint"),
                             top1_std=top1_sd, top5_std=top5_sd, kept=kept, kept_std=kept_sd,
                             dense_top1_std=dense_sd, runs=len(es)))
    out.sort(key=lambda s: (s.classes is not None, s.classes or (), s.ratio, s.bias_compensation, -s.top1, s.method))
    return out


def best_per_budget(stats: Sequence[PruneStat]) -> list[PruneStat]:
    """The best setting (highest top-1; ties: higher top-5, then method name) per (classes, ratio)."""
    best: dict[tuple, PruneStat] = {}
    for s in stats:
        key = (s.classes, s.ratio)
        cur = best.get(key)
        rank = (-s.top1, -(s.top5 or 0.0), s.method, not s.bias_compensation)
        if cur is None or rank < (-cur.top1, -(cur.top5 or 0.0), cur.method, not cur.bias_compensation):
            best[key] = s
    return sorted(best.values(), key=lambda s: (s.classes is not None, s.classes or (), s.ratio))


def speedups(metrics: dict[str, Any]) -> dict[str | None, tuple[float, int, str | None]]:
    """Checkpoint -> (ONNX p50 speed-up over dense, batch size, provider) at the largest batch both have."""
    records = metrics.get("export") or []
    dense = next((r for r in records if r.get("checkpoint") is None and not r.get("error")), None)
    if dense is None:
        return {}
    base = {int(x["batch_size"]): x["latency_ms_p50"] for x in dense.get("latency") or []
            if x.get("latency_ms_p50")}
    out: dict[str | None, tuple[float, int, str | None]] = {}
    for r in records:
        if r.get("checkpoint") is None or r.get("error"):
            continue
        lat = {int(x["batch_size"]): x["latency_ms_p50"] for x in r.get("latency") or [] if x.get("latency_ms_p50")}
        common = sorted(set(lat) & set(base))
        if common:
            b = common[-1]
            out[r["checkpoint"]] = (base[b] / lat[b], b, r.get("provider"))
    return out


# -- run directory contents ---------------------------------------------------------------------


def _recipe_dict(text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _load_masks(run_dir: Path):
    from .aggregate import MASKS_FILE, load_masks
    from .errors import CheckpointError

    if not (run_dir / MASKS_FILE).is_file():
        return None
    try:
        return load_masks(run_dir)
    except CheckpointError as exc:
        log.warning("report: %s", exc)
        return None


def _class_names(metrics: dict[str, Any], masks) -> list[str] | None:
    if masks is not None:
        return list(masks.class_names)
    if (metrics.get("data") or {}).get("kind") == "shapes":
        from . import shapes

        return list(shapes.CLASS_NAMES)
    return None


def _classes_label(classes: Sequence[int] | None, names: Sequence[str] | None, limit: int = 4) -> str:
    if classes is None:
        return "all"
    shown = [names[c] if names and c < len(names) else str(c) for c in classes]
    more = f", … ({len(shown)} classes)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def _semantic(metrics: dict[str, Any], masks) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """Finding 4: from ``metrics.paper.semantic``, else computed from the masks (older runs)."""
    from .semantic import pair_groups, summarise_groups

    check = (metrics.get("paper") or {}).get("semantic")
    groups = None
    if masks is not None:
        groups = pair_groups(masks.similarity.numpy(), masks.class_names, (masks.counts > 0).numpy())
        if check is None and groups is not None:
            check = summarise_groups(groups)
    return check, groups


# -- summary --------------------------------------------------------------------------------------


def _summary(metrics_runs: Sequence[dict[str, Any]], names: Sequence[str] | None,
             semantic: dict[str, Any] | None) -> list[str]:
    """The section a reader can act on: dense accuracy, best method per budget, what to pick."""
    combined = len(metrics_runs) > 1
    dense_top1, dense_sd = _mean_std([(m.get("dense") or {}).get("top1") for m in metrics_runs])
    dense = metrics_runs[0].get("dense") or {}
    out = ["## Summary", ""]
    if dense_top1 is not None:
        out += [f"- Dense model: top-1 {_pct_pm(dense_top1, dense_sd)}, {_millions(dense.get('params'))} params, "
                f"{_millions(dense.get('macs'))} MACs per image"
                + (f" (mean ± std over {len(metrics_runs)} runs)." if combined else ".")]
    stats = prune_stats(metrics_runs)
    best = best_per_budget(stats)
    per_run = [speedups(m) for m in metrics_runs]
    speed = {k: (_mean_std([sp[k][0] for sp in per_run if k in sp])[0], v[1])
             for k, v in per_run[0].items()} if per_run else {}
    if best:
        d_params, d_macs = dense.get("params"), dense.get("macs")

        def rel(v: float | None, d: float | None) -> str:
            return f"{_millions(v)} ({100 * v / d:.0f} %)" if v is not None and d else _millions(v)

        rows = []
        for s in best:
            sp = speed.get(s.checkpoint)
            tied = sorted({t.method for t in stats if (t.classes, t.ratio) == (s.classes, s.ratio)
                           and t.method != s.method and (t.top1, t.top5) == (s.top1, s.top5)})
            rows.append([f"{100 * s.ratio:.0f} %", _classes_label(s.classes, names, 2),
                         f"**{s.method}**" + (f" (tied: {', '.join(tied)})" if tied else ""),
                         "yes" if s.bias_compensation else "no", _pct_pm(s.top1, s.top1_std),
                         _pct_pm(s.kept, s.kept_std), rel(s.params, d_params), rel(s.macs, d_macs),
                         f"{sp[0]:.2f}× (b={sp[1]})" if sp else "n/a"])
        header = ["FFN neurons removed", "classes", "best method", "bias comp.", "top-1", "kept", "params", "MACs",
                  "ONNX speed-up"]
        align = "---:|---|---|---|---:|---:|---:|---:|---:"
        if not any(s.checkpoint in speed for s in best):  # no export: no speed-up column
            header, align, rows = header[:-1], align[:-5], [r[:-1] for r in rows]
        out += ["", "Best method per pruning budget (by test top-1"
                + (", mean ± std over runs" if combined else "") + "; 'kept' = share of the dense top-1 on the "
                "same images; params and MACs relative to dense"
                + ("; ONNX speed-up = dense p50 / pruned p50 latency" if len(header) == 9 else "") + "):", "",
                *_table(header, rows, align)]
        general = [s for s in best if s.classes is None and s.kept is not None]
        for target in KEEP_TARGETS:
            ok = [s for s in general if s.kept >= target]
            if ok:
                s = max(ok, key=lambda s: s.ratio)
                out.append(f"- To keep ≥ {100 * target:.0f} % of the dense top-1, remove up to "
                           f"**{100 * s.ratio:.0f} %** of the FFN neurons with **{s.method}**"
                           f"{' + bias compensation' if s.bias_compensation else ''} "
                           f"(top-1 {_pct_pm(s.top1, s.top1_std)}, {_millions(s.params)} params).")
                break
        else:
            if general:
                s = min(general, key=lambda s: (s.ratio, -s.top1))
                out.append(f"- No budget keeps ≥ {100 * KEEP_TARGETS[-1]:.0f} % of the dense top-1; the smallest "
                           f"({100 * s.ratio:.0f} % removed) keeps {100 * s.kept:.1f} % with {s.method}: fine-tune "
                           "(`prune.finetune`) or prune less.")
    if semantic and semantic.get("auc") is not None:
        mean = semantic["mean"]
        out.append(f"- Neuron paths carry semantics (paper Finding 4): mean path similarity of classes sharing "
                   f"the colour {_num(mean.get('colour_only'), '{:.3f}')}, the shape "
                   f"{_num(mean.get('shape_only'), '{:.3f}')}, nothing {_num(mean.get('none'), '{:.3f}')}; "
                   f"ROC AUC shared vs nothing {semantic['auc']:.3f} (0.5 = no relation).")
    cls_mask = (metrics_runs[0].get("paper") or {}).get("cls_mask")
    if cls_mask and not combined:
        res = cls_mask["results"]
        last = {k: v[-1] for k, v in res.items() if v}
        if last:
            p = next(iter(last.values()))["fraction"]
            parts = ", ".join(f"{k} {_pct(r['top5'])}" for k, r in sorted(last.items(), key=lambda kv: -kv[1]["top5"]))
            out.append(f"- Paper protocol (keep each class's top-{cls_mask['topk']} neurons, zero p = {p:g} of the "
                       f"others at the class token): top-5 {parts}.")
    return out + [""]


# -- tables (single run) --------------------------------------------------------------------------


def _dense(metrics: dict[str, Any]) -> list[str]:
    dense, data = metrics.get("dense"), metrics.get("data", {})
    if not dense:
        return []
    return ["## Dense model", "",
            f"Test partition: {data.get('test', dense.get('test_images'))} images of {data.get('classes')} classes "
            f"({data.get('kind')}).", "",
            *_table(["top-1", "top-5", "params", "MACs / image"],
                    [[_pct(dense["top1"]), _pct(dense["top5"]), _millions(dense["params"]), _millions(dense["macs"])]])]


def _locate(metrics: dict[str, Any]) -> list[str]:
    loc = metrics.get("locate")
    if not loc:
        return []
    settings = ", ".join(f"{k}={loc[k]}" for k in ("steps", "topk", "scope", "formula", "quadrature", "candidates",
                                                    "target") if k in loc)
    out = ["## Neuron paths", "",
           f"Located {loc['images']} probe images with {', '.join(loc['methods'])} ({settings}); "
           f"{loc.get('images_this_run', 0)} computed in this run in {loc.get('seconds', 0):.1f} s "
           f"({_num(loc.get('images_per_second'))} images/s on {loc.get('device')}).", ""]
    masks = metrics.get("masks")
    if masks:
        out += [f"Class masks: top-{masks['topk']} neurons per layer for {masks['classes']} classes from "
                f"{masks['probe_images']} probe images ({masks['method']} paths) in `{masks['file']}`.", ""]
    return out


def _semantic_table(semantic: dict[str, Any] | None, sds: dict[str, float | None] | None = None) -> list[str]:
    from .semantic import GROUPS

    if not semantic:
        return []
    sds = sds or {}

    def f(key: str, value: Any) -> str:
        sd = sds.get(key)
        return _num(value, "{:.3f}") + (f" ± {sd:.3f}" if sd is not None else "")

    rows = [[label, str(semantic["pairs"].get(k)), f(k, semantic["mean"].get(k))] for k, label in GROUPS]
    return ["## Semantic check (paper Finding 4)", "",
            "Class pairs of the shape × colour data by what they share; path similarity = cosine of the classes' "
            f"neuron-utilisation matrices. ROC AUC (Mann–Whitney) of 'shares an attribute' vs 'shares nothing': "
            f"**{f('auc', semantic.get('auc'))}** (shape only {f('auc_shape', semantic.get('auc_shape'))}, colour "
            f"only {f('auc_colour', semantic.get('auc_colour'))}; 0.5 = paths ignore the attributes).", "",
            *_table(["class pairs sharing", "pairs", "mean path similarity"], rows, "---|---:|---:")]


def _paper(metrics: dict[str, Any]) -> list[str]:
    paper = metrics.get("paper", {})
    out: list[str] = []
    table1 = paper.get("intervention")
    if table1:
        out += ["## Paper Table 1: editing the found paths", "",
                "Test partition; path neurons scaled by 0 (removal) or 2 (enhancement) at the attribution scope. "
                "Accuracy deviation in percentage points, probability deviation = relative change of the target "
                "class probability.", "",
                *_table(["method", "path JAS", "removal Δacc", "removal Δp mean / median",
                         "enhance Δacc", "enhance Δp mean / median"],
                        [[m, _num(r["path_jas_mean"], "{:.4g}"), _num(r["removal_acc_dev"]),
                          f"{_num(r['removal_prob_dev_mean'])} / {_num(r['removal_prob_dev_median'])} %",
                          _num(r["enhancement_acc_dev"]),
                          f"{_num(r['enhancement_prob_dev_mean'])} / {_num(r['enhancement_prob_dev_median'])} %"]
                         for m, r in table1.items()], "---|" + "|".join(["---:"] * 5))]
    return out + _cls_mask_table([metrics])


def _pruned_table(stats: Sequence[PruneStat], names: Sequence[str] | None, combined: bool) -> list[str]:
    if not stats:
        return []
    rows = []
    for s in stats:
        rows.append([s.method, f"{100 * s.ratio:.0f} %", "yes" if s.bias_compensation else "no",
                     "all" if s.classes is None else str(len(s.classes)), _pct_pm(s.top1, s.top1_std),
                     "n/a" if s.kept is None else (f"{100 * s.kept:.1f}" + (f" ± {100 * s.kept_std:.1f}"
                                                                            if s.kept_std is not None else "") + " %"),
                     _pct_pm(s.top5, s.top5_std), _millions(s.params), _millions(s.macs)]
                    + ([str(s.runs)] if combined else []))
    out = ["## Structured FFN pruning", "",
           "FFN neurons removed for real (smaller fc1/fc2); accuracy on the test partition of the classes kept; "
           "'kept' = top-1 relative to the dense model on the same images"
           + ("; mean ± sample std over runs." if combined else "."), ""]
    subsets = sorted({s.classes for s in stats if s.classes is not None})
    for cls in subsets:
        out += [f"Class subset {list(cls)}: {_classes_label(cls, names, limit=len(cls))}.", ""]
    return out + _table(["method", "removed", "bias comp.", "classes", "top-1", "kept", "top-5", "params", "MACs"]
                        + (["runs"] if combined else []), rows,
                        "---|---:|---|---:|---:|---:|---:|---:|---:" + ("|---:" if combined else ""))


def _export(metrics: dict[str, Any]) -> list[str]:
    records = metrics.get("export")
    if not records:
        return []
    macs = {None: metrics.get("dense", {}).get("macs")}
    for e in metrics.get("pruned", []):
        macs[e["checkpoint"]] = e["macs"]
    dense_lat = {r.get("batch_size"): r.get("latency_ms_p50") for r in next(
        (rec.get("latency") or [] for rec in records if rec.get("checkpoint") is None), [])}
    rows = []
    for r in records:
        lat = {x.get("batch_size"): x for x in r.get("latency") or []}
        big = max(lat) if lat else None
        speed = (dense_lat.get(big) / lat[big]["latency_ms_p50"]) if big and dense_lat.get(big) else None
        mac_ratio = (macs[None] / macs[r.get("checkpoint")]) if macs.get(r.get("checkpoint")) else None
        rows.append([r["model"], _num(r.get("parity_max_abs"), "{:.1e}"), _pct(r.get("top1_agreement")),
                     *[_num(lat[b]["latency_ms_p50"], "{:.3f}") if b in lat else "n/a" for b in (1, 32)],
                     _num(speed, "{:.2f}×"), _num(mac_ratio, "{:.2f}×"), str(r.get("provider"))])
    return ["## ONNX export", "",
            "Parity = max |Δlogit| vs PyTorch on a real test batch (fp32 tolerance 1e-4). Latency p50 in ONNX Runtime; "
            "speed-up and MACs ratio relative to the dense model.", "",
            *_table(["model", "parity", "top-1 agree", "p50 ms (b=1)", "p50 ms (b=32)", "speed-up (b=32)",
                     "MACs ratio", "provider"], rows, "---|---:|---:|---:|---:|---:|---:|---")]


def _figures_section(figures: Sequence[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    out = ["## Figures", ""]
    for i, (rel, caption) in enumerate(figures, 1):
        out += [f"![{caption}]({rel})", "", f"*Figure {i}. {caption}*", ""]
    return out


def render_report(metrics: dict[str, Any], recipe_text: str, figures: Sequence[tuple[str, str]] = (), *,
                  class_names: Sequence[str] | None = None, semantic: dict[str, Any] | None = None) -> str:
    """The report as markdown: summary, figures (relative path, caption), tables, settings."""
    names = class_names if class_names is not None else _class_names(metrics, None)
    semantic = semantic if semantic is not None else (metrics.get("paper") or {}).get("semantic")
    lines = ["# jas-prune run report", ""]
    lines += _summary([metrics], names, semantic)
    lines += _figures_section(figures)
    lines += _dense(metrics) + _locate(metrics) + _semantic_table(semantic) + _paper(metrics)
    lines += _pruned_table(prune_stats([metrics]), names, combined=False) + _export(metrics)
    run = metrics.get("run", {})
    if run:
        lines += [f"Run time {run.get('seconds', 0):.1f} s on {run.get('device')} (torch {run.get('torch')}).", ""]
    lines += ["## Settings", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


# -- figures of one run ------------------------------------------------------------------------


class _FigureList:
    """Collects (relative path, caption); a figure that fails is logged and skipped."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.items: list[tuple[str, str]] = []

    def add(self, name: str, caption: str | Callable[[], str], draw: Callable[[Path], Path | None]) -> None:
        path = self.out_dir / FIGURES_DIR / f"{name}.png"
        try:
            written = draw(path)
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the report
            log.warning("report: figure %s skipped (%s: %s)", name, type(exc).__name__, exc)
            return
        if written is not None:
            self.items.append((f"{FIGURES_DIR}/{name}.png", caption() if callable(caption) else caption))


def _tradeoff_panels(stats: Sequence[PruneStat], names: Sequence[str] | None, *, by_classes: bool):
    from .figures import Panel

    panels = []
    subsets = sorted({s.classes for s in stats if s.classes is not None}) if by_classes else [None]
    for cls in subsets:
        for comp in (False, True):
            sel = [s for s in stats if s.classes == cls and s.bias_compensation == comp]
            if not sel:
                continue
            series: dict[str, list] = {}
            for s in sel:
                series.setdefault(s.method, []).append((100 * s.removed, 100 * s.top1,
                                                        None if s.top1_std is None else 100 * s.top1_std))
            dense, _ = _mean_std([s.dense_top1 for s in sel])
            sd = next((s.dense_top1_std for s in sel if s.dense_top1_std is not None), None)
            title = ("with" if comp else "without") + " bias compensation"
            if cls is not None:
                title = f"{_classes_label(cls, names, 3)}\n{title}"
            panels.append(Panel(title, series, None if dense is None else 100 * dense,
                                None if sd is None else 100 * sd))
    return panels


def _cls_mask_panels(runs: Sequence[dict[str, Any]]):
    from .figures import Panel

    panels = []
    for metric, title in (("top5", "top-5 (the paper's metric)"), ("top1", "top-1")):
        series: dict[str, list] = {}
        results = [(m.get("paper") or {}).get("cls_mask", {}).get("results", {}) for m in runs]
        for name in results[0]:
            fracs = [r["fraction"] for r in results[0][name]]
            pts = []
            for i, p in enumerate(fracs):
                mean, sd = _mean_std([res[name][i][metric] for res in results if name in res and i < len(res[name])])
                pts.append((100 * p, 100 * mean, None if sd is None else 100 * sd))
            series[name] = pts
        dense, sd = _mean_std([(m.get("dense") or {}).get(metric) for m in runs])
        panels.append(Panel(title, series, None if dense is None else 100 * dense, None if sd is None else 100 * sd))
    return panels


def _cls_mask_figure(figs: _FigureList, runs: Sequence[dict[str, Any]]) -> None:
    from .figures import tradeoff_figure

    cm = (runs[0].get("paper") or {}).get("cls_mask")
    if not cm or not cm.get("results"):
        return
    figs.add("cls_mask_protocol",
             f"Paper protocol (Fig. 6): keep each class's top-{cm['topk']} neurons per layer, zero a random share p "
             f"of the others at the class token in the first {cm['depth']} blocks; higher = the kept mask carries "
             "the class" + ("; mean ± std over runs." if len(runs) > 1 else "."),
             lambda p: tradeoff_figure(p, _cls_mask_panels(runs), title="CLS-token masking protocol" + (
                 f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""),
                                       xlabel="share p of non-mask neurons zeroed (%)", ylabel="test accuracy (%)",
                                       bar_xlabel="mask (at p = {x:.0f} %)"))
    if cm.get("ablation"):
        figs.add("cls_mask_ablation",
                 "Paper protocol ablation (Table 3): top-5 vs share p of the other neurons zeroed, one panel per "
                 "masked depth; darker = more neurons K kept per block; random masks of the same K in grey.",
                 lambda p: tradeoff_figure(p, _cls_mask_ablation_panels(runs),
                                           title="CLS-token masking ablation: top-K × depth × p" + (
                                               f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""),
                                           xlabel="share p of non-mask neurons zeroed (%)",
                                           ylabel="test top-5 (%)", bar_xlabel="mask (at p = {x:.0f} %)"))


def _cls_mask_ablation_panels(runs: Sequence[dict[str, Any]]):
    from .figures import Panel, method_colour

    rows = [r for m in runs for r in (((m.get("paper") or {}).get("cls_mask") or {}).get("ablation") or [])]
    depths = sorted({r["depth"] for r in rows})
    ks = sorted({r["topk"] for r in rows})
    shade = {k: 0.45 + 0.55 * (i + 1) / len(ks) for i, k in enumerate(ks)}
    panels = []
    for d in depths:
        series: dict[str, list] = {}
        colours: dict[str, str] = {}
        for mask in dict.fromkeys(r["mask"] for r in rows):
            for k in ks:
                at = [r for r in rows if r["mask"] == mask and r["topk"] == k and r["depth"] == d]
                if not at:
                    continue
                label = f"{mask} K={k}"
                series[label] = []
                for p in sorted({r["fraction"] for r in at}):
                    mean, sd = _mean_std([r["top5"] for r in at if r["fraction"] == p])
                    series[label].append((100 * p, 100 * mean, None if sd is None else 100 * sd))
                rgb = np.array(_hex_rgb(method_colour(mask)))
                colours[label] = "#%02x%02x%02x" % tuple(int(c) for c in 255 - (255 - rgb) * shade[k])
        dense, sd = _mean_std([(m.get("dense") or {}).get("top5") for m in runs])
        panels.append(Panel(f"first {d} block{'s' if d > 1 else ''} masked", series,
                            None if dense is None else 100 * dense, None if sd is None else 100 * sd, colours))
    return panels


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def _pruning_figures(figs: _FigureList, runs: Sequence[dict[str, Any]], names: Sequence[str] | None) -> None:
    from .figures import tradeoff_figure

    stats = prune_stats(runs)
    band = f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""
    if any(s.classes is None for s in stats):
        general = [s for s in stats if s.classes is None]
        figs.add("pruning_tradeoff",
                 f"Structured FFN pruning: test top-1 vs share of FFN neurons removed, per method{band}; dotted = "
                 "dense. Higher is better.",
                 lambda p: tradeoff_figure(p, _tradeoff_panels(general, names, by_classes=False),
                                           title=f"Pruning trade-off (all classes){band}",
                                           xlabel="FFN neurons removed (%)", ylabel="test top-1 (%)"))
    if any(s.classes is not None for s in stats):
        spec = [s for s in stats if s.classes is not None]
        figs.add("pruning_classes",
                 f"Class-specialised pruning: top-1 on the kept classes' test images{band}; dotted = dense on the "
                 "same images.",
                 lambda p: tradeoff_figure(p, _tradeoff_panels(spec, names, by_classes=True),
                                           title=f"Class-specialised pruning{band}",
                                           xlabel="FFN neurons removed (%)",
                                           ylabel="test top-1 on the kept classes (%)"))


def _sample_images(recipe: dict[str, Any], classes: Iterable[int]) -> dict[int, np.ndarray]:
    """One probe image per class (un-normalised RGB), from the data source the recipe names."""
    from .data import ImageDataset, build_source

    d, rt = recipe.get("data") or {}, recipe.get("runtime") or {}
    seed = int(rt.get("seed", 0))
    source = build_source(d.get("kind", "shapes"), root=d.get("root"), seed=seed,
                          probe_fraction=d.get("probe_fraction", 0.8), images_per_class=d.get("images_per_class"))
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


def _path_figures(figs: _FigureList, run_dir: Path, metrics: dict[str, Any], recipe: dict[str, Any], masks,
                  semantic: dict[str, Any] | None, groups) -> None:
    from .figures import semantic_figure
    from .figures_paths import choose_classes, neuron_paths_figure, similar_images_figure, similarity_figure

    if masks is None:
        return
    counts = masks.counts.numpy()
    sim = masks.similarity.numpy()
    names = masks.class_names
    valid = counts > 0
    chosen = choose_classes(counts, sim, k=4)
    n_probe = (metrics.get("data") or {}).get("probe") or (metrics.get("locate") or {}).get("images")
    probe_dir = run_dir / "paths" / "probe"
    if n_probe and probe_dir.is_dir():
        def draw_paths(p: Path) -> Path | None:
            from .pathstore import PathStore
            from .runner import CHUNK_SIZE

            located = PathStore(probe_dir, chunk_size=CHUNK_SIZE).read(int(n_probe), scores=False)
            method = (metrics.get("masks") or {}).get("method") or next(iter(located.paths))
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
        return similar_images_figure(p, sim, names, strip, _sample_images(recipe, need), valid=valid)

    figs.add("similar_classes",
             f"Sample probe images of {', '.join(names[c] for c in strip)} next to the 3 most (green) and 3 least "
             "(red) similar classes by neuron path.", draw_images)
    if semantic is not None:
        figs.add("semantic_check",
                 "Semantic check (paper Finding 4): path similarity of class pairs sharing the shape only, the colour "
                 "only, or nothing; ROC AUC well above 0.5 = paths follow the visual attributes.",
                 lambda p: semantic_figure(p, groups, semantic))


def _table1_and_deployment_figures(figs: _FigureList, metrics: dict[str, Any]) -> None:
    from .figures import deployment_figure, table1_figure

    table1 = (metrics.get("paper") or {}).get("intervention")
    if table1:
        figs.add("table1", "Paper Table 1: mean JAS of each method's paths, and the accuracy / probability change "
                 "when the path neurons are removed (×0) or enhanced (×2); JAS should move both the most.",
                 lambda p: table1_figure(p, table1))
    records = metrics.get("export")
    if records:
        macs = {None: (metrics.get("dense") or {}).get("macs")}
        labels: dict[Any, str] = {None: "dense"}
        for e in metrics.get("pruned") or []:
            macs[e["checkpoint"]] = e.get("macs")
            labels[e["checkpoint"]] = (f"{e['method']} {100 * e['ratio']:.0f} %"
                                       + (" +bc" if e.get("bias_compensation") else "")
                                       + ("" if e.get("classes") is None else f" ({len(e['classes'])} cl.)"))
        figs.add("deployment", "Deployment: measured ONNX Runtime p50 latency against MACs per image, one point per "
                 "exported model (lower-left is better).", lambda p: deployment_figure(p, records, macs, labels))


def write_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.md`` and ``figures/*.png`` in a run directory, without running a model."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").exists() else ""
    recipe = _recipe_dict(recipe_text)
    masks = _load_masks(run_dir)
    names = _class_names(metrics, masks)
    try:
        semantic, groups = _semantic(metrics, masks)
    except Exception as exc:  # noqa: BLE001
        log.warning("report: semantic check skipped (%s)", exc)
        semantic, groups = (metrics.get("paper") or {}).get("semantic"), None
    figs = _FigureList(run_dir)
    _pruning_figures(figs, [metrics], names)
    _cls_mask_figure(figs, [metrics])
    _path_figures(figs, run_dir, metrics, recipe, masks, semantic, groups)
    _table1_and_deployment_figures(figs, metrics)
    text = render_report(metrics, recipe_text, figs.items, class_names=names, semantic=semantic)
    return atomic_write_text(run_dir / "report.md", text)


# -- combined report over seeds -------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


#: The only recipe key that may differ between combined runs.
COMBINE_FREE_KEYS = ("runtime.seed",)


def _check_same_recipe(run_dirs: Sequence[Path], recipes: Sequence[dict[str, Any]],
                       runs: Sequence[dict[str, Any]]) -> None:
    ref = _flatten(recipes[0])
    for d, r, m in zip(run_dirs[1:], recipes[1:], runs[1:]):
        flat = _flatten(r)
        for key in sorted(set(ref) | set(flat)):
            if key not in COMBINE_FREE_KEYS and ref.get(key, "<missing>") != flat.get(key, "<missing>"):
                raise RecipeError(f"--combine: {d} differs from {run_dirs[0]} in {key} "
                                  f"({ref.get(key, '<missing>')!r} vs {flat.get(key, '<missing>')!r}); "
                                  f"only {', '.join(COMBINE_FREE_KEYS)} may differ between combined runs")
        a = (runs[0].get("fingerprint") or {}).get("model")
        b = (m.get("fingerprint") or {}).get("model")
        if a and b and a != b:
            raise RecipeError(f"--combine: {d} differs from {run_dirs[0]} in the model weights "
                              f"(fingerprint.model {b[:12]}… vs {a[:12]}…)")


def _cls_mask_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The CLS-mask protocol (and its ablation, when run): top-5 (top-1), mean ± std over runs."""
    cm = (runs[0].get("paper") or {}).get("cls_mask")
    if not cm:
        return []
    over = f"mean ± sample std over {len(runs)} runs" if len(runs) > 1 else f"{cm.get('test_images')} test images"
    results = [(m.get("paper") or {}).get("cls_mask", {}).get("results", {}) for m in runs]
    fr = cm["fractions"]

    def cell(rows_per_run: list[list[dict[str, Any]]], i: int) -> str:
        at = [rows[i] for rows in rows_per_run if i < len(rows)]
        t5, t1 = _mean_std([r["top5"] for r in at]), _mean_std([r["top1"] for r in at])
        return f"{_pct_pm(*t5)} ({_pct_pm(*t1)})"

    rows = [[name, *[cell([res.get(name, []) for res in results], i) for i in range(len(fr))]]
            for name in results[0]]
    out = ["## Paper protocol: CLS-token masking", "",
           f"Keep each class's top-{cm['topk']} neurons per layer, zero a random fraction p of the others at the "
           f"class token in the first {cm['depth']} blocks; top-5 (top-1), {over}.",
           "", *_table(["mask", *[f"p = {p:g}" for p in fr]], rows, "---|" + "|".join(["---:"] * len(fr)))]
    if cm.get("ablation"):
        keys = list(dict.fromkeys((r["mask"], r["topk"], r["depth"]) for r in cm["ablation"]))
        by_run = [{(r["mask"], r["topk"], r["depth"], r["fraction"]): r
                   for r in ((m.get("paper") or {}).get("cls_mask") or {}).get("ablation", [])} for m in runs]
        rows = [[mask, str(k), str(d), *[cell([[b[(mask, k, d, p)]] if (mask, k, d, p) in b else [] for b in by_run], 0)
                                        for p in fr]]
                for mask, k, d in sorted(keys, key=lambda t: (t[1], t[2], t[0] == "random"))]
        out += ["### Ablation: top-K × depth × fraction (paper Table 3)", "",
                f"The class's K most frequent path neurons (or K random ones) kept in every block, the others "
                f"zeroed with probability p at the class token in the first `depth` blocks; top-5 (top-1), {over}.",
                "", *_table(["mask", "K", "depth", *[f"p = {p:g}" for p in fr]], rows,
                            "---|---:|---:|" + "|".join(["---:"] * len(fr)))]
    return out


def render_combined(run_dirs: Sequence[Path], runs: Sequence[dict[str, Any]], recipe_text: str,
                    figures: Sequence[tuple[str, str]] = (), *, seeds: Sequence[Any] = (),
                    class_names: Sequence[str] | None = None, semantics: Sequence[dict[str, Any]] = ()) -> str:
    """Markdown of the combined report (mean ± sample std over runs)."""
    seeds = list(seeds) or ["?"] * len(runs)
    lines = [f"# jas-prune combined report ({len(runs)} runs)", "",
             "Runs (same recipe, different `runtime.seed`): "
             + ", ".join(f"`{d}` (seed {s})" for d, s in zip(run_dirs, seeds)) + ".", ""]
    semantic = None
    sem_sd: dict[str, float | None] = {}
    if semantics:
        from .semantic import GROUPS

        semantic = {"pairs": semantics[0]["pairs"], "mean": {}}
        for k, _ in GROUPS:
            semantic["mean"][k], sem_sd[k] = _mean_std([s["mean"].get(k) for s in semantics])
        for k in ("auc", "auc_shape", "auc_colour"):
            semantic[k], sem_sd[k] = _mean_std([s.get(k) for s in semantics])
    lines += _summary(runs, class_names, semantic)
    lines += _figures_section(figures)
    lines += _pruned_table(prune_stats(runs), class_names, combined=True)
    lines += _cls_mask_table(runs)
    lines += _semantic_table(semantic, sem_sd)
    lines += ["## Settings", "", f"Shared by every run except `runtime.seed` ({', '.join(map(str, seeds))}); "
              "shown with the first run's seed.", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def combine_reports(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``OUT/report.md`` + ``OUT/figures/`` over runs that differ only in ``runtime.seed``.

    Raises:
        OutputDirError: a directory that is not a run, the same run twice, or OUT being one of them.
        RecipeError: recipes (or model weights) that differ in anything but ``runtime.seed``, naming the key.
    """
    dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    if len(dirs) < 2:
        raise OutputDirError("--combine: give at least two run directories")
    resolved = [d.resolve() for d in dirs]
    for d, r in zip(dirs, resolved):
        if resolved.count(r) > 1:
            raise OutputDirError(f"--combine: {d} is given twice")
        for f in ("metrics.json", "recipe.yaml"):
            if not (d / f).is_file():
                raise OutputDirError(f"--combine: {d} has no {f} (not a jas-prune run directory)")
    if out.resolve() in resolved:
        raise OutputDirError(f"--out {out}: is one of the combined runs; choose a separate directory")
    runs = [read_json(d / "metrics.json") for d in dirs]
    texts = [(d / "recipe.yaml").read_text(encoding="utf-8") for d in dirs]
    recipes = [_recipe_dict(t) for t in texts]
    _check_same_recipe(dirs, recipes, runs)
    seeds = [(r.get("runtime") or {}).get("seed") for r in recipes]
    masks0 = _load_masks(dirs[0])
    names = _class_names(runs[0], masks0)
    semantics = []
    for d, m in zip(dirs, runs):
        try:
            s, _ = _semantic(m, _load_masks(d))
        except Exception as exc:  # noqa: BLE001
            log.warning("report: semantic check of %s skipped (%s)", d, exc)
            s = None
        if s is not None:
            semantics.append(s)
    if len(semantics) != len(runs):
        semantics = []
    from .io import writable_dir

    writable_dir(out, f"--out {out}")
    figs = _FigureList(out)
    _pruning_figures(figs, runs, names)
    _cls_mask_figure(figs, runs)
    text = render_combined(dirs, runs, texts[0], figs.items, seeds=seeds, class_names=names, semantics=semantics)
    return atomic_write_text(out / "report.md", text)
