"""Paired per-seed differences between criteria with a 95 % interval, and what the design can detect.

Runs of one recipe with different seeds (each seed: another probe/test partition) are paired by
seed: for criteria a and b at the same setting, d_s = top1_a − top1_b per seed. The interval is
Student's t over the seeds (mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n); the *detectable* difference is the one
a two-sided 5 % paired t-test finds with 80 % power given the observed spread,
(t₀.₉₇₅ + t₀.₈₀) · sd / √n. The spread has two parts — the partition (seed) and the finite test
set — and both are in sd.

    python -m jas_prune.reporting.paired runs/bench-s0 runs/bench-s1 runs/bench-s2 --methods obs_jas obs jas
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import read_json
from ..metrics import Metrics
from .stats import RECONSTRUCTION_ORDER, as_metrics, paired_differences

__all__ = ["t_quantile", "PairedInterval", "paired_interval", "paired_rows", "main"]

#: Student's t quantiles 0.975 and 0.80 for 1..30 degrees of freedom (beyond: the normal's)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for p in {0.975, 0.80}."""
    table = {0.975: (_T975, 1.960), 0.80: (_T80, 0.842)}[p]
    return table[0][df - 1] if 1 <= df <= len(table[0]) else table[1]


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference (points), its 95 % interval, and the detectable difference."""

    n: int
    mean: float
    low: float
    high: float
    sd: float
    detectable: float

    @property
    def above_zero(self) -> bool:
        return self.low > 0


def paired_interval(diffs: Sequence[float]) -> PairedInterval:
    """The 95 % t-interval of the mean of per-seed differences (needs two seeds or more for a width)."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    detect = (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
    return PairedInterval(n, mean, mean - half, mean + half, sd, detect)


def method_label(e: Any, options: bool) -> str:
    """The criterion's name, with its options when ``options`` (``obs_jas(alpha=0.5,damping=0.001)``)."""
    if not options or not e.criterion_options:
        return e.method
    return f"{e.method}({','.join(f'{k}={v}' for k, v in sorted(e.criterion_options.items()))})"


def _top1_by_setting(metrics: Metrics, options: bool = False) -> dict[tuple, float]:
    """(selection, ratio, reconstruction, method) -> top-1 of one run (class subsets: their mean)."""
    groups: dict[tuple, list[float]] = {}
    for e in metrics.pruned or []:
        sel = ("subsets", len(e.classes or [])) if e.class_subset is not None else \
            ("all",) if e.classes is None else ("classes", *e.classes)
        groups.setdefault((sel, float(e.ratio), e.reconstruction_name, method_label(e, options)), []).append(e.top1)
    return {k: (sum(v) / len(v) if k[0][0] == "subsets" else v[-1]) for k, v in groups.items()}


def _recon_rank(name: str) -> int:
    return RECONSTRUCTION_ORDER.index(name) if name in RECONSTRUCTION_ORDER else len(RECONSTRUCTION_ORDER)


def paired_rows(runs: Sequence[Metrics | Mapping[str, Any]], methods: Sequence[str], *,
                options: bool = False) -> list[dict[str, Any]]:
    """For every setting that all ``methods`` have in every run: each pair's paired interval (points)
    and each method's difference to the best other criterion of each run (``options``: criteria
    named with their options, so that two settings of one criterion are told apart)."""
    per_run = [_top1_by_setting(m, options) for m in map(as_metrics, runs)]
    settings = sorted({k[:3] for pr in per_run for k in pr},
                      key=lambda k: (k[0] != ("all",), str(k[0]), k[1], _recon_rank(k[2])))
    out = []
    for sel, ratio, recon in settings:
        have = [m for m in methods if all((sel, ratio, recon, m) in pr for pr in per_run)]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                diffs = [100 * (pr[(sel, ratio, recon, a)] - pr[(sel, ratio, recon, b)])
                         for pr in per_run]
                out.append({"selection": sel, "ratio": ratio, "reconstruction": recon, "a": a, "b": b,
                            "interval": paired_interval(diffs)})
    for m in methods if not options else []:
        for d in paired_differences(runs, m):
            out.append({"selection": d.selection, "ratio": d.ratio, "reconstruction": d.reconstruction, "a": m,
                        "b": "best other", "interval": paired_interval([100 * x for x, _ in d.per_run])})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories of one recipe, one per seed (DIR,DIR2: the "
                                           "entries of several directories of the same seed together)")
    ap.add_argument("--methods", nargs="+", required=True, help="criteria compared pairwise")
    ap.add_argument("--options", action="store_true", help="name criteria with their options (obs_jas(alpha=0.5,...))")
    args = ap.parse_args(argv)
    runs = []
    for arg in args.runs:
        parts = [read_json(Path(d) / "metrics.json") for d in arg.split(",")]
        runs.append(Metrics.from_dict({**parts[0], "pruned": [e for p in parts for e in p.get("pruned") or []]}))
    rows = paired_rows(runs, args.methods, options=args.options)
    print("| selection | removed | reconstruction | a − b | mean (pt) | 95 % interval | sd | detectable (80 % power) |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    for r in rows:
        iv: PairedInterval = r["interval"]
        sel = "all" if r["selection"] == ("all",) else " ".join(map(str, r["selection"]))
        print(f"| {sel} | {100 * r['ratio']:.0f} % | {r['reconstruction']} | {r['a']} − {r['b']} | {iv.mean:+.2f} | "
              f"[{iv.low:+.2f}, {iv.high:+.2f}]{' *' if iv.above_zero else ''} | {iv.sd:.2f} | {iv.detectable:.2f} |")
    print(f"\n{len(runs)} seeds; * interval above zero")
    return rows


if __name__ == "__main__":
    main()
