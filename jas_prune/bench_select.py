"""Choose JAS's pruning configuration (scope, formula, score aggregation) on the probe partition
only: the test partition is never read.

For every (scope, formula) the probe partition is located once (``paths/probe`` under
``OUT/<scope>-<formula>``, fingerprinted and resumable like a recipe run). The probe images of
each class are then split in two seeded halves: *fit* and *val*. For every score aggregation
(``aggregate.IMPORTANCE_AGGREGATIONS``) the importance is the mean over the fit images; the model
is pruned at each ratio (uniform, bias compensation from the fit images, no fine-tune) and its
top-1 measured on the val images. Taylor, magnitude and mean |activation| are run on the same
halves, side by side, as yardsticks. The configuration with the best mean val top-1 over the
ratios wins.

Run: ``python -m jas_prune.bench_select --out runs/select [--seed 0 --images-per-class 10]``.
Writes ``OUT/select.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .aggregate import IMPORTANCE_AGGREGATIONS, per_image_importance
from .data import build_source, make_loader, model_transform, partition
from .evaluate import accuracy, predict_logits
from .importance import criterion_scores, ffn_activation_stats
from .io import atomic_write_json
from .models import input_size, load_model
from .pathstore import PathStore
from .prune import prune_ffn
from .recipe import parse_recipe

__all__ = ["split_fit_val", "fit_importance", "main"]

CONFIGS = (("cls", "paper"), ("cls", "ig"), ("all", "paper"), ("all", "ig"))
YARDSTICKS = ("taylor", "magnitude", "activation")


def split_fit_val(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Positions split per class into two seeded halves (``data.partition`` at 0.5)."""
    return partition(labels, 0.5, seed)


def fit_importance(scores: torch.Tensor, positions: torch.Tensor, fit: Sequence[int], layers: Sequence[int],
                   aggregation: str) -> dict[int, torch.Tensor]:
    """Block -> per-neuron importance: ``aggregation`` of the candidate scores of the fit images."""
    rows = torch.isin(positions, torch.as_tensor(list(fit)))
    imp = per_image_importance(scores[rows].float(), aggregation).mean(0)
    return {int(b): imp[j] for j, b in enumerate(layers)}


def _locate(out: Path, scope: str, formula: str, args: argparse.Namespace, model, source):
    """Locate the probe partition with one (scope, formula) through the recipe runner's stage."""
    from .runner import CHUNK_SIZE, RunContext, prepare_run_dir, stage_locate

    recipe = parse_recipe({"version": 1, "model": {"name": args.model},
                           "data": {"kind": "shapes", "images_per_class": args.images_per_class},
                           "attribution": {"method": "jas", "steps": args.steps, "scope": scope, "formula": formula},
                           "runtime": {"seed": args.seed}})
    run = out / f"{scope}-{formula}"
    prepare_run_dir(run, resume=True)
    ctx = RunContext(recipe, run, torch.device("cpu"), model, source, model_transform(model))
    stage_locate(ctx, "probe", resume=True)
    return PathStore(run / "paths" / "probe", chunk_size=CHUNK_SIZE).read(len(source.probe))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="builtin:shapes-vit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = load_model(args.model)
    source = build_source("shapes", seed=args.seed, images_per_class=args.images_per_class)
    transform = model_transform(model)
    probe = source.subset("probe")
    fit, val = split_fit_val([s.label for s in probe], args.seed)
    fit_loader = make_loader([probe[i] for i in fit], transform, batch_size=64, seed=args.seed)
    val_samples = [probe[i] for i in val]
    val_loader = make_loader(val_samples, transform, batch_size=64, seed=args.seed)
    example = torch.zeros(1, *input_size(model))
    stats = ffn_activation_stats(model, fit_loader)
    dense = accuracy(*predict_logits(model, val_loader, sample_ids=[s.id for s in val_samples]))

    def evaluate(scores: dict[int, torch.Tensor]) -> list[float]:
        """Val top-1 after pruning a copy at every ratio (uniform, bias compensation)."""
        accs = []
        for ratio in args.ratios:
            pruned = copy.deepcopy(model)
            prune_ffn(pruned, scores, ratio=ratio, example_inputs=example, bias_compensation=stats)
            logits, labels = predict_logits(pruned, val_loader, sample_ids=[s.id for s in val_samples])
            accs.append(accuracy(logits, labels)["top1"])
        return accs

    rows: list[dict[str, Any]] = [
        {"criterion": method, "top1": evaluate(criterion_scores(method, model, fit_loader, example_inputs=example,
                                                                stats=stats))} for method in YARDSTICKS]
    for scope, formula in CONFIGS:
        located = _locate(args.out, scope, formula, args, model, source)
        for how in IMPORTANCE_AGGREGATIONS:
            scores = fit_importance(located.scores["jas"], located.positions, fit, located.layers, how)
            rows.append({"criterion": "jas", "scope": scope, "formula": formula, "aggregation": how,
                         "top1": evaluate(scores)})
    for r in rows:
        r["mean_top1"] = float(np.mean(r["top1"]))
    best = max((r for r in rows if r["criterion"] == "jas"), key=lambda r: r["mean_top1"])
    result = {"seed": args.seed, "images_per_class": args.images_per_class, "ratios": args.ratios,
              "fit_images": len(fit), "val_images": len(val), "dense_val_top1": dense["top1"],
              "rows": rows, "best": {k: best[k] for k in ("scope", "formula", "aggregation", "mean_top1")},
              "seconds": time.perf_counter() - t0}
    atomic_write_json(args.out / "select.json", result)
    print(f"val top-1 (%) after pruning with bias compensation, {len(val)} probe images held out of "
          f"{len(fit) + len(val)}; dense {100 * dense['top1']:.2f} %")
    print("| criterion | " + " | ".join(f"{100 * r:.0f} % removed" for r in args.ratios) + " | mean |")
    print("|---|" + "---:|" * (len(args.ratios) + 1))
    for r in sorted(rows, key=lambda r: -r["mean_top1"]):
        name = r["criterion"] if r["criterion"] != "jas" else f"jas {r['scope']}/{r['formula']}/{r['aggregation']}"
        print(f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in r["top1"]) + f" | {100 * r['mean_top1']:.2f} |")
    print(f"best JAS configuration: {json.dumps(result['best'])}")
    return result


if __name__ == "__main__":
    main()
