"""Choose how the 90 % is spread over the blocks for the OBS criteria, on the probe partition only.

``obs`` and ``obs_jas`` score a neuron by its block's relative error (over the FFN output's
energy) once it is removed, so ``prune.mode: global`` compares blocks on one scale: it removes
neurons wherever the relative error stays lowest, instead of the same share of every block.
Pre-declared candidates (docs/deep-pruning.md): uniform, and global with ``prune.global_min_keep``
in {0.25, 0.5, 0.75} (each block keeps at least that fraction of the uniform width), for
``obs_jas`` (alpha 0.5) and ``obs`` at ``--ratios`` removed, least squares (residual, 1e-3). Fit and
val images as in :mod:`benchmarks.select_obs_jas` (val: every other probe image by default); the
test partition is never read. Per criterion the winner is the highest val top-1; global replaces
uniform only by more than 0.5 pt (about one standard error at 3,264 val images).

    python -m benchmarks.select_allocation --run runs/bench-s0 --out runs/select-allocation
"""

from __future__ import annotations

import json
from dataclasses import replace

from benchmarks.select_obs_jas import probe_bench, probe_parser
from jas_prune.pruning.criteria import CRITERIA

MIN_KEEP = (0.25, 0.5, 0.75)
METHODS = {"obs_jas": {"damping": 1e-3, "alpha": 0.5}, "obs": {"damping": 1e-3}}


def main() -> None:
    ap = probe_parser(__doc__, None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9])
    args = ap.parse_args()
    _, bench, inputs, setting, n_fit = probe_bench(args.recipe, args.run, args.out, args.seed, args.val_images_per_class)
    settings = {"uniform": setting, **{f"global, min keep {k:g}": replace(setting, mode="global", global_min_keep=k)
                                       for k in MIN_KEEP}}
    rows: dict[str, dict[str, list[float]]] = {}
    chosen: dict[str, str] = {}
    for method, options in METHODS.items():
        cache: dict = {}

        def scores(method=method, options=options, cache=cache):
            if "s" not in cache:
                cache["s"] = CRITERIA.get(method).score(replace(inputs, options=options)).scores
            return cache["s"]
        rows[method] = {name: [bench.top1(method, scores, r, s) for r in args.ratios] for name, s in settings.items()}
        for name, accs in rows[method].items():
            print(f"{method} {name}: " + ", ".join(f"{100 * a:.2f}" for a in accs), flush=True)
        best = max(rows[method], key=lambda k: sum(rows[method][k]))
        gain = sum(rows[method][best]) - sum(rows[method]["uniform"])
        chosen[method] = best if gain > len(args.ratios) * 0.005 else "uniform"
        print(f"{method}: chosen {chosen[method]}", flush=True)
    result = {"seed": args.seed, "fit_images": n_fit, "val_images": len(bench.val_ids), "ratios": list(args.ratios),
              "val_top1": rows, "chosen": chosen}
    (args.out / "select.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
