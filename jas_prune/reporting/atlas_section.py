"""The report's atlas section, from ``metrics.json``'s ``atlas`` entry alone (the atlas itself is
built by the run or ``jas-prune atlas``; nothing here runs a model)."""

from __future__ import annotations

from ..metrics import AtlasInfo, Metrics
from .format import num, table

__all__ = ["atlas_section"]

#: class figures shown inline in report.md (all of them are in atlas/ and atlas.html)
INLINE_FIGURES = 3


def _ratio_rows(atlas: AtlasInfo) -> list[list[str]]:
    return [[r["class"], f"`{r['neuron']}`", num(r.get("test_same"), "{:.3g}"), num(r.get("test_other"), "{:.3g}"),
             num(r.get("test_ratio")), num(r.get("probe_ratio"))] for r in atlas.colour_check or []]


def atlas_section(metrics: Metrics) -> list[str]:
    """Link to ``atlas.html``, the colour check, shared vs class-specific neurons, a few class figures."""
    a = metrics.atlas
    if a is None:
        return []
    what = "the class-token activation" if a.scope == "cls" else "the activation averaged over tokens"
    out = ["## Neuron atlas", "",
           f"[`{a.page}`]({a.page}) (one self-contained page, works offline): for {len(a.classes)} classes, their most "
           f"frequent `{a.method}` path neuron per block ({len(a.neurons)} neurons); per neuron the {a.k} probe images "
           f"that activate it most ({what}, attribution scope `{a.scope}`) with its activation per patch over them, "
           "its activation per class and its share of each class's paths and path JAS.", ""]
    if a.colour_check:
        rows = _ratio_rows(a)
        by = a.colour_by_block or {}
        first = next(iter(by.values()), None)
        out += ["Colour check (paper Finding 4): each class's first-block path neuron, mean activation on test images "
                "of the class's colour vs the other colours (ratio = same / other, where the other colours' mean is "
                "positive)" + (f"; the colour's mean is higher for {first['same_above_other']} of "
                               f"{first['classes']} classes." if first else "."), ""]
        out += table(["class", "neuron", "same colour", "other colours", "ratio (test)", "ratio (probe)"], rows)
        if by:
            out += ["The same check on every block's path neuron (test partition):", ""]
            out += table(["block", "classes", "same colour above other", "median ratio (of defined)"],
                         [[b, str(v["classes"]), str(v["same_above_other"]),
                           f"{num(v['median_ratio'])} (of {v['ratios']})"] for b, v in by.items()])
    if a.shared:
        s = a.shared
        out += [f"Shared vs class-specific: {s['shared']} path neurons are shared by several of the classes, "
                f"{s['specific']} belong to one class only." + (" Most shared:" if s["most_shared"] else ""), ""]
        if s["most_shared"]:
            out += table(["neuron", "classes", "which (first 6)"],
                         [[f"`{r['neuron']}`", str(r["classes"]), ", ".join(r["names"])] for r in s["most_shared"]])
        out += table(["block", "path neurons", "class-specific", "most classes on one neuron"],
                     [[b, str(v["neurons"]), str(v["specific"]), str(v["max_classes"])]
                      for b, v in s["per_block"].items()])
    for rel in a.figures[:INLINE_FIGURES]:
        out += [f"![atlas figure]({rel})", ""]
    if len(a.figures) > INLINE_FIGURES:
        out += [f"*{len(a.figures) - INLINE_FIGURES} more class figures in `atlas/` and in the page.*", ""]
    if a.seconds is not None:
        out += [f"Atlas cost: {a.seconds:.1f} s, peak RSS {num(a.peak_rss_mb, '{:.0f}')} MB "
                f"(state held {num(a.state_mb, '{:.2f}')} MB), {a.images} probe images streamed.", ""]
    return out
