#!/usr/bin/env python3
"""Time an ONNX model exported by jas-prune in onnxruntime — onnxruntime, numpy and Pillow only.

Usage::

    python export/benchmark.py MODEL.onnx [--batch 1 32] [--threads N] [--providers cuda cpu]

Prints, per batch size, the p50/p90 latency of ``session.run`` on random input after a
warm-up, with the provider that actually ran and the thread count. The input size comes from
the sidecar ``MODEL.json`` when present, else from the model's input shape. A sidecar that is
present is checked as ``predict.py`` checks it (valid JSON, the file's size and SHA-256, the
model's input/output); a refusal is one line on stderr and exit code 2.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_session import DeployError, open_model  # noqa: E402

def benchmark(model: Path, *, batch_sizes: Sequence[int] = (1, 32), warmup: int = 10, iters: int = 50,
              providers: Sequence[str] = ("cuda", "cpu"), threads: int | None = None,
              seed: int = 0, sidecar: Path | None = None) -> list[dict[str, Any]]:
    """Latency records (one per batch size) with the provider that ran and the thread count.

    Raises:
        DeployError: the model or its sidecar is refused (see ``ort_session.open_model``).
    """
    sess, side = open_model(model, sidecar, providers=providers, threads=threads, sidecar_required=False,
                            need=("input_size",))
    provider = sess.get_providers()[0]
    inp = sess.get_inputs()[0]
    out_name = sess.get_outputs()[0].name
    if side is not None:
        chw = [int(v) for v in side["input_size"]]
        out_name = side.get("output_name", out_name)
    elif all(isinstance(d, int) for d in inp.shape[1:]):
        chw = [int(v) for v in inp.shape[1:]]
    else:
        raise DeployError(f"{model}: the model's input {list(inp.shape)} has no fixed image size and there "
                          "is no sidecar to give it (pass --sidecar PATH)")
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
            "batch_size": bs, "provider": provider, "precision": (side or {}).get("precision", "fp32"),
            "threads": threads, "warmup": warmup,
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
    ap.add_argument("--sidecar", type=Path, default=None, help="sidecar JSON (default: MODEL.json if present)")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batch):
        print("error: batch sizes must be >= 1", file=sys.stderr)
        return 2
    try:
        records = benchmark(args.model, batch_sizes=args.batch, warmup=args.warmup, iters=args.iters,
                            providers=args.providers, threads=args.threads, sidecar=args.sidecar)
    except DeployError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    threads = args.threads if args.threads is not None else "onnxruntime default"
    print(f"model: {args.model} ({records[0]['precision']})")
    print(f"provider: {records[0]['provider']}  threads: {threads}  warm-up: {args.warmup}  iters: {args.iters}")
    print(f"{'batch':>6} {'p50 ms':>10} {'p90 ms':>10} {'images/s':>11}")
    for r in records:
        print(f"{r['batch_size']:>6} {r['latency_ms_p50']:>10.3f} {r['latency_ms_p90']:>10.3f} "
              f"{r['images_per_second']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
