"""ONNX Runtime speed-up of FFN pruning against its MACs ratio, on a real-sized ViT.

Pruning removes MACs; whether a runtime turns them into time depends on the shapes: on a tiny
model per-op overhead hides them, on ViT-B/16 the FFN matmuls dominate. This benchmark takes a
random-init timm model (weights do not change the time), removes the same share of FFN neurons
in every block (``prune_ffn``, uniform, magnitude scores) at each ratio, exports dense and pruned
models to ONNX (checked against PyTorch), and times them in ONNX Runtime on the CPU, interleaved
(:func:`jas_prune.deploy.latency.benchmark_many`: every round runs every model in a rotating
order; a speed-up is the median over rounds of dense / pruned measured moments apart, with a
bootstrap interval). Per model and batch size it reports the MACs ratio dense / pruned (counted
as the repo does, :func:`jas_prune.evaluate.count_params_macs`), the speed-up and
``efficiency`` = speed-up / MACs ratio (1.0: time falls exactly as MACs do).

``--round-to N ...`` adds models pruned at ``--round-ratios`` with ``prune_ffn(..., round_to=N)``
(kept widths a multiple of N), when ``prune_ffn`` has that parameter; otherwise the JSON says so.

Run: ``python -m benchmarks.bench_onnx --out DIR [--model vit_base_patch16_224] [--ratios 0.3 0.5 0.7]
[--batch-sizes 1 32] [--repeats 15 5] [--iters 4 1]``; ``--model tiny`` is a 2-block 32 px model
for tests. ``DIR/onnx.json`` holds every figure; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jas_prune.deploy import benchmark_many, export_onnx, verify_onnx
from jas_prune.errors import InvalidArgumentError
from jas_prune.evaluate import count_params_macs
from jas_prune.io import atomic_write_json
from jas_prune.models import input_size
from jas_prune.pruning.criteria.magnitude import magnitude_scores
from jas_prune.pruning.prune import discover_widths, prune_ffn

__all__ = ["Variant", "TINY", "build_model", "round_to_supported", "variants", "run", "markdown", "main"]

#: ``--model tiny``: a 2-block, 32 px ViT (FFN width 64), small enough for a test.
TINY = "tiny"
#: The efficiency (speed-up / MACs ratio) the issue asks for at the large batch.
TARGET_EFFICIENCY = 0.9


@dataclass(frozen=True)
class Variant:
    """One model to time: the dense reference (``ratio`` None) or a pruned one."""

    label: str
    ratio: float | None = None
    round_to: int | None = None


def build_model(name: str, num_classes: int | None, seed: int) -> nn.Module:
    """A random-init timm model in eval mode (``tiny``: the test-sized ViT)."""
    import timm

    torch.manual_seed(seed)
    if name == TINY:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=2, mlp_ratio=2.0, num_classes=num_classes or 10).eval()
    kw = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kw).eval()


def round_to_supported() -> bool:
    """Whether :func:`prune_ffn` accepts ``round_to`` (kept widths a multiple of N)."""
    return "round_to" in inspect.signature(prune_ffn).parameters


def variants(ratios: Sequence[float], round_to: Sequence[int], round_ratios: Sequence[float]) -> list[Variant]:
    """Dense, one per ratio, then one per (round ratio, round_to) — the latter only when
    :func:`prune_ffn` supports ``round_to``."""
    out = [Variant("dense")] + [Variant(f"p{r:g}", r) for r in ratios]
    if round_to and round_to_supported():
        out += [Variant(f"p{r:g}-r{n}", r, n) for r in round_ratios for n in round_to]
    return out


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _width_text(widths: dict[int, int]) -> str:
    vals = sorted(set(widths.values()))
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"


def _prepare(dense: nn.Module, v: Variant, out: Path, example: torch.Tensor, opset: int) -> dict[str, Any]:
    """Prune (unless dense), count, export and verify one variant; its model record."""
    model = dense
    if v.ratio is not None:
        model = copy.deepcopy(dense)
        kw = {"round_to": v.round_to} if v.round_to is not None else {}
        prune_ffn(model, magnitude_scores(model), ratio=v.ratio, mode="uniform", **kw)
    chw = tuple(input_size(model))
    size = count_params_macs(model, chw)
    path = out / "onnx" / f"{v.label}.onnx"
    info = export_onnx(model, path, opset=opset)
    check = verify_onnx(path, model, example)
    widths = discover_widths(model)
    return {"label": v.label, "ratio": v.ratio, "round_to": v.round_to, "widths": {str(k): w for k, w in widths.items()},
            "width": _width_text(widths), "params": size["params"], "macs": size["macs"], "path": str(path),
            "onnx_bytes": info["size_bytes"], "exporter": info["exporter"], "export_seconds": round(info["seconds"], 2),
            "parity_max_abs": check["parity_max_abs"], "top1_agreement": check["top1_agreement"]}


def _quantized(models: list[dict[str, Any]], precisions: Sequence[str], example: torch.Tensor,
               seed: int) -> list[dict[str, Any]]:
    """``--precision``: INT8 copies of every model, timed with them (labels ``LABEL@PRECISION``).
    Static calibration reads 16 random images (weights are random too: only the time counts) and
    quantises every matrix product (the ladder's first rung)."""
    from jas_prune.deploy.quantize import precision_path, quantize_dynamic_file, quantize_static_file

    calib = torch.randn(16, *example.shape[1:], generator=torch.Generator().manual_seed(seed)).numpy()
    out = []
    for m in models:
        for p in [p for p in precisions if p != "fp32"]:
            t = time.perf_counter()
            path = precision_path(m["path"], p)
            if p == "int8_static":
                quantize_static_file(m["path"], path, calib)
            else:
                quantize_dynamic_file(m["path"], path)
            out.append({**m, "label": f"{m['label']}@{p}", "precision": p, "path": str(path),
                        "onnx_bytes": path.stat().st_size, "export_seconds": round(time.perf_counter() - t, 2)})
            print(f"{out[-1]['label']}: quantised in {out[-1]['export_seconds']:.1f}s", flush=True)
    return out


def _per_batch(values: Sequence[int], batch_sizes: Sequence[int], name: str) -> list[int]:
    if len(values) == 1:
        return list(values) * len(batch_sizes)
    if len(values) != len(batch_sizes):
        raise InvalidArgumentError(f"--{name}: give one value or one per batch size ({len(batch_sizes)}), "
                                   f"not {len(values)}")
    return list(values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns what ``onnx.json`` holds."""
    if any(not 0.0 < r < 1.0 for r in [*args.ratios, *args.round_ratios]):
        raise InvalidArgumentError("--ratios/--round-ratios: each ratio is the fraction of FFN neurons removed, in (0, 1)")
    repeats = _per_batch(args.repeats, args.batch_sizes, "repeats")
    iters = _per_batch(args.iters, args.batch_sizes, "iters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dense = build_model(args.model, args.num_classes, args.seed)
    example = torch.randn(2, *input_size(dense), generator=torch.Generator().manual_seed(args.seed))
    start = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _load()}
    models = []
    for v in variants(args.ratios, args.round_to, args.round_ratios):
        t = time.perf_counter()
        models.append(_prepare(dense, v, out, example, args.opset))
        print(f"{v.label}: width {models[-1]['width']}, {models[-1]['macs'] / 1e9:.3f} GMACs, exported and "
              f"verified in {time.perf_counter() - t:.1f}s", flush=True)
    models += _quantized(models, args.precision, example, args.seed)
    dense_macs = models[0]["macs"]
    for m in models:
        m["macs_ratio"] = dense_macs / m["macs"]
    paths = {m["label"]: m["path"] for m in models}
    timings: dict[str, list[dict[str, Any]]] = {m["label"]: [] for m in models}
    rows = []
    for bs, rep, it in zip(args.batch_sizes, repeats, iters):
        before = _load()
        t = time.perf_counter()
        timed = benchmark_many(paths, reference="dense", batch_sizes=(bs,), warmup=args.warmup, repeats=rep,
                               iters=it, providers=("cpu",), threads=threads, seed=args.seed)
        seconds, after = time.perf_counter() - t, _load()
        print(f"batch {bs}: {rep} interleaved rounds of {it} run(s) per model in {seconds:.0f}s "
              f"(load average {before} -> {after})", flush=True)
        for m in models:
            rec = timed[m["label"]][0]
            rec["load_average"] = [before, after]
            timings[m["label"]].append(rec)
            sp = rec.get("speedup")
            rows.append({
                "label": m["label"], "precision": m.get("precision", "fp32"), "ratio": m["ratio"], "round_to": m["round_to"], "width": m["width"],
                "batch_size": bs, "macs_ratio": m["macs_ratio"], "latency_ms_p50": rec["latency_ms_p50"],
                "latency_ms_p25": rec["latency_ms_p25"], "latency_ms_p75": rec["latency_ms_p75"],
                "repeats": rec["repeats"], "iters": it,
                "speedup": sp["median"] if sp else 1.0, "speedup_low": sp["low"] if sp else 1.0,
                "speedup_high": sp["high"] if sp else 1.0,
                "efficiency": (sp["median"] if sp else 1.0) / m["macs_ratio"],
                "efficiency_low": (sp["low"] if sp else 1.0) / m["macs_ratio"],
                "efficiency_high": (sp["high"] if sp else 1.0) / m["macs_ratio"],
            })
    big = max(args.batch_sizes)
    pruned_big = [r for r in rows if r["batch_size"] == big and r["ratio"] is not None and r["precision"] == "fp32"]
    import onnxruntime

    return {
        "settings": {"model": args.model, "num_classes": args.num_classes, "ratios": list(args.ratios),
                     "round_to": list(args.round_to), "round_ratios": list(args.round_ratios),
                     "batch_sizes": list(args.batch_sizes), "repeats": repeats, "iters": iters,
                     "warmup": args.warmup, "seed": args.seed, "opset": args.opset, "scores": "magnitude",
                     "precision": list(args.precision),
                     "mode": "uniform", "confidence": 0.95},
        "machine": {"cpus": os.cpu_count(), "threads": threads, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "start": start,
                    "end": {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _load()}},
        "round_to": {"supported": round_to_supported(), "asked": list(args.round_to),
                     "note": None if round_to_supported() or not args.round_to
                     else "prune_ffn has no round_to parameter: no round_to rows"},
        "models": models,
        "rows": rows,
        "target": {"batch_size": big, "efficiency": TARGET_EFFICIENCY,
                   "met": {r["label"]: r["efficiency"] >= TARGET_EFFICIENCY for r in pruned_big}},
        "timings": timings,
    }


def markdown(result: dict[str, Any]) -> str:
    """One row per model: width, MACs ratio, and per batch size the speed-up (median, 95 %
    interval) and speed-up / MACs ratio."""
    bss = result["settings"]["batch_sizes"]
    head = ["model", "FFN width", "MACs ratio"]
    for b in bss:
        head += [f"speed-up b={b}", f"speed-up / MACs b={b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["label"], r["batch_size"]): r for r in result["rows"]}
    for m in result["models"]:
        cells = [m["label"], m["width"], f"{m['macs_ratio']:.3f}×"]
        for b in bss:
            r = by[(m["label"], b)]
            if m["label"] == "dense":
                cells += [f"1 (p50 {r['latency_ms_p50']:.1f} ms)", "—"]
            else:
                cells += [f"{r['speedup']:.3f}× ({r['speedup_low']:.3f}–{r['speedup_high']:.3f})",
                          f"{r['efficiency']:.2f} ({r['efficiency_low']:.2f}–{r['efficiency_high']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    s, mach = result["settings"], result["machine"]
    lines.append("")
    lines.append(f"{s['model']}, ONNX Runtime CPU, {mach['threads']} thread(s) on {mach['cpus']} CPUs; interleaved "
                 f"rounds per batch size {dict(zip(bss, s['repeats']))} × runs per round {dict(zip(bss, s['iters']))}; "
                 f"speed-up = median over rounds of dense / pruned (95 % bootstrap interval); load average "
                 f"{mach['start']['load_average']} at start, {mach['end']['load_average']} at end.")
    if result["round_to"]["note"]:
        lines.append(result["round_to"]["note"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name, or 'tiny'")
    ap.add_argument("--num-classes", type=int, default=None, help="head width (default: the model's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--round-to", type=int, nargs="*", default=[8, 16, 64])
    ap.add_argument("--round-ratios", type=float, nargs="*", default=[0.3],
                    help="ratios pruned with each --round-to (ViT-B at 0.5 keeps 1536 = 24·64: already aligned)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, nargs="+", default=[15, 5], help="interleaved rounds, per batch size")
    ap.add_argument("--iters", type=int, nargs="+", default=[4, 1], help="runs per model per round, per batch size")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8_static", "int8_dynamic"],
                    help="also time INT8 copies of every model (jas_prune.deploy.quantize)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run(args)
    atomic_write_json(args.out / "onnx.json", result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
