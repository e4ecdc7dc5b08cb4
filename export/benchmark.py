#!/usr/bin/env python3
"""Time an ONNX model exported by jas-prune in onnxruntime — onnxruntime, numpy and Pillow only.

Usage::

    python export/benchmark.py MODEL.onnx [--batch 1 32] [--threads N] [--providers cuda cpu]

Prints, per batch size, the p50/p90 latency of ``session.run`` on random input after a
warm-up, with the provider that actually ran and the thread count. The input size comes from
the sidecar ``MODEL.json`` when present, else from the model's input shape.

This file imports nothing from jas-prune or torch, so it can be copied next to a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_session import create_session  # noqa: E402

def benchmark(model: Path, *, batch_sizes: Sequence[int] = (1, 32), warmup: int = 10, iters: int = 50,
              providers: Sequence[str] = ("cuda", "cpu"), threads: int | None = None,
              seed: int = 0) -> list[dict[str, Any]]:
    """Latency records (one per batch size) with the provider that ran and the thread count."""
    sess = create_session(model, providers, threads)
    provider = sess.get_providers()[0]
    inp = sess.get_inputs()[0]
    out_name = sess.get_outputs()[0].name
    sidecar_file = model.with_suffix(".json")
    if sidecar_file.is_file():
        chw = [int(v) for v in json.loads(sidecar_file.read_text(encoding="utf-8"))["input_size"]]
    else:
        chw = [int(v) for v in inp.shape[1:]]
    rng = np.random.default_rng(seed)
    records = []
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *chw), dtype=np.float32)
        for _ in range(warmup):
            sess.run([out_name], {inp.name: x})
        times = []
        for _ in range(max(1, iters)):
            t = time.perf_counter()
            sess.run([out_name], {inp.name: x})
            times.append(time.perf_counter() - t)
        ms = np.asarray(times) * 1e3
        p50 = float(np.percentile(ms, 50))
        records.append({
            "batch_size": bs, "provider": provider, "threads": threads, "warmup": warmup,
            "iters": max(1, iters), "latency_ms_p50": p50, "latency_ms_p90": float(np.percentile(ms, 90)),
            "images_per_second": bs * 1e3 / p50 if p50 > 0 else float("inf"),
        })
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the exported .onnx file")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--providers", nargs="+", default=["cuda", "cpu"],
                    help="onnxruntime providers in order of preference (default: cuda cpu)")
    ap.add_argument("--json", action="store_true", help="print the records as JSON")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"error: model file not found: {args.model}", file=sys.stderr)
        return 2
    if any(b < 1 for b in args.batch):
        print("error: batch sizes must be >= 1", file=sys.stderr)
        return 2
    records = benchmark(args.model, batch_sizes=args.batch, warmup=args.warmup, iters=args.iters,
                        providers=args.providers, threads=args.threads)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    threads = args.threads if args.threads is not None else "onnxruntime default"
    print(f"model: {args.model}")
    print(f"provider: {records[0]['provider']}  threads: {threads}  warm-up: {args.warmup}  iters: {args.iters}")
    print(f"{'batch':>6} {'p50 ms':>10} {'p90 ms':>10} {'images/s':>11}")
    for r in records:
        print(f"{r['batch_size']:>6} {r['latency_ms_p50']:>10.3f} {r['latency_ms_p90']:>10.3f} "
              f"{r['images_per_second']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
