"""The cost of the greedy structured OBS selection (``prune.methods: [obs]``) at real FFN widths,
against one least-squares refit of the same block, in CPU seconds of this process.

The statistics are random (a covariance of ``tokens`` random hidden vectors): the cost depends
only on the width ``n``, the output size ``d`` and ``group``, not on the values. Run with one
thread (``OMP_NUM_THREADS=1``) for figures per core::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_obs_cost --widths 1536 3072 --groups 1 16 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jas_prune.pruning.criteria.obs import greedy_obs
from jas_prune.pruning.linfit import ridge_solve


def _stats(n: int, d: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    y = h @ torch.randn(n, d, generator=g, dtype=torch.float64) / n ** 0.5 + 0.1 * torch.randn(tokens, d, generator=g,
                                                                                                dtype=torch.float64)
    cov = h.T @ h / tokens
    return cov[None], (h.T @ y / tokens)[None], (y.pow(2).sum() / tokens)[None]


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1536, 3072], help="FFN widths n (ViT-S 1536, ViT-B 3072)")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="output size d per width (default n / 4)")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    dims = args.dims or [n // 4 for n in args.widths]
    rows = []
    for n, d in zip(args.widths, dims):
        cov, cov_hy, var_y = _stats(n, d, args.tokens, seed=n)
        lsq = _cpu(lambda: ridge_solve(cov[0] + 1e-3 * cov[0].diagonal().mean() * torch.eye(n, dtype=torch.float64),
                                       cov_hy[0]))
        for g in args.groups:
            sec = _cpu(lambda: greedy_obs(cov, cov_hy, var_y, group=g))
            rows.append({"n": n, "d": d, "group": g, "obs_cpu_s": round(sec, 2), "lsq_solve_cpu_s": round(lsq, 3),
                         "threads": torch.get_num_threads()})
            print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
