"""Choose every pruning setting on the probe partition only: the test partition is never read.

The probe partition of ``--seed`` is split in two per class: *fit* — exactly the probe images a
recipe run uses (``data.probe_images_per_class`` of the recipe; without a cap, a seeded half of
the probe images) — and *val*, the rest of the probe partition. Importance (every criterion),
JAS locating, activation statistics, ViT-Slim training and the reconstruction's calibration read
the fit images; every choice is the one with the best val top-1. The choices, in order, each made
with the earlier ones fixed:

1. ``reconstruction``: the least-squares target (``prune.calibration.target``), then its ridge
   damping (``prune.calibration.damping``), by the mean val top-1 over the yardstick criteria
   (``--recon-methods``) and ratios; beside them bias compensation as ``prune_ffn``'s dense mean
   shift and as the reconstruction engine's sequential bias refit (``reconstruction: bias``);
2. ``jas``: the score aggregation (``masks.importance``) and the redundancy discount
   (:mod:`jas_prune.pruning.redundancy`), under the chosen reconstruction;
3. ``vit_slim``: λ, epochs and lr (``prune.vit_slim``), with as many configurations as JAS had in
   step 2 (the same selection budget), under the chosen reconstruction;
4. ``redundancy`` for the other criteria (the same discount, so that a JAS win is not the
   discount's alone);
5. ``allocation``: uniform or global with each ``prune.global_min_keep``, per ratio, by the mean
   val top-1 over every criterion (``prune.mode``).

JAS is located once on the fit images through the recipe pipeline's own stage (``OUT/locate``,
fingerprinted and resumable; a recipe run's ``paths/`` of the same settings can be copied there).
Every measured cell is kept in ``OUT/select.json`` as it is made, so an interrupted selection
continues where it stopped.

Run: ``python -m benchmarks.bench_select --recipe recipes/benchmark-shapes.yaml --out runs/select``
(``--seed``, ``--ratios``, ``--only STEP`` …). Prints a markdown table per step and the chosen
recipe keys.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from jas_prune.aggregate import IMPORTANCE_AGGREGATIONS, per_image_importance
from jas_prune.data import make_loader, model_transform, partition, source_for
from jas_prune.evaluate import accuracy, predict_logits
from jas_prune.io import atomic_write_json, read_json
from jas_prune.models import input_size, load_model
from jas_prune.pruning.calibration import cached_batches
from jas_prune.pruning.criteria import criterion_scores
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import reconstruct
from jas_prune.pruning.stats import ffn_activation_stats
from jas_prune.recipe import load_recipe, parse_recipe
from jas_prune.pipeline import locate_partition

__all__ = ["split_fit_val", "fit_val_samples", "fit_importance", "Bench", "main", "STEPS"]

STEPS = ("reconstruction", "jas", "vit_slim", "redundancy", "allocation")
TARGETS = ("local", "global", "residual")
DAMPINGS = (0.0, 1e-3, 1e-2, 1e-1)
#: redundancy discounts tried: (gamma, greedy)
REDUNDANCY = ((0.5, True), (1.0, True), (1.0, False))
#: ViT-Slim grid, in the order it is tried (λ, epochs, lr); the first ``budget`` are used
VIT_SLIM_GRID = ((1e-4, 3.0, 1e-2), (1e-3, 3.0, 1e-2), (1e-2, 3.0, 1e-2), (1e-3, 10.0, 1e-2),
                 (1e-2, 10.0, 1e-2), (1e-1, 10.0, 1e-2), (1e-3, 10.0, 5e-2), (1e-2, 10.0, 5e-2))
GLOBAL_MIN_KEEP = (0.25, 0.5, 0.75)


def split_fit_val(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Positions split per class into two seeded halves (``data.partition`` at 0.5)."""
    return partition(labels, 0.5, seed)


def fit_val_samples(recipe, seed: int) -> tuple[list, list, Any]:
    """(fit, val, source): fit = the probe images a run of ``recipe`` with ``seed`` uses, val = the
    rest of the probe partition. The source built has no test access beyond what the recipe's has."""
    d = recipe.data
    full = source_for(d, seed, cap_probe=False)
    probe = full.subset("probe")
    if d.probe_images_per_class is not None:
        capped = source_for(d, seed)
        fit = capped.subset("probe")
        ids = {s.id for s in fit}
        return fit, [s for s in probe if s.id not in ids], capped
    f, v = split_fit_val([s.label for s in probe], seed)
    return [probe[i] for i in f], [probe[i] for i in v], full


def fit_importance(scores: torch.Tensor, positions: torch.Tensor, fit: Sequence[int], layers: Sequence[int],
                   aggregation: str) -> dict[int, torch.Tensor]:
    """Block -> per-neuron importance: ``aggregation`` of the candidate scores of the fit images."""
    rows = torch.isin(positions, torch.as_tensor(list(fit)))
    imp = per_image_importance(scores[rows].float(), aggregation).mean(0)
    return {int(b): imp[j] for j, b in enumerate(layers)}


@dataclass
class Setting:
    """How one pruned model is made from a score map."""

    recon: str = "lsq"
    target: str = "residual"
    damping: float = 1e-3
    mode: str = "uniform"
    global_min_keep: float = 0.5
    #: bias compensation as prune_ffn's dense mean shift (the pre-issue-12 behaviour)
    mean_shift: bool = False

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class Bench:
    """The fit / val data and the model; measures val top-1 of pruned models, memoised on disk."""

    model: torch.nn.Module
    fit_loader: Any
    val_batches: Any
    val_ids: list[str]
    out: Path
    memo: dict[str, Any] = field(default_factory=dict)
    #: this invocation's cells file (several invocations, e.g. one per --only step, may run at once)
    cells_file: str = "cells.json"
    _stats: Any = None
    _cov: Any = None

    @property
    def stats(self):
        if self._stats is None:
            self._stats = ffn_activation_stats(self.model, self.fit_loader)
        return self._stats

    @property
    def covariance(self):
        from jas_prune.pruning.redundancy import hidden_covariance

        if self._cov is None:
            self._cov = hidden_covariance(self.model, self.fit_loader)
        return self._cov

    def save(self) -> None:
        atomic_write_json(self.out / self.cells_file, self.memo)

    def top1(self, name: str, scores: Callable[[], dict[int, torch.Tensor]] | dict[int, torch.Tensor],
             ratio: float, s: Setting) -> float:
        """Val top-1 of the model pruned with ``scores`` (memoised by name, ratio and setting)."""
        key = f"{name}|{ratio}|{s.key()}"
        if key not in self.memo:
            sc = scores() if callable(scores) else scores
            pruned = copy.deepcopy(self.model)
            example = torch.zeros(1, *input_size(self.model))
            prune_ffn(pruned, sc, ratio=ratio, mode=s.mode, example_inputs=example,
                      min_keep=float(s.global_min_keep * (1.0 - ratio)),
                      bias_compensation=self.stats if s.mean_shift else None)
            if s.recon != "none":
                reconstruct(pruned, self.model, self.fit_loader, method=s.recon, target=s.target, damping=s.damping)
            logits, labels = predict_logits(pruned, self.val_batches, sample_ids=self.val_ids, desc="val")
            self.memo[key] = accuracy(logits, labels)["top1"]
            self.save()
        return self.memo[key]


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def _table(title: str, rows: list[dict[str, Any]], ratios: Sequence[float], name: str = "config") -> list[str]:
    out = [f"### {title}", "", f"| {name} | " + " | ".join(f"{100 * r:.0f} % removed" for r in ratios) + " | mean |",
           "|---|" + "---:|" * (len(ratios) + 1)]
    for r in sorted(rows, key=lambda r: -r["mean_top1"]):
        out.append(f"| {r['label']} | " + " | ".join(f"{100 * a:.2f}" for a in r["top1"])
                   + f" | {100 * r['mean_top1']:.2f} |")
    return out + [""]


def _locate_fit(args: argparse.Namespace, recipe, model, source) -> Any:
    """The fit images' JAS paths through the pipeline's locate stage (``OUT/locate``, resumable)."""
    data = recipe.model_dump(mode="json", by_alias=True)
    only = parse_recipe({"version": 1, "model": data["model"], "data": data["data"],
                         "attribution": {**data["attribution"], "method": "jas"},
                         "runtime": {**data["runtime"], "seed": args.seed}})
    return locate_partition(only, args.out / "locate", model, source, "probe", what="bench_select")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_select", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=None,
                    help="the recipe whose model, data, attribution and prune settings are tuned "
                         "(default: the built-in model, 10 images per class, scope all / ig)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-class", type=int, default=None, help="without --recipe: data.images_per_class")
    ap.add_argument("--steps", type=int, default=None, help="override attribution.steps")
    ap.add_argument("--ratios", type=float, nargs="+", default=None, help="default: the recipe's prune.ratios")
    ap.add_argument("--recon-methods", nargs="+", default=["jas", "taylor", "magnitude", "activation"])
    ap.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--val-images-per-class", type=int, default=None, help="cap the val images of each class")
    ap.add_argument("--min-gain", type=float, default=0.001,
                    help="a setting replaces the recipe's only when its mean val top-1 is higher by more than this")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.recipe is not None:
        recipe = load_recipe(args.recipe, [f"runtime.seed={args.seed}"])
    else:
        recipe = parse_recipe({"version": 1, "data": {"images_per_class": args.images_per_class or 10},
                               "attribution": {"scope": "all", "formula": "ig"},
                               "masks": {"importance": "mean_abs_centered"},
                               "prune": {"methods": ["jas", "taylor", "magnitude", "activation"],
                                         "ratios": [0.3, 0.5, 0.7, 0.9]},
                               "runtime": {"seed": args.seed}})
    if args.steps is not None:
        recipe = parse_recipe({**recipe.model_dump(mode="json", by_alias=True),
                               "attribution": {**recipe.attribution.model_dump(mode="json"), "steps": args.steps}})
    if recipe.attribution is None or recipe.prune is None:
        raise SystemExit("bench_select: the recipe needs attribution and prune sections")
    ratios = list(args.ratios or recipe.prune.ratios)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(recipe.model.name, checkpoint=recipe.model.checkpoint, pretrained=recipe.model.pretrained,
                       num_classes=recipe.model.num_classes)
    transform = model_transform(model)
    fit, val, source = fit_val_samples(recipe, args.seed)
    if args.val_images_per_class is not None:
        from jas_prune.pruning.calibration import per_class_cap

        val = per_class_cap(val, args.val_images_per_class)
    bs = recipe.data.batch_size
    fit_loader = cached_batches(make_loader(fit, transform, batch_size=bs, seed=args.seed))
    val_batches = cached_batches(make_loader(val, transform, batch_size=256, seed=args.seed))
    memo: dict[str, Any] = {}
    for f in sorted(args.out.glob("cells*.json")):  # every earlier invocation's measurements
        memo.update(read_json(f))
    bench = Bench(model, fit_loader, val_batches, [s.id for s in val], args.out, memo=memo,
                  cells_file="cells.json" if set(args.only) == set(STEPS) else f"cells-{'-'.join(args.only)}.json")
    dense = accuracy(*predict_logits(model, val_batches, sample_ids=bench.val_ids, desc="val"))["top1"]
    print(f"fit: {len(fit)} probe images, val: {len(val)} other probe images of seed {args.seed}; "
          f"dense val top-1 {100 * dense:.2f} %", flush=True)

    methods = [m for m in recipe.prune.methods]
    located = None

    fit_ids = {s.id for s in fit}
    recipe_agg = recipe.masks.importance if recipe.masks is not None else "mean"

    def jas_scores(aggregation: str) -> dict[int, torch.Tensor]:
        nonlocal located
        if located is None:
            located = _locate_fit(args, recipe, model, source)
        rows = [int(p) for p, i in zip(located.positions, located.ids) if i in fit_ids]
        return fit_importance(located.scores["jas"], located.positions, rows, located.layers, aggregation)

    base_scores: dict[str, Any] = {}
    score_seconds: dict[str, float] = {}

    def scores_of(method: str, options: Any = None) -> dict[int, torch.Tensor]:
        key = method if options is None else f"{method}{json.dumps(options, sort_keys=True)}"
        if key not in base_scores:
            t = time.perf_counter()
            if method == "jas":
                base_scores[key] = jas_scores(options or recipe_agg)
            else:
                base_scores[key] = criterion_scores(method, model, fit_loader, example_inputs=torch.zeros(1, *input_size(model)),
                                                    seed=args.seed, options=options)
            score_seconds[key] = time.perf_counter() - t
        return base_scores[key]

    result: dict[str, Any] = {"seed": args.seed, "recipe": str(args.recipe) if args.recipe else None,
                              "ratios": ratios, "fit_images": len(fit), "val_images": len(val),
                              "dense_val_top1": dense, "steps": {}}
    chosen: dict[str, Any] = {}
    lines: list[str] = []
    setting = Setting(target=recipe.prune.calibration.target, damping=recipe.prune.calibration.damping)

    def row(label: str, name: str, scores, s: Setting, **extra) -> dict[str, Any]:
        accs = [bench.top1(name, scores, r, s) for r in ratios]
        return {"label": label, "top1": accs, "mean_top1": _mean(accs), **extra}

    def over_methods(label: str, s: Setting, names: Sequence[str], **extra) -> dict[str, Any]:
        per = [[bench.top1(f"jas:{recipe_agg}" if m == "jas" else m, lambda m=m: scores_of(m), r, s) for r in ratios]
               for m in names]
        accs = [float(np.mean(col)) for col in zip(*per)]
        return {"label": label, "top1": accs, "mean_top1": _mean(accs), **extra}

    rm = [m for m in args.recon_methods if m in methods or m == "jas"]
    if "reconstruction" in args.only:
        rows = [over_methods(f"lsq, target {t}, damping {setting.damping:g}",
                             Setting(target=t, damping=setting.damping), rm, target=t) for t in TARGETS]
        best = _pick(rows, lambda r: r["target"] == setting.target, args.min_gain)
        target = best["target"]
        rows += [over_methods(f"lsq, target {target}, damping {d:g}", Setting(target=target, damping=d), rm,
                              target=target, damping=d) for d in DAMPINGS if d != setting.damping]
        best = _pick([best] + rows[len(TARGETS):], lambda r: r is best, args.min_gain)
        damping = best.get("damping", setting.damping)
        setting = Setting(target=target, damping=damping)
        rows += [over_methods("none", Setting(recon="none"), rm),
                 over_methods("bias: prune_ffn mean shift (dense inputs)", Setting(recon="none", mean_shift=True), rm),
                 over_methods(f"bias: sequential refit, target {target}", Setting(recon="bias", target=target), rm)]
        chosen.update({"prune.calibration.target": target, "prune.calibration.damping": damping})
        result["steps"]["reconstruction"] = rows
        lines += _table(f"Reconstruction (mean over {', '.join(rm)})", rows, ratios)
    lsq = setting

    jas_budget = 0
    if "jas" in args.only and "jas" in methods:
        rows = [row(f"jas {a}", f"jas:{a}", lambda a=a: scores_of("jas", a), lsq, aggregation=a, redundancy=None)
                for a in IMPORTANCE_AGGREGATIONS]
        best_agg = _pick(rows, lambda r: r["aggregation"] == recipe_agg, args.min_gain)["aggregation"]
        signed = best_agg == "mean"
        for gamma, greedy in ([] if signed else REDUNDANCY):
            rows.append(row(f"jas {best_agg} + redundancy γ={gamma:g}{' greedy' if greedy else ''}",
                            f"jas:{best_agg}:red{gamma}:{greedy}",
                            lambda g=gamma, gr=greedy: _redundant(bench, scores_of("jas", best_agg), g, gr), lsq,
                            aggregation=best_agg, redundancy={"gamma": gamma, "greedy": greedy}))
        best = _pick(rows, lambda r: r["aggregation"] == best_agg and r["redundancy"] is None, args.min_gain)
        jas_budget = len(rows)
        chosen.update({"masks.importance": best["aggregation"], "jas.redundancy": best["redundancy"]})
        result["steps"]["jas"] = rows
        lines += _table(f"JAS importance ({jas_budget} configurations, reconstruction lsq)", rows, ratios)

    if "vit_slim" in args.only and "vit_slim" in methods:
        budget = jas_budget or len(IMPORTANCE_AGGREGATIONS) + len(REDUNDANCY)
        rows = []
        for lam, epochs, lr in VIT_SLIM_GRID[:budget]:
            opts = {"lambda": lam, "epochs": epochs, "lr": lr}
            name = f"vit_slim{json.dumps(opts, sort_keys=True)}"
            rows.append(row(f"vit_slim λ={lam:g} epochs={epochs:g} lr={lr:g}", name,
                            lambda o=opts: scores_of("vit_slim", o), lsq, options=opts,
                            seconds=score_seconds.get(name)))
        current = recipe.prune.vit_slim.model_dump(mode="json", by_alias=True)
        best = _pick(rows, lambda r: r["options"] == current, args.min_gain)
        chosen["prune.vit_slim"] = best["options"]
        result["steps"]["vit_slim"] = rows
        lines += _table(f"ViT-Slim ({len(rows)} configurations = JAS's budget, reconstruction lsq)", rows, ratios)

    others = [m for m in methods if m not in ("jas", "random", "vit_slim")]
    if "redundancy" in args.only and others:
        rows = [over_methods("no discount", lsq, others, redundancy=None)]
        for gamma, greedy in REDUNDANCY:
            per = [[bench.top1(f"{m}:red{gamma}:{greedy}",
                               lambda m=m, g=gamma, gr=greedy: _redundant(bench, _nonneg(scores_of(m)), g, gr), r, lsq)
                    for r in ratios] for m in others]
            accs = [float(np.mean(c)) for c in zip(*per)]
            rows.append({"label": f"redundancy γ={gamma:g}{' greedy' if greedy else ''}", "top1": accs,
                         "mean_top1": _mean(accs), "redundancy": {"gamma": gamma, "greedy": greedy}})
        chosen["redundancy (other criteria)"] = _pick(rows, lambda r: r["redundancy"] is None,
                                                      args.min_gain)["redundancy"]
        result["steps"]["redundancy"] = rows
        lines += _table(f"Redundancy discount for {', '.join(others)} (mean)", rows, ratios)

    if "allocation" in args.only:
        everyone = [m for m in methods if m != "random"]
        vs_opts = chosen.get("prune.vit_slim")

        def scores_for(m: str):
            if m == "jas":
                agg = chosen.get("masks.importance", recipe.masks.importance if recipe.masks else "mean")
                red = chosen.get("jas.redundancy")
                return (lambda: _redundant(bench, scores_of("jas", agg), red["gamma"], red["greedy"])) if red \
                    else (lambda: scores_of("jas", agg)), f"jas:{agg}" + (f":red{red['gamma']}:{red['greedy']}" if red else "")
            if m == "vit_slim" and vs_opts is not None:
                return (lambda: scores_of("vit_slim", vs_opts)), f"vit_slim{json.dumps(vs_opts, sort_keys=True)}"
            return (lambda: scores_of(m)), m

        configs = [("uniform", Setting(target=lsq.target, damping=lsq.damping))] + [
            (f"global, min keep {k:g}", Setting(target=lsq.target, damping=lsq.damping, mode="global",
                                                global_min_keep=k)) for k in GLOBAL_MIN_KEEP]
        rows = []
        for label, s in configs:
            per = []
            for m in everyone:
                fn, name = scores_for(m)
                per.append([bench.top1(name, fn, r, s) for r in ratios])
            accs = [float(np.mean(c)) for c in zip(*per)]
            rows.append({"label": label, "top1": accs, "mean_top1": _mean(accs), "mode": s.mode,
                         "global_min_keep": s.global_min_keep,
                         "per_method": {m: p for m, p in zip(everyone, per)}})
        # one prune.global_min_keep for every ratio (the best global row), then per ratio uniform or global
        glob = max(rows[1:], key=lambda row: row["mean_top1"])
        per_ratio = {}
        for i, r in enumerate(ratios):
            pair = [{**row, "mean_top1": row["top1"][i]} for row in (rows[0], glob)]
            best = _pick(pair, lambda row: row["mode"] == recipe.prune.mode_for(r), args.min_gain)
            per_ratio[f"{r:g}"] = best["mode"]
        chosen["prune.mode (per ratio)"] = per_ratio
        chosen["prune.global_min_keep"] = glob["global_min_keep"]
        result["steps"]["allocation"] = rows
        lines += _table(f"Allocation (mean over {', '.join(everyone)})", rows, ratios)

    result["chosen"] = chosen
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(args.out / "select.json", result)
    print(f"val top-1 (%) after pruning, {len(val)} probe images held out, importance and calibration on the "
          f"other {len(fit)}; dense {100 * dense:.2f} %\n")
    print("\n".join(lines))
    print("chosen: " + json.dumps(chosen))
    return result


def _pick(rows: Sequence[dict[str, Any]], incumbent: Callable[[dict[str, Any]], bool], min_gain: float) -> dict[str, Any]:
    """The row with the best mean val top-1, unless it beats the recipe's current setting (the
    first row ``incumbent`` accepts) by no more than ``min_gain``: then the current setting. A
    difference of one val image is noise, not a reason to change a recipe."""
    best = max(rows, key=lambda r: r["mean_top1"])
    cur = next((r for r in rows if incumbent(r)), None)
    if cur is not None and best["mean_top1"] - cur["mean_top1"] <= min_gain:
        return cur
    return best


def _nonneg(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Scores shifted to be >= 0 per block (the redundancy discount multiplies them)."""
    return {b: s - s.min().clamp(max=0) for b, s in scores.items()}


def _redundant(bench: Bench, scores: dict[int, torch.Tensor], gamma: float, greedy: bool) -> dict[int, torch.Tensor]:
    from jas_prune.pruning.redundancy import redundancy_scores

    return redundancy_scores(_nonneg(scores), bench.covariance, gamma=gamma, greedy=greedy)


if __name__ == "__main__":
    main()
