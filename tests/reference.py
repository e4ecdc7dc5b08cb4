"""Brute-force references shared by several test modules, written straight from SPEC §2 with
their own hooks, so they share no code with :mod:`jas_prune.attribution`."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ref_rule", "ref_clean", "ref_grads"]


def ref_rule(name: str, m: int) -> tuple[list[float], list[float]]:
    if name == "left":
        return [k / m for k in range(m)], [1 / m] * m
    if name == "right":
        return [(k + 1) / m for k in range(m)], [1 / m] * m
    if name == "trapezoid":
        w = [1 / (m - 1)] * m
        w[0] = w[-1] = 0.5 / (m - 1)
        return [k / (m - 1) for k in range(m)], w
    x, w = np.polynomial.legendre.leggauss(m)
    return list((x + 1) / 2), list(w / 2)


def ref_clean(model, x1, scope):
    """Clean scope activations per block ({l: [n] or [T, n]}) and clean softmax of one image."""
    store = {}
    hs = [blk.mlp.act.register_forward_hook(lambda m, i, o, l=l: store.__setitem__(l, o[0].detach().clone()))
          for l, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            p = torch.softmax(model(x1), -1)[0]
    finally:
        for h in hs:
            h.remove()
    return {l: (v[0] if scope == "cls" else v) for l, v in store.items()}, p


def ref_grads(model, x1, target, values, scope):
    """F and dF/d(values) with the scope positions of block l set to values[l] (a leaf)."""
    leaves = {l: v.detach().clone().requires_grad_(True) for l, v in values.items()}

    def hook(l):
        def fn(m, i, o):
            o = o.clone()
            if scope == "cls":
                o[0, 0] = leaves[l]
            else:
                o[0] = leaves[l]
            return o

        return fn

    hs = [model.blocks[l].mlp.act.register_forward_hook(hook(l)) for l in leaves]
    try:
        with torch.enable_grad():
            F = torch.softmax(model(x1), -1)[0, target]
            gs = torch.autograd.grad(F, [leaves[l] for l in leaves])
    finally:
        for h in hs:
            h.remove()
    return float(F.detach()), dict(zip(leaves, gs))
