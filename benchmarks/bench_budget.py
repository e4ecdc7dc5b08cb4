"""Budget split between attention and FFN on the built-in model (issue 20 item 4), resumable.

Same protocol as :mod:`benchmarks.bench_attention` (scores and least squares from ``--fit-per-class``
probe images per class, every choice on ``--val-per-class`` other probe images per class, figures
on ``--test-per-class`` test images per class; residual least squares, damping 1e-3, on ``fc2``
and, where the attention lost width, its projection). At MACs ratios 1.5×, 2× and 3× (dense
count / pruned count, Torch-Pruning's counter; every geometry found on the exact cost table of
:mod:`jas_prune.pruning.costs`, so no model is pruned to search):

- ``ffn``: FFN-only, the smallest uniform FFN ratio meeting the target;
- ``attention``: attention-only, the smallest uniform share of the attention width (heads, then
  head dimensions, as bench_attention's ``split_attention``) meeting it;
- ``uniform``: a fixed attention share (``--shares``, default 12.5/25/37.5/50/75 % of the
  attention width: head dimensions below 50 %, one of the two heads from 50 %) and the uniform
  FFN ratio meeting the target, the share chosen on ``val``;
- ``score``: :func:`jas_prune.pruning.allocate.score_split` over FFN neurons, heads and head
  dimensions (score-loss per MAC saved), the attention weight chosen on ``val`` among
  ``--weights``;
- ``chosen``: the best on ``val`` of every ``uniform`` and ``score`` candidate (what a recipe with
  ``split: [uniform, score]`` does).

FFN neurons and heads are ranked by joint IG over both (``units: [ffn, heads]``), head dimensions
by magnitude, as in bench_attention. A target a split cannot reach is recorded as unreachable.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_budget --seeds 0 1 2 --out runs/bench-budget
    python -m benchmarks.bench_budget --summary runs/bench-budget
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_attention import SeedData, evaluate, joint_ig_scores, seed_results, split_attention
from jas_prune.errors import BudgetError
from jas_prune.evaluate import count_params_macs
from jas_prune.io import atomic_write_json, read_json
from jas_prune.models import input_size
from jas_prune.pruning.allocate import Allocation, UnitScores, score_split, uniform_split
from jas_prune.pruning.attention import HeadScores, head_scores, prune_attention
from jas_prune.pruning.budget import bisect_first
from jas_prune.pruning.costs import CostTable, dense_geometry
from jas_prune.pruning.criteria import ScoringInputs
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import reconstruct

TARGETS = (1.5, 2.0, 3.0)
SHARES = (0.125, 0.25, 0.375, 0.5, 0.75)


def attention_only(table: CostTable, dense: dict, limit: float, step: float = 0.01) -> Allocation:
    """The smallest uniform attention share (of ``split_attention``) meeting ``limit``."""
    grid = [round(i * step, 6) for i in range(1, int(1 / step))]

    def geo(a: float) -> dict:
        h, q = split_attention(a)
        return {b: (f, H - min(H - 1, round(H * h)), D - min(D - 1, round(D * q))) for b, (f, H, D) in dense.items()}

    i = bisect_first(len(grid), lambda k: table.total(geo(grid[k])) <= limit)
    if i is None:
        raise BudgetError("attention only: unreachable")
    g = geo(grid[i])
    return Allocation("attention", g, table.total(g), 0.0, {"attention_share": grid[i]})


def make(dense_model, fit_b, scores: UnitScores, alloc: Allocation, logits: str = "none"):
    model = copy.deepcopy(dense_model)
    dg = dense_geometry(dense_model)
    widths = {b: g[0] for b, g in alloc.geometry.items()}
    if any(widths[b] < dg[b][0] for b in widths):
        prune_ffn(model, scores.ffn, ratio=0.5, keep_widths=widths)
    keep = {b: g[1:] for b, g in alloc.geometry.items()}
    if any(keep[b] != dg[b][1:] for b in keep):
        prune_attention(model, HeadScores(scores.heads, scores.dims), keep=keep)
    reconstruct(model, dense_model, fit_b, method="lsq", target="residual", damping=1e-3, logits=logits)
    return model


def summary(dirs: list[Path]) -> str:
    """Mean ± std over seeds: test top-1 %, MACs ratio, and the choices."""
    runs = [read_json(f) for d in dirs for f in sorted(d.glob("seed*.json"))]

    def ms(xs: list[float]) -> str:
        if not xs:
            return "–"
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    dense = [100 * r["dense"]["test"] for r in runs]
    lines = [f"dense: test top-1 {ms(dense)} % ({len(runs)} seeds, {runs[0]['dense']['test_images']} test images each)",
             "", "| target | split | seeds | test top-1 % | % of dense | MACs ratio | choice per seed |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        for kind in ("ffn", "attention", "uniform", "score", "chosen"):
            key = f"mac{t}/{kind}"
            rows = [r for r in runs if key in r]
            ok = [r for r in rows if "test" in r[key]]
            if not rows:
                continue
            if not ok:
                lines.append(f"| {t}× | {kind} | {len(rows)} | unreachable | | | |")
                continue
            top = [100 * r[key]["test"] for r in ok]
            rel = [100 * r[key]["test"] / r["dense"]["test"] for r in ok]
            ratio = [r["dense"]["macs"] / r[key]["macs"] for r in ok]
            choice = "; ".join(r[key].get("label", "") for r in ok)
            lines.append(f"| {t}× | {kind} | {len(ok)} | {ms(top)} | {ms(rel)} | {ms(ratio)} | {choice} |")
    return "\n".join(lines)


def _label(alloc: Allocation) -> str:
    p = alloc.params
    if alloc.split == "score":
        return f"score {'+'.join(p.get('units', []))} {p['normalise']} w={p['attention_weight']:g}"
    if alloc.split == "uniform":
        return f"ffn {p['ffn_ratio']:.2f} + heads {p['heads']:g}/dims {p['head_dims']:g}"
    return f"attention {p.get('attention_share', 0):.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-budget"))
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES),
                    help="attention shares of the uniform split (candidates, chosen on val)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.4, 2.0],
                    help="attention weights of the score split (candidates, chosen on val)")
    ap.add_argument("--normalise", nargs="+", default=["block"],
                    help="score normalisations of the score split (candidates, chosen on val)")
    ap.add_argument("--units", nargs="+", default=["ffn,head_dims", "ffn,heads,head_dims"],
                    help="unit sets of the score split (candidates, chosen on val)")
    ap.add_argument("--fit-per-class", type=int, default=8)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--logits", default="none", choices=["none", "affine", "centered"],
                    help="query/key logit compensation of the removed head dimensions (prune.attention.logits)")
    ap.add_argument("--summary", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
    else:
        for seed, path, res in seed_results(args):
            run_seed(seed, args, path, res)


def run_seed(seed: int, args: argparse.Namespace, path: Path, res: dict[str, Any]) -> None:
    """Every entry of one seed not yet in ``res`` (``path`` written after each)."""
    d = SeedData(seed, args.fit_per_class, args.val_per_class, args.test_per_class)
    dense, fit, val, test, fit_b, val_b, test_b, vid, tid = (d.dense, d.fit, d.val, d.test, d.fit_loader, d.val_b,
                                                             d.test_b, d.vid, d.tid)

    def save() -> None:
        atomic_write_json(path, res)

    table = CostTable.from_model(dense, "macs")
    if "dense" not in res:
        res["dense"] = {"test": evaluate(dense, test_b, tid), "val": evaluate(dense, val_b, vid),
                        "macs": count_params_macs(dense, input_size(dense))["macs"], "test_images": len(test),
                        "fit_images": len(fit), "val_images": len(val)}
        save()
    t0 = time.perf_counter()
    ffn, heads = joint_ig_scores(dense, fit_b)
    res.setdefault("seconds", {})["joint_ig"] = time.perf_counter() - t0
    dims = head_scores("magnitude", ScoringInputs(model=dense)).dims
    scores = UnitScores(ffn, heads, dims)
    dg = dense_geometry(dense)
    for target in args.targets:
        limit = table.dense / target
        cands: dict[str, list[Allocation]] = {"ffn": [], "attention": [], "uniform": [], "score": []}
        for kind, make_alloc in (
                ("ffn", lambda: [uniform_split(table, dg, limit)]),
                ("attention", lambda: [attention_only(table, dg, limit)]),
                ("uniform", lambda: [a for a in (_try(uniform_split, table, dg, limit, heads=h, head_dims=q)
                                                 for h, q in map(split_attention, args.shares)) if a]),
                ("score", lambda: [score_split(table, scores, dg, limit, units=u.split(","), attention_weight=w,
                                               normalise=n)
                                   for u in args.units for n in args.normalise for w in args.weights])):
            key = f"mac{target}/{kind}"
            if key in res:
                continue
            why = "every share"
            try:
                allocs = make_alloc()
            except BudgetError as exc:
                allocs, why = [], str(exc)
            if not allocs:
                res[key] = {"unreachable": why}
                save()
                continue
            rows = []
            for a in allocs:
                m = make(dense, fit_b, scores, a, args.logits)
                rows.append({"label": _label(a), "val": evaluate(m, val_b, vid), "test": evaluate(m, test_b, tid),
                             "macs": count_params_macs(m, input_size(m))["macs"], "predicted": a.cost,
                             "split": a.record()})
            best = max(rows, key=lambda r: r["val"])  # chosen on the probe partition
            res[key] = {**{k: v for k, v in best.items()}, "candidates": rows}
            print(seed, key, json.dumps({k: best[k] for k in ("label", "val", "test", "macs")}), flush=True)
            save()
        key = f"mac{target}/chosen"
        pool = [c for k in ("uniform", "score") for c in res[f"mac{target}/{k}"].get("candidates", [])]
        if pool:
            best = max(pool, key=lambda r: r["val"])
            res[key] = {k: v for k, v in best.items()}
            save()


def _try(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except BudgetError:
        return None


if __name__ == "__main__":
    main()
