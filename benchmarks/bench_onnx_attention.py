"""ONNX Runtime speed-up of attention, FFN and joint pruning on ViT-B/16 geometry (random init).

Same method as ``benchmarks.bench_onnx`` (export, verify against PyTorch, time every model
interleaved with :func:`jas_prune.deploy.benchmark_many`; a speed-up is the median over rounds of
dense / pruned), for these variants: FFN-only (uniform share of FFN neurons, magnitude), heads-only
(uniform share of each block's heads, magnitude), head-dims-only, and joint (both). MACs:
Torch-Pruning's count (it includes the attention matmuls; an earlier version of this script added
them a second time, ``macs_counting`` absent in its JSON).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_onnx_attention --out runs/onnx-attn
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_onnx import build_model
from jas_prune.deploy import benchmark_many, export_onnx, verify_onnx
from jas_prune.evaluate import count_params_macs
from jas_prune.io import atomic_write_json
from jas_prune.models import input_size
from jas_prune.pruning.attention import head_scores, prune_attention
from jas_prune.pruning.criteria import ScoringInputs
from jas_prune.pruning.criteria.magnitude import magnitude_scores
from jas_prune.pruning.prune import prune_ffn

#: label -> (FFN share removed, heads share removed, head-dims share removed)
VARIANTS = {"dense": (0.0, 0.0, 0.0), "ffn70": (0.7, 0.0, 0.0), "heads50": (0.0, 0.5, 0.0),
            "dims50": (0.0, 0.0, 0.5), "joint-ffn50-heads50": (0.5, 0.5, 0.0),
            "joint-ffn60-dims40": (0.6, 0.0, 0.4)}


def macs(model: torch.nn.Module) -> int:
    return count_params_macs(model, input_size(model))["macs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/onnx-attn"))
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, nargs="+", default=[7, 3])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--exporter", default="auto", help="auto | dynamo | torchscript (less memory)")
    args = ap.parse_args()
    out = args.out
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    dense = build_model(args.model, None, 0)
    example = torch.randn(2, *input_size(dense), generator=torch.Generator().manual_seed(0))
    models: dict[str, dict[str, Any]] = {}
    for label in args.variants:
        ffn, heads, dims = VARIANTS[label]
        m = copy.deepcopy(dense) if label != "dense" else dense
        if ffn:
            prune_ffn(m, magnitude_scores(m), ratio=ffn)
        if heads or dims:
            prune_attention(m, head_scores("magnitude", ScoringInputs(model=m)), heads=heads, head_dims=dims)
        path = out / "onnx" / f"{label}.onnx"
        t = time.perf_counter()
        if not path.exists():  # resumable: an exported file is checked again, not rebuilt
            export_onnx(m, path, exporter=args.exporter)
        check = verify_onnx(path, m, example)
        models[label] = {"macs": macs(m), "path": str(path), "parity_max_abs": check["parity_max_abs"],
                         "export_verify_seconds": time.perf_counter() - t}
        print(label, models[label], flush=True)
    for rec in models.values():
        rec["macs_ratio"] = models["dense"]["macs"] / rec["macs"]
    rows = []
    for bs, rep in zip(args.batch_sizes, args.repeats):
        load0 = os.getloadavg()[0]
        timed = benchmark_many({k: v["path"] for k, v in models.items()}, reference="dense", batch_sizes=(bs,),
                               warmup=1, repeats=rep, iters=1, providers=("cpu",), threads=torch.get_num_threads(),
                               seed=0)
        for label, rec in models.items():
            r = timed[label][0]
            sp = r.get("speedup") or {"median": 1.0, "low": 1.0, "high": 1.0}
            rows.append({"label": label, "batch_size": bs, "macs_ratio": rec["macs_ratio"],
                         "latency_ms_p50": r["latency_ms_p50"], "speedup": sp["median"], "speedup_low": sp["low"],
                         "speedup_high": sp["high"], "efficiency": sp["median"] / rec["macs_ratio"],
                         "load_average": [load0, os.getloadavg()[0]]})
            print(rows[-1], flush=True)
        atomic_write_json(out / "onnx_attention.json", {"models": models, "rows": rows, "macs_counting": "tp",
                                                        "threads": torch.get_num_threads(), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
