"""The report's opening section, the one a reader acts on: dense accuracy, the best method per
pruning budget (by test top-1, never by latency), the largest budget that keeps most of the
dense accuracy, and one line each for the semantic check and the CLS-mask protocol."""

from __future__ import annotations

from typing import Sequence

from ..metrics import Metrics, SemanticCheck
from .format import mean_std, millions, num, pct, pct_pm, table
from .latency import speedups
from .stats import RECONSTRUCTION_ORDER, best_per_budget, paired_differences, prune_stats
from .tables import classes_label, recon_text, selection_label

__all__ = ["summary_section", "KEEP_TARGETS"]

#: Share of the dense top-1 the summary's recommendation asks to keep.
KEEP_TARGETS = (0.99, 0.95)


def _speed_texts(runs: Sequence[Metrics]) -> dict[str, str]:
    """Checkpoint -> its shape's speed-up text (one run), or the mean over runs."""
    per_run = [speedups(m) for m in runs]
    if len(runs) == 1:
        return {k: sp.text() for k, sp in per_run[0].items()}
    out = {}
    for k, sp in per_run[0].items():
        mean, sd = mean_std([p[k].value for p in per_run if k in p])
        out[k] = f"{mean:.2f}×" + (f" ± {sd:.2f}" if sd is not None else "") + f" (b={sp.batch_size})"
    return out


def summary_section(runs: Sequence[Metrics], names: Sequence[str] | None,
                    semantic: SemanticCheck | None) -> list[str]:
    """``## Summary`` of one run, or of several runs of one recipe (mean ± std)."""
    combined = len(runs) > 1
    dense_top1, dense_sd = mean_std([m.dense.top1 if m.dense is not None else None for m in runs])
    dense = runs[0].dense
    out = ["## Summary", ""]
    if dense_top1 is not None and dense is not None:
        out += [f"- Dense model: top-1 {pct_pm(dense_top1, dense_sd)}, {millions(dense.params)} params, "
                f"{millions(dense.macs)} MACs per image"
                + (f" (mean ± std over {len(runs)} runs)." if combined else ".")]
    n_classes = runs[0].data.classes if runs[0].data is not None else None
    at_chance = bool(dense_top1 is not None and n_classes and dense_top1 <= 1.5 / n_classes)
    if at_chance:
        out.append(f"- The dense model is at chance level ({pct_pm(dense_top1, dense_sd)} top-1 with {n_classes} "
                   "classes; random-init weights?): the accuracy figures below cannot tell methods apart.")
    stats = prune_stats(runs)
    best = best_per_budget(stats)
    speed = _speed_texts(runs)
    if best:
        d_params = dense.params if dense is not None else None
        d_macs = dense.macs if dense is not None else None

        def rel(v: float | None, d: float | None) -> str:
            return f"{millions(v)} ({100 * v / d:.0f} %)" if v is not None and d else millions(v)

        rows = []
        for s in best:
            tied = sorted({t.method for t in stats if (t.selection, t.ratio) == (s.selection, s.ratio)
                           and t.method != s.method and (t.top1, t.top5) == (s.top1, s.top5)})
            rows.append([f"{100 * s.ratio:.0f} %", selection_label(s, names) if s.subset_size is not None
                         else classes_label(s.classes, names, 2),
                         f"**{s.method}**" + (f" (tied: {', '.join(tied)})" if tied else ""),
                         recon_text(s), pct_pm(s.top1, s.top1_std),
                         pct_pm(s.kept, s.kept_std), rel(s.params, d_params), rel(s.macs, d_macs),
                         speed.get(s.checkpoint or "", "n/a")])
        new = any(t.recorded_reconstruction for t in stats)
        header = ["FFN neurons removed", "classes", "best method", "reconstruction" if new else "bias comp.", "top-1",
                  "kept", "params", "MACs", "ONNX speed-up"]
        align = "---:|---|---|---|---:|---:|---:|---:|---:"
        if not any(s.checkpoint in speed for s in best):  # no export: no speed-up column
            header, align, rows = header[:-1], align[:-5], [r[:-1] for r in rows]
        out += ["", "Best method per pruning budget (by test top-1"
                + (", mean ± std over runs" if combined else "") + "; 'kept' = share of the dense top-1 on the "
                "same images; params and MACs relative to dense"
                + ("; ONNX speed-up = dense p50 / pruned p50 latency of the model's shape, with its measurement "
                   "spread" if len(header) == 9 else "") + "):", "",
                *table(header, rows, align)]
        general = [s for s in best if s.general and s.kept is not None]
        for target in KEEP_TARGETS if not at_chance else ():
            ok = [s for s in general if s.kept >= target]  # type: ignore[operator]
            if ok:
                s = max(ok, key=lambda s: s.ratio)
                how = {"bias": " + bias compensation", "lsq": " + least-squares reconstruction"}.get(
                    s.reconstruction, "")
                out.append(f"- To keep ≥ {100 * target:.0f} % of the dense top-1, remove up to "
                           f"**{100 * s.ratio:.0f} %** of the FFN neurons with **{s.method}**{how} "
                           f"(top-1 {pct_pm(s.top1, s.top1_std)}, {millions(s.params)} params).")
                break
        else:
            if general and not at_chance:
                s = min(general, key=lambda s: (s.ratio, -s.top1))
                out.append(f"- No budget keeps ≥ {100 * KEEP_TARGETS[-1]:.0f} % of the dense top-1; the smallest "
                           f"({100 * s.ratio:.0f} % removed) keeps {100 * s.kept:.1f} % with {s.method}: fine-tune "
                           "(`prune.finetune`) or prune less.")
    out += _paired_lines(runs)
    if semantic is not None and semantic.auc is not None:
        mean = semantic.mean
        out.append(f"- Neuron paths carry semantics (paper Finding 4): mean path similarity of classes sharing "
                   f"the colour {num(mean.get('colour_only'), '{:.3f}')}, the shape "
                   f"{num(mean.get('shape_only'), '{:.3f}')}, nothing {num(mean.get('none'), '{:.3f}')}; "
                   f"ROC AUC shared vs nothing {semantic.auc:.3f} (0.5 = no relation).")
    cls_mask = runs[0].paper.cls_mask if runs[0].paper is not None else None
    if cls_mask is not None and not combined:
        last = {k: v[-1] for k, v in cls_mask.results.items() if v}
        if last:
            p = next(iter(last.values())).fraction
            parts = ", ".join(f"{k} {pct(r.top5)}" for k, r in sorted(last.items(), key=lambda kv: -kv[1].top5))
            out.append(f"- Paper protocol (keep each class's top-{cls_mask.topk} neurons, zero p = {p:g} of the "
                       f"others at the class token): top-5 {parts}.")
    return out + [""]


def _paired_lines(runs: Sequence[Metrics]) -> list[str]:
    """One line per class selection: JAS minus the best other criterion per run, under the
    strongest reconstruction the runs made (details in the section of its own)."""
    diffs = paired_differences(runs)
    if not diffs:
        return []
    strongest = max((d.reconstruction for d in diffs),
                    key=lambda r: RECONSTRUCTION_ORDER.index(r) if r in RECONSTRUCTION_ORDER else -1)
    out = []
    for sel in dict.fromkeys(d.selection for d in diffs):
        at = [d for d in diffs if d.selection == sel and d.reconstruction == strongest]
        if not at:
            continue
        what = "every class" if sel == ("all",) else (f"random {sel[1]}-class subsets" if sel[0] == "subsets"
                                                      else "prune.classes")
        parts = ", ".join(f"{100 * d.ratio:.0f} % {100 * d.mean:+.2f}" + (f" ± {100 * d.std:.2f}" if d.std is not None
                                                                          else "") + f" ({d.wins}/{len(d.per_run)})"
                          for d in at)
        out.append(f"- JAS − best other criterion ({what}, reconstruction {strongest}, pp"
                   + (", mean ± std over runs, runs where JAS ≥ best" if len(runs) > 1 else ", JAS ≥ best") + f"): {parts}.")
    return out
