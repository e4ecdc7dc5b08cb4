"""A fast JAS importance for pruning: cheap attribution candidates against exact JAS, side by side.

Exact JAS for pruning (the quickstart's ``scope: all, formula: ig``, 20 left steps, every block
located layer by layer) costs L·m passes per image (+ m for the path's own JAS): 140 on the
built-in 6-block model, 260 on ViT-B/16. The candidates:

- ``jas gauss m``: the same layer-progressive JAS with m Gauss–Legendre nodes;
- ``joint IG gauss m``: method ``joint_ig`` — every block scaled from zero together, per-neuron
  integrated gradients (completeness over all FFN neurons): m passes instead of L·m;
- ``top-T``: JAS layer by layer at the top T blocks only, joint IG for the blocks below;
- fewer probe images per class (1, 2, 4, 8, 16) for exact JAS and the cheap candidates.

Protocol, per seed: ``build_source("shapes", seed=s, images_per_class=100)`` (80 probe / 20 test
images per class); the probe partition is split per class into seeded fit / val halves
(:func:`benchmarks.bench_select.split_fit_val`); attribution runs on the first 16 fit images of
each class (fewer for the calibration-size study: the first n of them); importance is the
quickstart's ``mean_abs_centered`` (per image, the layer's median candidate score subtracted, the
magnitude averaged over the images); the model is pruned 50 % and 70 % uniform through
:class:`JASImportance`, then reconstructed (``--reconstruction``):

- ``bias`` (default): bias compensation, the activation means of the 16 attribution images per
  class (``prune_ffn(..., bias_compensation=stats)``);
- ``lsq``: pruned without bias compensation, then least-squares reconstruction as the product's
  recipes do it (:func:`jas_prune.pruning.reconstruct.reconstruct`, method ``lsq``, target
  ``residual``, damping 1e-3), calibrated on the same images: the 16 attribution images per
  class, for every row (the rows with fewer images per class differ in their importance only).

Top-1 is measured on the val half (for choosing) and on the test partition (for reporting). The
choice reads val only; the table also lists the rows within the target on test. ``--vitb`` also
times every candidate on a random-init ``vit_base_patch16_224`` (timm's own init; seconds per
image on this machine's CPU).

Run: ``python -m benchmarks.bench_fast --out runs/fast [--seeds 0 1 2] [--vitb 2]
[--reconstruction lsq] [--candidates NAME ...] [--only-images N ...]``. Scores are cached under
``OUT`` (a rerun only evaluates); the evaluations are cached per seed and reconstruction, row by
row (``OUT/seedS/result.json`` for ``bias``, ``result-lsq.json`` for ``lsq``), so a rerun with
``--candidates`` (candidate names, or ``activation`` / ``magnitude`` for the yardsticks) and
``--only-images`` evaluates only the missing rows of that subset (``--fresh``: that subset again)
and keeps the others. ``OUT/fast.json`` (``bias``) and ``OUT/fast-lsq.json`` (``lsq``) hold every
figure of the seeds run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jas_prune.aggregate import per_image_importance
from jas_prune.attribution import LocateSettings
from jas_prune.attribution import JointAttribution
from jas_prune.data import build_source, make_loader, model_transform
from jas_prune.evaluate import accuracy, predict_logits
from jas_prune.pruning.criteria import criterion_scores
from jas_prune.pruning.choices import DEFAULT_DAMPING, DEFAULT_TARGET
from jas_prune.pruning.plugin import JASImportance
from jas_prune.pruning.reconstruct import reconstruct
from jas_prune.pruning.stats import ffn_activation_stats
from jas_prune.io import atomic_write_json
from jas_prune.models import discover_ffn, input_size, load_model
from jas_prune.pruning.prune import prune_ffn

from benchmarks.bench_select import split_fit_val

__all__ = ["Candidate", "CANDIDATES", "YARDSTICKS", "RECONSTRUCTIONS", "candidate_scores", "passes_per_image",
           "choose", "within_target", "result_files", "main"]

RATIOS = (0.5, 0.7)
IMAGES_PER_CLASS = (1, 2, 4, 8, 16)
AGGREGATION = "mean_abs_centered"
#: what is refit after pruning: ``bias`` (bias compensation, the cached results' default) or ``lsq``
RECONSTRUCTIONS = ("bias", "lsq")
#: importance criteria without attribution, evaluated at the full calibration set only
YARDSTICKS = ("activation", "magnitude")


@dataclass(frozen=True)
class Candidate:
    """One way to compute the per-image candidate scores that pruning importance averages.

    Attributes:
        name: row label.
        method: ``jas`` (layer-progressive) or ``joint_ig`` (all blocks in one set of passes).
        steps: quadrature nodes m.
        quadrature: ``left`` | ``gauss``.
        top: > 0: ``jas`` at the top ``top`` blocks only, ``joint_ig`` (same steps) below.
    """

    name: str
    method: str
    steps: int
    quadrature: str
    top: int = 0

    def settings(self, **changes: Any) -> LocateSettings:
        base = dict(method=self.method, steps=self.steps, quadrature=self.quadrature, scope="all", formula="ig")
        return LocateSettings(**{**base, **changes})


def _top(depth: int) -> int:
    return max(1, depth // 3)


CANDIDATES = (
    Candidate("exact JAS (left 20)", "jas", 20, "left"),
    Candidate("jas gauss 4", "jas", 4, "gauss"),
    Candidate("jas gauss 2", "jas", 2, "gauss"),
    Candidate("joint IG gauss 8", "joint_ig", 8, "gauss"),
    Candidate("joint IG gauss 4", "joint_ig", 4, "gauss"),
    Candidate("joint IG gauss 2", "joint_ig", 2, "gauss"),
    Candidate("joint IG gauss 1", "joint_ig", 1, "gauss"),
    Candidate("top-L/3 jas + joint IG, gauss 4", "jas", 4, "gauss", top=-1),
)


def _yardstick_row(name: str) -> str:
    return f"{name} (yardstick, no attribution)"


def _all_rows() -> list[tuple[str, int]]:
    """Every row key ``(candidate, images per class)`` in table order."""
    keys = [(c.name, n) for c in CANDIDATES for n in IMAGES_PER_CLASS]
    return keys + [(_yardstick_row(y), max(IMAGES_PER_CLASS)) for y in YARDSTICKS]


def _wanted_rows(candidates: Sequence[str] | None, images: Sequence[int] | None) -> list[tuple[str, int]]:
    """The row keys selected by ``--candidates`` (candidate or yardstick names) and ``--only-images``."""
    names = None if candidates is None else {_yardstick_row(c) if c in YARDSTICKS else c for c in candidates}
    return [(c, n) for c, n in _all_rows()
            if (names is None or c in names) and (images is None or n in images)]


def result_files(reconstruction: str) -> tuple[str, str]:
    """(per-seed result file, summary file) of a reconstruction: ``bias`` keeps the original names."""
    if reconstruction == "bias":
        return "result.json", "fast.json"
    return f"result-{reconstruction}.json", f"fast-{reconstruction}.json"


def passes_per_image(c: Candidate, depth: int) -> tuple[int, int]:
    """(passes of the scores, passes of the path's own JAS that ``locate`` adds): one pass is a
    forward and backward of one (image, step) row."""
    if c.top:
        t = _top(depth) if c.top < 0 else c.top
        return c.steps * (1 + t), 2 * c.steps
    if c.method == "jas":
        return depth * c.steps, c.steps
    return c.steps, c.steps


def candidate_scores(model: torch.nn.Module, c: Candidate, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image candidate scores ``[B, L, n]`` (float32) of one batch."""
    depth = discover_ffn(model).depth
    engine = JointAttribution(model)
    if not c.top:
        return torch.stack(engine.attribute(x, y, settings=c.settings()).scores, dim=1).float()
    t = _top(depth) if c.top < 0 else c.top
    low = engine.attribute(x, y, settings=c.settings(method="joint_ig")).scores
    high = engine.attribute(x, y, settings=c.settings(layers=list(range(depth - t, depth)))).scores
    return torch.stack(low[:depth - t] + high, dim=1).float()


def _per_class_first(labels: Sequence[int], n: int) -> list[int]:
    """Positions of the first ``n`` items of every class, in order."""
    seen: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        if seen.get(int(y), 0) < n:
            seen[int(y)] = seen.get(int(y), 0) + 1
            out.append(i)
    return out


def _seed_run(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """One seed's result: the cached rows, plus the wanted rows not cached (all wanted ones with
    ``--fresh``) evaluated now and merged in (table order)."""
    done = out / f"seed{seed}" / result_files(args.reconstruction)[0]
    old = json.loads(done.read_text()) if done.exists() else None
    wanted = _wanted_rows(args.candidates, args.only_images)
    have = {_row_key(r) for r in old["rows"]} if old else set()
    todo = wanted if args.fresh else [k for k in wanted if k not in have]
    if old is not None and not todo:
        return old
    result = _evaluate_seed(args, seed, out, todo)
    if old is not None:
        rows = {_row_key(r): r for r in old["rows"]}
        rows.update((_row_key(r), r) for r in result["rows"])
        order = {k: i for i, k in enumerate(_all_rows())}
        result["rows"] = sorted(rows.values(), key=lambda r: order.get(_row_key(r), len(order)))
    atomic_write_json(done, result)
    return result


def _evaluate_seed(args: argparse.Namespace, seed: int, out: Path,
                   todo: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Evaluate the rows ``todo`` (default: all) of one seed."""
    todo = set(_all_rows() if todo is None else todo)
    torch.manual_seed(seed)
    model = load_model(args.model)
    transform = model_transform(model)
    depth = discover_ffn(model).depth
    source = build_source("shapes", seed=seed, images_per_class=args.images_per_class)
    probe, test = source.subset("probe"), source.subset("test")
    fit, val = split_fit_val([s.label for s in probe], seed)
    fit_samples = [probe[i] for i in fit]
    attr = [fit_samples[i] for i in _per_class_first([s.label for s in fit_samples], max(IMAGES_PER_CLASS))]
    attr_labels = torch.tensor([s.label for s in attr])
    val_samples = [probe[i] for i in val]

    def loader(samples: Sequence[Any], bs: int = 64) -> Any:
        return make_loader(samples, transform, batch_size=bs, seed=seed)

    val_loader, test_loader = list(loader(val_samples)), list(loader(test))  # rendered once, reused
    example = torch.zeros(1, *input_size(model))
    stats = ffn_activation_stats(model, loader(attr))
    lsq = args.reconstruction == "lsq"
    calib = list(loader(attr)) if lsq else None  # the images of the bias-compensation stats

    def top1(scores: dict[int, torch.Tensor]) -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"val": [], "test": []}
        for ratio in RATIOS:
            pruned = copy.deepcopy(model)
            prune_ffn(pruned, JASImportance(scores), ratio=ratio, example_inputs=example,
                      bias_compensation=None if lsq else stats)
            if lsq:
                reconstruct(pruned, model, calib, method="lsq", target=DEFAULT_TARGET, damping=DEFAULT_DAMPING)
            for part, ld, samples in (("val", val_loader, val_samples), ("test", test_loader, test)):
                logits, labels = predict_logits(pruned, ld, sample_ids=[s.id for s in samples], desc=part)
                res[part].append(100 * accuracy(logits, labels)["top1"])
        return res

    dense = {part: 100 * accuracy(*predict_logits(model, ld, sample_ids=[s.id for s in smp]))["top1"]
             for part, ld, smp in (("val", val_loader, val_samples), ("test", test_loader, test))}
    rows: list[dict[str, Any]] = []
    for c in CANDIDATES:
        if not any((c.name, n) in todo for n in IMAGES_PER_CLASS):
            continue
        cache = out / f"seed{seed}" / (c.name.replace(" ", "_").replace("/", "") + ".pt")
        if cache.exists():
            blob = torch.load(cache, weights_only=True)
        else:
            t0, parts = time.perf_counter(), []
            for x, yb, _ in loader(attr, 32):
                parts.append(candidate_scores(model, c, x, yb))
            blob = {"scores": torch.cat(parts), "seconds": time.perf_counter() - t0}
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(blob, cache)
        per_image = per_image_importance(blob["scores"], AGGREGATION)
        for n in IMAGES_PER_CLASS:
            if (c.name, n) not in todo:
                continue
            sel = _per_class_first(attr_labels.tolist(), n)
            imp = per_image.index_select(0, torch.tensor(sel)).mean(0)
            rows.append({"candidate": c.name, "images_per_class": n, "passes": passes_per_image(c, depth),
                         "seconds_per_image_builtin": blob["seconds"] / len(attr),
                         **top1({l: imp[l] for l in range(depth)})})
    for name in YARDSTICKS:
        if (_yardstick_row(name), max(IMAGES_PER_CLASS)) not in todo:
            continue
        sc = criterion_scores(name, model, loader(attr), example_inputs=example, stats=stats)
        rows.append({"candidate": _yardstick_row(name), "images_per_class": max(IMAGES_PER_CLASS),
                     "passes": (0, 0), **top1({int(k): v for k, v in dict(sc).items()})})
    return {"seed": seed, "dense": dense, "rows": rows, "attribution_images": len(attr), "val_images": len(val),
            "test_images": len(test), "reconstruction": _reconstruction(args.reconstruction, len(attr))}


def _reconstruction(method: str, images: int) -> dict[str, Any]:
    """How the pruned models were reconstructed (recorded with the results)."""
    if method == "bias":
        return {"method": "bias", "calibration_images": images}
    return {"method": method, "target": DEFAULT_TARGET, "damping": DEFAULT_DAMPING, "calibration_images": images}


def _vitb(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per image of every candidate on a random-init ViT-B/16 (timm's init), CPU."""
    import timm

    model = timm.create_model("vit_base_patch16_224").eval()
    x = torch.randn(max(args.vitb, 1), 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(x.shape[0], dtype=torch.long)
    out = {}
    for c in CANDIDATES:
        n = 1 if c.name.startswith("exact") else x.shape[0]
        t0 = time.perf_counter()
        candidate_scores(model, c, x[:n], y[:n])
        out[c.name] = (time.perf_counter() - t0) / n
        print(f"  ViT-B/16 {c.name}: {out[c.name]:.1f} s/image", flush=True)
    return out


def _fmt(xs: Sequence[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _row_key(r: dict[str, Any]) -> tuple[str, int]:
    return r["candidate"], r["images_per_class"]


def _mean(rows: Sequence[dict[str, Any]], part: str, i: int) -> float:
    return statistics.mean(r[part][i] for r in rows)


def _groups(result: dict[str, Any]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Row key -> its row in every seed, for the keys every seed has (first seed's order)."""
    seeds = result["seeds"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in seeds:
        for r in s["rows"]:
            groups.setdefault(_row_key(r), []).append(r)
    return {k: rs for k, rs in groups.items() if len(rs) == len(seeds)}


def within_target(result: dict[str, Any], part: str = "val", min_fewer: float = 20.0,
                  max_loss: float = 0.5) -> list[tuple[str, int]]:
    """The rows with ≥ ``min_fewer``× fewer passes per class than exact JAS at 16 images per class
    and at most ``max_loss`` points below its mean ``part`` top-1 at every ratio (none when exact
    JAS at 16 images was not evaluated in every seed)."""
    depth = result["depth"]
    exact_total = sum(passes_per_image(CANDIDATES[0], depth)) * max(IMAGES_PER_CLASS)
    groups = _groups(result)
    ref = groups.get((CANDIDATES[0].name, max(IMAGES_PER_CLASS)))
    if ref is None:
        return []
    out = []
    for key, rows in groups.items():
        total = sum(rows[0]["passes"]) * key[1]
        if total == 0 or exact_total / total < min_fewer:
            continue
        if any(_mean(rows, part, i) < _mean(ref, part, i) - max_loss for i in range(len(RATIOS))):
            continue
        out.append(key)
    return out


def choose(result: dict[str, Any], min_fewer: float = 20.0, max_loss: float = 0.5) -> tuple[str, int] | None:
    """The rule, on val only: among rows with ≥ ``min_fewer``× fewer passes per class than exact
    JAS at 16 images per class and at most ``max_loss`` points below its mean val top-1 at every
    ratio, the best mean val top-1 (ties: fewer passes)."""
    groups = _groups(result)
    best, best_key = None, None
    for key in within_target(result, "val", min_fewer, max_loss):
        rows = groups[key]
        score = (statistics.mean(_mean(rows, "val", i) for i in range(len(RATIOS))), -sum(rows[0]["passes"]) * key[1])
        if best is None or score > best:
            best, best_key = score, key
    return best_key


def _table(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    depth = result["depth"]
    exact = sum(passes_per_image(CANDIDATES[0], depth))
    keys = list(_groups(result))  # the rows every seed has
    dense = {p: [s["dense"][p] for s in seeds] for p in ("val", "test")}
    vitb = result.get("vitb", {})
    rec = result.get("reconstruction", "bias")
    how = ("bias compensation" if rec == "bias" else
           f"{rec} reconstruction (target {DEFAULT_TARGET}, damping {DEFAULT_DAMPING:g})")
    lines = [f"Shapes benchmark, builtin:shapes-vit ({depth} blocks), pruned with {how} calibrated on the "
             f"{max(IMAGES_PER_CLASS)} attribution images per class; seeds {[s['seed'] for s in seeds]}; "
             f"dense top-1 val {_fmt(dense['val'])}, test {_fmt(dense['test'])}; mean ± std over seeds. "
             f"passes/image: the scores' + the path's own JAS (which `locate` adds); ×fewer: exact JAS's "
             f"passes per image / the row's, and per class (exact at {max(IMAGES_PER_CLASS)} images) / the "
             f"row's; ViT-B s/image: random-init vit_base_patch16_224, CPU, this machine",
             "",
             "| candidate | images/class | passes/image | ×fewer /image | ×fewer /class | ViT-B s/image | "
             "val 50 % | val 70 % | test 50 % | test 70 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = _groups(result)
    for name, n in keys:
        rs = groups[(name, n)]
        p = rs[0]["passes"]
        per_img = f"{exact / sum(p):.1f}×" if sum(p) else "—"
        per_cls = f"{exact * max(IMAGES_PER_CLASS) / (sum(p) * n):.0f}×" if sum(p) else "—"
        vb = f"{vitb[name]:.1f}" if name in vitb and n == max(IMAGES_PER_CLASS) else ""
        cells = [_fmt([r[part][i] for r in rs]) for part in ("val", "test") for i in range(len(RATIOS))]
        lines.append(f"| {name} | {n} | {p[0]} + {p[1]} | {per_img} | {per_cls} | {vb} | " + " | ".join(cells) + " |")
    pick = choose(result)
    on_test = "; ".join(f"{k[0]}, {k[1]} images/class" for k in within_target(result, "test")) or "none"
    lines += ["", "chosen on val (≥ 20× fewer passes per class, ≤ 0.5 pt below exact JAS at every ratio, best "
              f"mean val top-1): {pick[0] + f', {pick[1]} images/class' if pick else 'none'}",
              "", f"within the same target on test (mean over seeds): {on_test}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_fast", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="builtin:shapes-vit")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--images-per-class", type=int, default=100, help="of the shapes source (80 probe / 20 test)")
    ap.add_argument("--fresh", action="store_true",
                    help="evaluate the selected rows again (cached scores are still reused)")
    ap.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default="bias",
                    help="after pruning: bias compensation (result.json, fast.json) or least-squares "
                         "reconstruction of fc2 (result-lsq.json, fast-lsq.json)")
    ap.add_argument("--candidates", nargs="+", metavar="NAME",
                    choices=[c.name for c in CANDIDATES] + list(YARDSTICKS),
                    help="evaluate only these rows (candidate names; activation / magnitude for the yardsticks)")
    ap.add_argument("--only-images", type=int, nargs="+", metavar="N", choices=IMAGES_PER_CLASS,
                    help="evaluate only these images per class")
    ap.add_argument("--vitb", type=int, default=0, metavar="N",
                    help="also time every candidate on a random-init ViT-B/16 with N images (exact JAS: 1)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vitb_file = args.out / "vitb.json"
    if args.vitb:
        load = os.getloadavg()[0]
        vitb = {"seconds_per_image": _vitb(args), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "load_average": [load, os.getloadavg()[0]], "images": args.vitb}
        atomic_write_json(vitb_file, vitb)
    if not args.seeds:
        return 0
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                              "depth": discover_ffn(load_model(args.model)).depth,
                              "reconstruction": args.reconstruction,
                              "seeds": [_seed_run(args, s, args.out) for s in args.seeds]}
    if vitb_file.exists():
        result["vitb"] = json.loads(vitb_file.read_text())["seconds_per_image"]
    atomic_write_json(args.out / result_files(args.reconstruction)[1], result)
    print(_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
