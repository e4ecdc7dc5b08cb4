"""Query/key logit compensation (``prune.attention.logits``) on the built-in model, resumable.

Same protocol as :mod:`benchmarks.bench_attention` (its partitions, joint-IG FFN scores and
magnitude head-dimension scores, least squares with the ``residual`` target and damping 1e-3 on
8 fit images per class): for head dimensions 0.25 and 0.5, alone and with the FFN shares of that
benchmark's joint points (49 % and 83 %), every model is made three times — ``logits: none``,
``affine``, ``centered`` — from the same pruned weights; ``chosen`` is the one of the three with
the best top-1 on the ``val`` probe images (ties: the first in that order). Test top-1 on the
whole test partition (4800 images with the current recipes/benchmark-shapes.yaml).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_logits --seeds 0 1 2 --out runs/bench-logits
    python -m benchmarks.bench_logits --summary runs/bench-logits
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_attention import SeedData, evaluate, joint_ig_scores, seed_results
from jas_prune.io import atomic_write_json, read_json
from jas_prune.pruning.attention import head_scores, prune_attention
from jas_prune.pruning.choices import LOGIT_COMPENSATIONS
from jas_prune.pruning.criteria import ScoringInputs
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import reconstruct

FFN = (0.0, 0.4933, 0.8343)
HEAD_DIMS = (0.25, 0.5)
#: joint points that FFN-only pruning is also run at, with the FFN share giving the same MACs
FFN_ONLY_AT = ((0.4933, 0.5),)


def macs(model: torch.nn.Module) -> int:
    from jas_prune.evaluate import count_params_macs
    from jas_prune.models import input_size

    return count_params_macs(model, input_size(model))["macs"]


def ffn_share_for(dense: torch.nn.Module, scores: dict, target: int) -> float:
    """The smallest FFN share (steps of 1e-3) whose FFN-only model has at most ``target`` MACs."""
    lo, hi = 0.0, 0.999
    while hi - lo > 1e-3:
        mid = round((lo + hi) / 2, 4)
        m = copy.deepcopy(dense)
        prune_ffn(m, scores, ratio=mid)
        lo, hi = (mid, hi) if macs(m) > target else (lo, mid)
    return hi


def key(ffn: float, dims: float) -> str:
    return f"ffn{ffn:g}/hd{dims:g}"


def summary(dirs: list[Path]) -> str:
    """Mean ± std of test top-1 (%) per point and compensation, and the paired per-seed
    differences to ``none`` (pt)."""
    runs = [read_json(f) for d in dirs for f in sorted(d.glob("seed*.json"))]

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):+.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:+.2f}"

    def m(xs: list[float]) -> str:
        return ms(xs).lstrip("+")

    names = [*LOGIT_COMPENSATIONS, "chosen"]
    lines = [f"dense: {m([100 * r['dense']['test'] for r in runs])} % (n = {len(runs)} seeds)", "",
             "| point | " + " | ".join(names) + " | " + " | ".join(f"{n} − none (per seed)" for n in names[1:]) + " |",
             "|---" * (2 * len(names)) + "|"]
    points = [k for k in runs[0] if k.startswith("ffn") and "/hd" in k]
    for p in points:
        rows = [r[p] for r in runs if p in r and all(n in r[p] for n in names)]
        if not rows:
            continue
        top = [m([100 * row[n]["test"] for row in rows]) for n in names]
        diffs = []
        for n in names[1:]:
            d = [100 * (row[n]["test"] - row["none"]["test"]) for row in rows]
            diffs.append(f"{ms(d)} ({', '.join(f'{x:+.1f}' for x in d)})")
        picks = ", ".join(row["chosen"]["name"] for row in rows)
        lines.append(f"| {p} (chosen: {picks}) | " + " | ".join(top) + " | " + " | ".join(diffs) + " |")
    kept = {n: [r[p][n]["kept_blocks"] for r in runs for p in points if p in r and n in r[p]] for n in names[1:3]}
    lines += ["", "blocks where the compensation was kept (of 6): " +
              "; ".join(f"{n}: {statistics.mean(v):.1f} on average" for n, v in kept.items() if v)]
    for j in sorted({k for r in runs for k in r if k.startswith("ffn_only_at/")}):
        rows = [r for r in runs if j in r]
        p = j.removeprefix("ffn_only_at/")
        d = [100 * (r[p]["chosen"]["test"] - r[j]["test"]) for r in rows]
        lines.append(f"FFN only at the MACs of {p} (FFN share {m([r[j]['ffn'] for r in rows])}, MACs ratio "
                     f"{m([r[j]['macs_ratio'] for r in rows])} vs {m([r[j]['joint_macs_ratio'] for r in rows])}): "
                     f"test top-1 {m([100 * r[j]['test'] for r in rows])} %; joint with the chosen logits minus FFN "
                     f"only: {ms(d)} pt ({', '.join(f'{x:+.1f}' for x in d)})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-logits"))
    ap.add_argument("--fit-per-class", type=int, default=8)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--summary", type=Path, nargs="+")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    for seed, path, res in seed_results(args):
        data = SeedData(seed, args.fit_per_class, args.val_per_class)
        dense, fit_loader, val_b, test_b, vid, tid = (data.dense, data.fit_loader, data.val_b, data.test_b,
                                                      data.vid, data.tid)
        if "dense" not in res:
            res["dense"] = {"test": evaluate(dense, test_b, tid), "val": evaluate(dense, val_b, vid),
                            "test_images": len(data.test), "fit_images": len(data.fit), "val_images": len(data.val)}
            atomic_write_json(path, res)
        todo = [(f, q) for f in FFN for q in HEAD_DIMS if "chosen" not in res.get(key(f, q), {})]
        only = [(f, q) for f, q in FFN_ONLY_AT if f"ffn_only_at/{key(f, q)}" not in res]
        if not todo and not only:
            continue
        ffn_scores, _ = joint_ig_scores(dense, fit_loader)
        dims = head_scores("magnitude", ScoringInputs(model=dense))
        for f, q in todo:
            base = copy.deepcopy(dense)
            if f:
                prune_ffn(base, ffn_scores, ratio=f)
            prune_attention(base, dims, head_dims=q)
            row: dict[str, Any] = {}
            for name in LOGIT_COMPENSATIONS:
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                rep = reconstruct(m, dense, fit_loader, method="lsq", target="residual", damping=1e-3, logits=name)
                row[name] = {"val": evaluate(m, val_b, vid), "test": evaluate(m, test_b, tid),
                             "seconds": time.perf_counter() - t0,
                             "kept_blocks": sum(r.kept for r in rep.logits),
                             "logits": [vars(r) for r in rep.logits]}
            best = max(LOGIT_COMPENSATIONS, key=lambda n: (row[n]["val"], -LOGIT_COMPENSATIONS.index(n)))
            row["chosen"] = {"name": best, "val": row[best]["val"], "test": row[best]["test"]}
            res[key(f, q)] = row
            print(seed, key(f, q), {n: round(100 * row[n]["test"], 2) for n in LOGIT_COMPENSATIONS}, "chosen", best,
                  flush=True)
            atomic_write_json(path, res)
        m0 = macs(dense)
        for f, q in only:
            joint = copy.deepcopy(dense)
            prune_ffn(joint, ffn_scores, ratio=f)
            prune_attention(joint, dims, head_dims=q)
            share = ffn_share_for(dense, ffn_scores, macs(joint))
            m = copy.deepcopy(dense)
            prune_ffn(m, ffn_scores, ratio=share)
            reconstruct(m, dense, fit_loader, method="lsq", target="residual", damping=1e-3)
            res[f"ffn_only_at/{key(f, q)}"] = {"ffn": share, "test": evaluate(m, test_b, tid), "val": evaluate(m, val_b, vid),
                                               "macs_ratio": m0 / macs(m), "joint_macs_ratio": m0 / macs(joint)}
            print(seed, f"ffn_only_at/{key(f, q)}", res[f"ffn_only_at/{key(f, q)}"], flush=True)
            atomic_write_json(path, res)


if __name__ == "__main__":
    main()
