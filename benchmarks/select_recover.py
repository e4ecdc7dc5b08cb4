"""Choose ``prune.recover`` (the distillation after pruning) on the probe partition only.

Pre-declared candidates (docs/deep-pruning.md): steps {200, 600} × peak lr {3e-4, 1e-3} ×
targets {[logits], [logits, tokens]} (400 steps was declared too and dropped for time before any
result came in), batch 64, temperature 2, on the shapes ``train`` split
(unlabeled, never a probe or test image). Each distils the same pruned model: ``--method``
(obs_jas, alpha 0.5, from the run's masks) at ``--ratio`` removed, least squares (residual target,
damping 1e-3) on the *fit* images — the 32 probe images per class a run of
``recipes/benchmark-shapes.yaml`` reads. Val top-1 on the other probe images of the same seed
(``bench_select.fit_val_samples``); the test partition is never read. A candidate counts only if
its distillation took at most ``--budget`` CPU-seconds (one thread: the 2-minute budget); the
winner is the highest val top-1, fewer steps on a tie (within 0.1 pt). Every cell is kept in
``OUT/cells.json`` as it is made, so an interrupted selection continues where it stopped.

    python -m benchmarks.select_recover --run runs/bench-s0 --out runs/select-recover
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import replace

import torch

from benchmarks.select_obs_jas import probe_bench, probe_parser
from jas_prune.evaluate import accuracy, predict_logits
from jas_prune.data import model_transform
from jas_prune.pruning.criteria import CRITERIA
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import reconstruct
from jas_prune.pruning.recover import RecoverSettings, recover, recovery_loader

STEPS = (600, 200)
LRS = (3e-4, 1e-3)
TARGETS = (["logits"], ["logits", "tokens"])


def candidates() -> list[RecoverSettings]:
    """The pre-declared grid, the longest first (an interrupted selection has the likeliest winners)."""
    return [RecoverSettings(steps=s, lr=lr, targets=t) for s, lr, t in itertools.product(STEPS, LRS, TARGETS)]


def label(s: RecoverSettings) -> str:
    return f"steps {s.steps}, lr {s.lr:g}, {'+'.join(s.targets)}"


def main() -> None:
    ap = probe_parser(__doc__, None, "default: every other probe image")
    ap.add_argument("--method", default="obs_jas")
    ap.add_argument("--options", type=json.loads, default={"damping": 1e-3, "alpha": 0.5})
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--budget", type=float, default=120.0, help="CPU-seconds of distillation a candidate may take")
    args = ap.parse_args()
    _, bench, inputs, setting, n_fit = probe_bench(args.recipe, args.run, args.out, args.seed, args.val_images_per_class)
    model = bench.model

    def val_top1(m: torch.nn.Module) -> float:
        return accuracy(*predict_logits(m, bench.val_batches, sample_ids=bench.val_ids, desc="val"))["top1"]

    base = copy.deepcopy(model)
    scores = CRITERIA.get(args.method).score(replace(inputs, options=args.options)).scores
    prune_ffn(base, scores, ratio=args.ratio, example_inputs=inputs.example_inputs)
    reconstruct(base, model, bench.fit_loader, target=setting.target, damping=setting.damping)
    memo = bench.memo
    for key, m in (("dense", model), ("lsq", base)):
        if key not in memo:
            memo[key] = {"top1": val_top1(m)}
            bench.save()
    print(f"dense val {100 * memo['dense']['top1']:.2f}, {args.method} {args.ratio:g} + lsq {100 * memo['lsq']['top1']:.2f}",
          flush=True)
    grid = candidates()
    # every candidate reads a prefix of the same rendered train images (the longest run's)
    longest = max(grid, key=lambda s: s.steps)
    loader = recovery_loader(longest, kind="shapes", transform=model_transform(model), seed=args.seed, classes=None)
    for s in grid:
        key = label(s)
        if key not in memo:
            student = copy.deepcopy(base)
            done = recover(student, model, loader, steps=s.steps, lr=s.lr, temperature=s.temperature,
                           targets=s.targets, progress=False)
            memo[key] = {"settings": s.model_dump(mode="json"), "top1": val_top1(student), **done}
            bench.save()
        print(f"{key}: val {100 * memo[key]['top1']:.2f}  ({memo[key]['cpu_seconds']:.0f} CPU-s, "
              f"{memo[key]['seconds']:.0f} s)", flush=True)
    fits = [label(s) for s in grid if memo[label(s)]["cpu_seconds"] <= args.budget]
    top = max(memo[k]["top1"] for k in fits)
    chosen = min((k for k in fits if memo[k]["top1"] >= top - 0.001), key=lambda k: memo[k]["settings"]["steps"])
    result = {"seed": args.seed, "method": args.method, "options": args.options, "ratio": args.ratio,
              "fit_images": n_fit, "val_images": len(bench.val_ids), "budget_cpu_seconds": args.budget,
              "cells": memo, "chosen": memo[chosen]["settings"]}
    (args.out / "select.json").write_text(json.dumps(result, indent=1))
    print(f"chosen: {chosen}")


if __name__ == "__main__":
    main()
