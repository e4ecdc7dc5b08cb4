"""``report.md``: built from ``metrics.json`` and ``recipe.yaml`` alone, so it can be rebuilt
without recomputing anything (``jas-prune report RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from .io import atomic_write_text, read_json

__all__ = ["write_report", "render_report"]


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _millions(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e6:.3f} M"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "|".join(["---"] + ["---:"] * (len(header) - 1))
    return ["| " + " | ".join(header) + " |", f"|{align}|", *("| " + " | ".join(r) + " |" for r in rows), ""]


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
    cls_mask = paper.get("cls_mask")
    if cls_mask:
        fr = cls_mask["fractions"]
        out += ["## Paper protocol: CLS-token masking", "",
                f"Keep each class's top-{cls_mask['topk']} neurons per layer, zero a random fraction p of the others "
                f"at the class token in the first {cls_mask['depth']} blocks; top-5 (top-1) on "
                f"{cls_mask['test_images']} test images.", "",
                *_table(["mask", *[f"p = {p:g}" for p in fr]],
                        [[name, *[f"{_pct(r['top5'])} ({_pct(r['top1'])})" for r in rows]]
                         for name, rows in cls_mask["results"].items()], "---|" + "|".join(["---:"] * len(fr)))]
    return out


def _pruned(metrics: dict[str, Any]) -> list[str]:
    entries = metrics.get("pruned")
    if not entries:
        return []
    dense = metrics.get("dense", {})
    rows = []
    for e in sorted(entries, key=lambda e: (str(e.get("classes")), e["ratio"], -e["top1"])):
        base = e.get("dense_top1") or dense.get("top1")
        kept = f"{100 * e['top1'] / base:.1f} %" if base else "n/a"
        rows.append([e["method"], f"{100 * e['ratio']:.0f} %", "yes" if e["bias_compensation"] else "no",
                     "all" if e.get("classes") is None else str(len(e["classes"])), _pct(e["top1"]), kept,
                     _pct(e["top5"]), _millions(e["params"]), _millions(e["macs"])])
    return ["## Structured FFN pruning", "",
            "FFN neurons removed for real (smaller fc1/fc2); accuracy on the test partition of the classes kept; "
            "'kept' = top-1 relative to the dense model on the same images.", "",
            *_table(["method", "removed", "bias comp.", "classes", "top-1", "kept", "top-5", "params", "MACs"], rows,
                    "---|---:|---|---:|---:|---:|---:|---:|---:")]


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


def render_report(metrics: dict[str, Any], recipe_text: str) -> str:
    """The report as markdown."""
    lines = ["# jas-prune run report", ""]
    for part in (_dense, _locate, _paper, _pruned, _export):
        lines += part(metrics)
    run = metrics.get("run", {})
    if run:
        lines += [f"Run time {run.get('seconds', 0):.1f} s on {run.get('device')} (torch {run.get('torch')}).", ""]
    lines += ["## Settings", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.md`` in a run directory."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").exists() else ""
    return atomic_write_text(run_dir / "report.md", render_report(metrics, recipe_text))
