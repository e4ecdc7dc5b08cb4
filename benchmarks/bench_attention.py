"""Attention vs FFN vs joint pruning on the built-in model (issue 20), resumable.

Per seed (each seed draws another probe/test partition of the built-in shapes data, as
``recipes/benchmark-shapes.yaml``): scores and least squares from 8 of the probe images per class
that a run uses (``fit``, ``--fit-per-class``), choices on other probe images (``val``, 4 per
class), figures on the whole test partition (20 images per class, 960). 4 Gauss nodes. Every pruned model gets least squares (``residual`` target,
damping 1e-3) — ``fc2`` and, where heads or head dimensions went, the attention projection.

MACs: Torch-Pruning's count (:func:`jas_prune.evaluate.count_params_macs`; it includes the attention
matmuls). Result files written before this was fixed (no ``macs_counting`` in ``dense``) added the
attention matmuls ``2·T²·H·d`` a second time; :func:`summary` takes them out again.

- ``mac``: at total-MACs reductions 1.5× and 2×: FFN-only (uniform FFN share), attention-only
  (uniform attention share: heads, then head dimensions) and joint (attention share 25/50/75 %,
  the FFN share that meets the target; the split chosen on ``val``). FFN neurons ranked by joint
  IG over FFN neurons and heads (``units: [ffn, heads]``, one run), head dimensions by magnitude,
  heads by the same joint IG.
- ``heads50``: one of the two heads of every block removed, heads ranked by JAS (the layer-
  progressive head path), joint IG, magnitude, Taylor, activation, random, Hessian, ViT-Slim,
  OBS and OBS×JAS (``--methods``: a subset).
- ``dims50``: half of the head dimensions of every block removed (both heads kept), ranked by
  each criterion's dimension scores (``--only dims50``, not run by default).
- ``paper``: the paper's Table-1 protocol for heads on 2 test images per class: zero (×0, every
  token) each image's located head path (JAS, one head per block, ``units: [heads]``) or the
  same number of heads picked by activation, by magnitude (the same heads for every image) or at
  random; the mean drop of the label's probability and the top-1 after the intervention.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_attention --seeds 0 1 2 --out runs/bench-attn

``--logits affine`` (or ``centered``) adds the query/key logit compensation to every model whose
head dimensions were pruned (``prune.attention.logits``, docs/attention.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from jas_prune.aggregate import per_image_importance
from jas_prune.attribution import LocateSettings, locate
from benchmarks.bench_select import fit_val_samples
from jas_prune.data import make_loader, model_transform
from jas_prune.evaluate import accuracy, count_params_macs, predict_logits
from jas_prune.io import atomic_write_json, read_json
from jas_prune.models import input_size, load_model
from jas_prune.models.heads import discover_heads
from jas_prune.pruning.attention import HeadScores, attention_macs, head_scores, prune_attention
from jas_prune.pruning.choices import LOGIT_COMPENSATIONS
from jas_prune.pruning.calibration import cached_batches, per_class_cap
from jas_prune.pruning.criteria import ScoringInputs
from jas_prune.pruning.graph import find_vit
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import reconstruct
from jas_prune.recipe import load_recipe

STEPS = 4


#: the attention-only entries per criterion: (heads, head_dims) removed in every block
UNIT_ENTRIES = {"heads50": (0.5, 0.0), "dims50": (0.0, 0.5)}

#: head criteria of the heads50 / dims50 entries
HEADS50 = ("jas", "joint_ig", "magnitude", "taylor", "activation", "random", "hessian", "vit_slim", "obs", "obs_jas")


def total_macs(model: torch.nn.Module) -> int:
    return count_params_macs(model, input_size(model))["macs"]


def _double_counted(key: str, rec: dict[str, Any]) -> int:
    """The attention matmuls an old result file counted twice (built-in model: T = 65, 6 blocks of
    2 heads × 32 dims)."""
    if key == "dense":
        kept = 64
    elif key.startswith("heads50/"):
        kept = 32
    else:
        h, q = split_attention(rec.get("attention", 0.0))
        kept = (2 - min(1, round(2 * h))) * (32 - min(31, round(32 * q)))
    return 2 * 65 * 65 * kept * 6


def split_attention(a: float) -> tuple[float, float]:
    """(heads, head_dims) removing a share ``a`` of a 2-head block's attention width."""
    if a >= 0.5:
        return 0.5, 1.0 - (1.0 - a) / 0.5
    return 0.0, a


def joint_ig_scores(model, fit_loader) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """FFN importance (mean_abs_centered, as the recipes) and head importance (mean) from one
    joint-IG run over FFN neurons and heads."""
    s = LocateSettings(method="joint_ig", steps=STEPS, quadrature="gauss", scope="all", formula="ig",
                       units=("ffn", "heads"))
    ffn: dict[int, torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}
    n = 0
    for x, y, *_ in fit_loader:
        r = locate(model, x, y, s)
        imp = per_image_importance(torch.stack(r.scores, 1), "mean_abs_centered").sum(0)
        for i, b in enumerate(r.layers):
            ffn[b] = ffn.get(b, 0) + imp[i]
        for b, sc in zip(r.head_layers, r.head_scores):
            heads[b] = heads.get(b, 0) + sc.sum(0)
        n += len(y)
    return {b: v / n for b, v in ffn.items()}, {b: v / n for b, v in heads.items()}


class SeedData:
    """One seed's dense model and partitions: ``fit`` (scores, least squares), ``val`` (choices,
    probe images too), ``test`` (figures; ``test_per_class`` of each class, None: all); their
    batches cached and sample ids."""

    def __init__(self, seed: int, fit_per_class: int, val_per_class: int, test_per_class: int | None = None) -> None:
        self.dense = load_model("builtin:shapes-vit")
        torch.manual_seed(seed)
        self.transform = model_transform(self.dense)
        fit, val, self.source = fit_val_samples(load_recipe("recipes/benchmark-shapes.yaml"), seed)
        self.fit, self.val = per_class_cap(fit, fit_per_class), per_class_cap(val, val_per_class)
        self.test = self.source.subset("test")
        if test_per_class is not None:
            self.test = per_class_cap(self.test, test_per_class)
        self.fit_loader = cached_batches(make_loader(self.fit, self.transform, batch_size=64, seed=seed))
        self.val_b = cached_batches(make_loader(self.val, self.transform, batch_size=256, seed=seed))
        self.test_b = cached_batches(make_loader(self.test, self.transform, batch_size=256, seed=seed))
        self.vid, self.tid = [s.id for s in self.val], [s.id for s in self.test]


def seed_results(args: argparse.Namespace) -> Iterator[tuple[int, Path, dict[str, Any]]]:
    """(seed, its result file, the results it holds so far) for every ``--seeds`` under ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = args.out / f"seed{seed}.json"
        yield seed, path, (read_json(path) if path.exists() else {})


def evaluate(model, batches, ids) -> float:
    return accuracy(*predict_logits(model, batches, sample_ids=ids, desc="eval"))["top1"]


def make(dense, fit_loader, ffn_scores, hs: HeadScores | None, ffn_ratio: float, attn: float | tuple[float, float],
         logits: str = "none"):
    model = copy.deepcopy(dense)
    if ffn_ratio > 0:
        prune_ffn(model, ffn_scores, ratio=ffn_ratio)
    heads, dims = attn if isinstance(attn, tuple) else split_attention(attn)
    if heads or dims:
        prune_attention(model, hs, heads=heads, head_dims=dims)
    reconstruct(model, dense, fit_loader, method="lsq", target="residual", damping=1e-3, logits=logits if dims else "none")
    return model


def zeroed(model, x, y, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label probability and prediction with head ``picks[b, i]`` of block i zeroed per image."""
    heads = discover_heads(find_vit(model)[1])
    hs = []
    for i, h in enumerate(heads):
        mask = torch.ones(len(x), h.heads, dtype=x.dtype)
        mask.scatter_(1, picks[:, i], 0.0)
        cols = mask.repeat_interleave(h.head_dim, 1)[:, None, :]
        hs.append(h.proj.register_forward_pre_hook(lambda m, a, c=cols: (a[0] * c,)))
    try:
        with torch.no_grad():
            p = torch.softmax(model(x), -1)
    finally:
        for h in hs:
            h.remove()
    return p.gather(1, y[:, None])[:, 0], p.argmax(1)


def paper_protocol(dense, source, transform, seed: int) -> dict[str, Any]:
    from jas_prune.data import make_loader

    test = per_class_cap(source.subset("test"), 2)
    x, y = next(iter(make_loader(test, transform, batch_size=len(test), seed=seed)))[:2]
    with torch.no_grad():
        p0 = torch.softmax(dense(x), -1).gather(1, y[:, None])[:, 0]
    L = len(dense.blocks)
    picks = {}
    for method in ("jas", "activation"):
        r = locate(dense, x, y, method=method, steps=STEPS, scope="all", formula="ig", units=["heads"])
        picks[method] = r.head_paths
    mag = head_scores("magnitude", ScoringInputs(model=dense)).heads
    picks["magnitude"] = torch.stack([mag[b].argmax().expand(len(x)) for b in range(L)], 1)[:, :, None]
    gen = torch.Generator().manual_seed(seed)
    picks["random"] = torch.randint(0, 2, (len(x), L, 1), generator=gen)
    out = {"images": len(x), "dense_top1": None}
    for name, pk in picks.items():
        p, pred = zeroed(dense, x, y, pk)
        out[name] = {"prob_drop": float((p0 - p).mean()), "top1": float((pred == y).float().mean())}
    out["dense_top1"] = float((torch.softmax(dense(x), -1).argmax(1) == y).float().mean())
    return out


def summary(dirs: list[Path]) -> str:
    """Mean ± std over the seed files of ``dirs`` (test top-1 in %, MACs ratio dense / pruned)."""
    import statistics

    runs = [read_json(f) for d in dirs for f in sorted(d.glob("seed*.json"))]
    n_seeds = len({(str(f.name)) for d in dirs for f in d.glob("seed*.json")})
    keys = sorted({k for r in runs for k in r if "/" in k or k == "paper"})

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    lines = [f"dense: test top-1 {ms([100 * r['dense']['test'] for r in runs if 'dense' in r])} % "
             f"(n = {n_seeds} seeds)", "", "| entry | seeds | test top-1 % | MACs ratio | choice |", "|---|---|---|---|---|"]
    for k in keys:
        rows = [r for r in runs if k in r and "dense" in r]
        if k == "paper":
            for name in ("jas", "activation", "magnitude", "random"):
                lines.append(f"| paper ×0 {name}: prob drop / top-1 % | {len(rows)} | "
                             f"{ms([r[k][name]['prob_drop'] for r in rows])} / {ms([100 * r[k][name]['top1'] for r in rows])} | | |")
            continue
        top = ms([100 * r[k]["test"] for r in rows])
        def true(r: dict[str, Any], key: str) -> int:
            rec = r[key]
            return rec["macs"] - (0 if "macs_counting" in r["dense"] else _double_counted(key, rec))

        ratio = ms([true(r, "dense") / true(r, k) for r in rows])
        choice = "; ".join(f"ffn {r[k].get('ffn', 0):.2f} attn {r[k].get('attention', 0) if not isinstance(r[k].get('attention'), list) else r[k]['attention']}"
                           for r in rows) if k.startswith("mac") else ""
        lines.append(f"| {k} | {len(rows)} | {top} | {ratio} | {choice} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-attn"))
    ap.add_argument("--only", nargs="+", default=["heads50", "mac"])
    ap.add_argument("--methods", nargs="+", default=list(HEADS50),
                    help="head criteria of the heads50 / dims50 entries (default: all)")
    ap.add_argument("--fit-per-class", type=int, default=8, help="probe images per class for scores and least squares")
    ap.add_argument("--val-per-class", type=int, default=4, help="other probe images per class for choices")
    ap.add_argument("--summary", type=Path, nargs="+", help="print the table of these result folders and stop")
    ap.add_argument("--logits", default="none", choices=LOGIT_COMPENSATIONS,
                    help="query/key logit compensation of models with pruned head dimensions")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    for seed, path, res in seed_results(args):

        def save() -> None:
            atomic_write_json(path, res)

        data = SeedData(seed, args.fit_per_class, args.val_per_class)
        dense, transform, source, fit, val, test = data.dense, data.transform, data.source, data.fit, data.val, data.test
        fit_loader, val_b, test_b, vid, tid = data.fit_loader, data.val_b, data.test_b, data.vid, data.tid
        if "dense" not in res:
            res["dense"] = {"test": evaluate(dense, test_b, tid), "val": evaluate(dense, val_b, vid),
                            "macs": total_macs(dense), "macs_counting": "tp", "test_images": len(test), "fit_images": len(fit),
                            "val_images": len(val)}
            save()
        if "paper" in args.only and "paper" not in res:
            res["paper"] = paper_protocol(dense, source, transform, seed)
            print(seed, "paper", res["paper"], flush=True)
            save()
        if not {*UNIT_ENTRIES, "mac"} & set(args.only):
            continue
        mag = head_scores("magnitude", ScoringInputs(model=dense))
        inputs = ScoringInputs(model=dense, loader=fit_loader, seed=seed,
                               locate_settings=dict(steps=STEPS, scope="all", formula="ig"))
        crit: dict[str, HeadScores] = {"magnitude": mag}
        ffn_scores: dict[int, torch.Tensor] = {}
        if "mac" in args.only or "joint_ig" in args.methods:  # FFN scores and joint-IG head scores
            t0 = time.perf_counter()
            ffn_scores, jig_heads = joint_ig_scores(dense, fit_loader)
            res.setdefault("seconds", {})["joint_ig"] = time.perf_counter() - t0
            crit["joint_ig"] = HeadScores(jig_heads, mag.dims)

        for entry, attn in UNIT_ENTRIES.items():
            if entry not in args.only:
                continue
            for name in args.methods:
                key = f"{entry}/{name}"
                if key in res:
                    continue
                t0 = time.perf_counter()
                hs = crit.get(name) or head_scores(name, inputs)
                secs = time.perf_counter() - t0
                crit[name] = hs  # scored once for both entries
                m = make(dense, fit_loader, ffn_scores, hs, 0.0, attn, args.logits)
                res[key] = {"test": evaluate(m, test_b, tid), "macs": total_macs(m), "score_seconds": secs}
                print(seed, key, res[key], flush=True)
                save()

        if "mac" in args.only:
            M0 = res["dense"]["macs"]
            _, info = find_vit(dense)
            T = 65
            F = sum(2 * T * l.fc1.in_features * l.hidden for l in info.layers)
            A = attention_macs(dense, T)  # the attention matmuls, then its linear layers
            A += sum(T * h.attn.qkv.in_features * (h.attn.qkv.out_features + h.proj.out_features)
                     for h in discover_heads(info))
            hs = crit["joint_ig"]
            for target in (1.5, 2.0):
                need = M0 - M0 / target
                plans = {"ffn": [(min(0.95, need / F), 0.0)], "attention": [(0.0, min(0.95, need / A))],
                         "joint": [(round((need - a * A) / F, 4), a) for a in (0.25, 0.5, 0.75)
                                   if 0 < (need - a * A) / F < 0.97]}
                for kind, options in plans.items():
                    key = f"mac{target}/{kind}"
                    if key in res:
                        continue
                    rows = []
                    for r_ffn, a in options:
                        m = make(dense, fit_loader, ffn_scores, hs, r_ffn, a, args.logits)
                        rows.append({"ffn": r_ffn, "attention": a, "val": evaluate(m, val_b, vid),
                                     "test": evaluate(m, test_b, tid), "macs": total_macs(m)})
                    best = max(rows, key=lambda r: r["val"])  # chosen on the probe partition
                    res[key] = {**best, "candidates": rows}
                    print(seed, key, json.dumps({k: v for k, v in best.items() if k != "candidates"}), flush=True)
                    save()


if __name__ == "__main__":
    main()
