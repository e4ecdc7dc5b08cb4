"""Choose ``prune.obs_jas.alpha`` on the probe partition only (docs/deep-pruning.md).

Pre-declared candidates: alpha in {0.5, 1, 2} (the OBS rise times (JAS / block mean)^alpha), with
OBS (alpha 0) as the yardstick, each pruned uniformly at 90 % removed (``--ratios``) and refit by
least squares (residual target, damping 1e-3). Importance, OBS statistics and calibration read
the *fit* images: the 32 probe images per class that a run of ``recipes/benchmark-shapes.yaml``
uses (its JAS importance read from that run's masks); val top-1 on other probe images of the
same seed (``bench_select.fit_val_samples``). The test partition is never read. The winner is the
highest mean val top-1 over the ratios; a candidate replaces alpha 1 only by more than 0.1 pt.

    python -m benchmarks.select_obs_jas --run runs/bench-s0 --out runs/select-obs-jas
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.bench_select import Bench, Setting, fit_val_samples
from jas_prune.data import make_loader, model_transform
from jas_prune.evaluate import accuracy, predict_logits
from jas_prune.io import read_json
from jas_prune.models import input_size, load_model
from jas_prune.pathstore import weights_digest
from jas_prune.pruning.calibration import cached_batches, per_class_cap
from jas_prune.pruning.criteria import CRITERIA, MasksRef, ScoringInputs
from jas_prune.recipe import load_recipe

ALPHAS = (0.5, 1.0, 2.0)


def probe_bench(recipe_path: Path, run: Path, out: Path, seed: int, val_images_per_class: int | None):
    """(recipe, Bench, ScoringInputs, Setting, number of fit images) of a probe-partition selection: the fit images are
    the probe images a run of the recipe with ``seed`` reads (its JAS importance from ``run``'s
    masks), val at most ``val_images_per_class`` other probe images per class; memo in ``out``."""
    recipe = load_recipe(recipe_path, [f"runtime.seed={seed}"])
    model = load_model(recipe.model.name)
    transform = model_transform(model)
    fit, val, _ = fit_val_samples(recipe, seed)
    val = per_class_cap(val, val_images_per_class)
    fit_loader = cached_batches(make_loader(fit, transform, batch_size=64, seed=seed))
    val_batches = cached_batches(make_loader(val, transform, batch_size=256, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    memo = read_json(out / "cells.json") if (out / "cells.json").is_file() else {}
    bench = Bench(model, fit_loader, val_batches, [s.id for s in val], out, memo=memo)
    masks = MasksRef(run, recipe.masks.importance, weights_digest(model))
    inputs = ScoringInputs(model=model, loader=fit_loader, example_inputs=torch.zeros(1, *input_size(model)),
                           seed=seed, masks=masks)
    setting = Setting(target=recipe.prune.calibration.target, damping=recipe.prune.calibration.damping)
    return recipe, bench, inputs, setting, len(fit)


def probe_parser(doc: str, val_images_per_class: int | None, val_help: str | None = None) -> argparse.ArgumentParser:
    """The options every probe-partition selection shares (the recipe, its finished run, where to
    write, the seed, the held-out probe images per class)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=Path("recipes/benchmark-shapes.yaml"))
    ap.add_argument("--run", type=Path, required=True, help="a finished run of the recipe (its masks)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-images-per-class", type=int, default=val_images_per_class, help=val_help)
    return ap


def main() -> None:
    ap = probe_parser(__doc__, 16)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9])
    args = ap.parse_args()
    _, bench, inputs, setting, n_fit = probe_bench(args.recipe, args.run, args.out, args.seed, args.val_images_per_class)
    configs = {"obs (alpha 0)": ("obs", {"damping": 1e-3})}
    configs.update({f"obs_jas alpha {a:g}": ("obs_jas", {"damping": 1e-3, "alpha": a}) for a in ALPHAS})
    dense = accuracy(*predict_logits(bench.model, bench.val_batches, sample_ids=bench.val_ids, desc="val"))["top1"]
    rows = {}
    for label, (method, options) in configs.items():
        def scores(method=method, options=options):
            from dataclasses import replace

            return CRITERIA.get(method).score(replace(inputs, options=options)).scores
        accs = [bench.top1(label, scores, r, setting) for r in args.ratios]
        rows[label] = accs
        print(f"{label}: " + ", ".join(f"{100 * a:.2f}" for a in accs), flush=True)
    best = max((k for k in rows if k.startswith("obs_jas")), key=lambda k: sum(rows[k]))
    if sum(rows[best]) - sum(rows["obs_jas alpha 1"]) <= len(args.ratios) * 0.001:
        best = "obs_jas alpha 1"
    result = {"seed": args.seed, "fit_images": n_fit, "val_images": len(bench.val_ids), "dense_val_top1": dense,
              "ratios": list(args.ratios), "val_top1": rows, "chosen": best}
    (args.out / "select.json").write_text(json.dumps(result, indent=1))
    print(f"dense val {100 * dense:.2f}; chosen: {best}")


if __name__ == "__main__":
    main()
