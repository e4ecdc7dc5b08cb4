"""Reconstruction-aware scores: a neuron that the kept neurons can linearly reconstruct is cheap
to remove when ``fc2`` is refit afterwards (``prune.reconstruction: lsq``).

For block l with hidden activations h (``fc2``'s input over calibration tokens) and covariance Σ,
the share of neuron j's variance that the other neurons S cannot explain linearly is

    u_j(S) = 1 − R²_j(S) = 1 / (Σ_jj · (Σ_S⁻¹)_jj)        (S ∋ j, ridge-damped Σ)

:func:`redundancy_scores` turns any criterion's non-negative scores s into a ranking that
discounts redundancy: neurons are removed greedily, each time the one with the smallest
``s_j · u_j(S)^γ`` among the remaining S, and u is updated for the neurons left (a rank-one
downdate of Σ_S⁻¹, O(n²) per removal). The result is a score map whose order is that elimination
order (the last removed scores highest), so one ranking serves every ratio of a uniform cut,
nested like the criterion's own. With ``greedy=False`` the discount is computed once against
all neurons (``s_j · u_j(all)^γ``).

:func:`hidden_covariance` streams Σ per block from a loader, in float64, without holding tokens.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["hidden_covariance", "unexplained_share", "redundancy_scores"]


@torch.no_grad()
def hidden_covariance(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                      device: torch.device | str | None = None,
                      max_batches: int | None = None) -> dict[int, torch.Tensor]:
    """Block -> covariance (float64, population) of ``fc2``'s input over every token of the
    loader's images (of ``classes``). The model is left as it was.

    Raises:
        InvalidArgumentError: the loader yielded no image (of ``classes``).
    """
    from .graph import find_vit
    from .stats import device_of, forward_probe

    _, info = find_vit(model)
    dev = device_of(model, device)
    sums = {l.index: [0, torch.zeros(l.hidden, dtype=torch.float64, device=dev),
                      torch.zeros(l.hidden, l.hidden, dtype=torch.float64, device=dev)] for l in info.layers}

    def hook_for(block: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            h = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc = sums[block]
            acc[0] += h.shape[0]
            acc[1] += h.sum(0)
            acc[2] += h.T @ h
        return hook

    forward_probe(model, loader, [l.fc2.register_forward_pre_hook(hook_for(l.index)) for l in info.layers],
                  classes=classes, device=dev, max_batches=max_batches)
    out = {}
    for block, (n, s, ss) in sums.items():
        mu = s / n
        c = ss / n - torch.outer(mu, mu)
        out[block] = (0.5 * (c + c.T)).cpu()
    return out


def _damped_inverse(cov: torch.Tensor, damping: float) -> torch.Tensor:
    n = cov.shape[0]
    scale = float(cov.diagonal().mean()) if n else 0.0
    a = cov + damping * (scale if scale > 0 else 1.0) * torch.eye(n, dtype=cov.dtype)
    return torch.linalg.pinv(a, hermitian=True)


def unexplained_share(cov: torch.Tensor, damping: float = 1e-3) -> torch.Tensor:
    """``1 − R²_j`` of every neuron against all the others (ridge-damped), in [0, 1]."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    inv = _damped_inverse(cov, damping)
    var = cov.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
    return (1.0 / (var * inv.diagonal().clamp_min(torch.finfo(torch.float64).tiny))).clamp(0.0, 1.0)


def _greedy_order(s: torch.Tensor, cov: torch.Tensor, gamma: float, damping: float) -> torch.Tensor:
    """Elimination rank of every neuron (0 = removed first, n-1 = kept longest)."""
    n = len(s)
    inv = _damped_inverse(cov, damping)
    var = cov.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
    alive = torch.ones(n, dtype=torch.bool)
    rank = torch.empty(n, dtype=torch.float64)
    for step in range(n):
        u = (1.0 / (var * inv.diagonal().clamp_min(torch.finfo(torch.float64).tiny))).clamp(0.0, 1.0)
        cost = torch.where(alive, s * u.pow(gamma), torch.full_like(s, float("inf")))
        j = int(torch.argmin(cost))
        rank[j] = step
        alive[j] = False
        pjj = inv[j, j]
        if pjj > 0:  # Σ_S⁻¹ without j: P − P[:, j] P[j, :] / P[j, j]
            inv = inv - torch.outer(inv[:, j], inv[j, :]) / pjj
        inv[j, :] = 0.0
        inv[:, j] = 0.0
        inv[j, j] = 1.0 / var[j]  # a dead neuron stays out of the argmin (cost inf), any value works
    return rank


def redundancy_scores(scores: Mapping[int, torch.Tensor], covariance: Mapping[int, torch.Tensor], *,
                      gamma: float = 1.0, damping: float = 1e-3, greedy: bool = True) -> dict[int, torch.Tensor]:
    """Scores discounted by redundancy (see the module docstring).

    Args:
        scores: block -> non-negative per-neuron scores (higher = keep).
        covariance: block -> covariance of the block's hidden activations (:func:`hidden_covariance`).
        gamma: strength of the discount (0: the scores' own order).
        damping: ridge damping of the covariance, relative to its mean diagonal.
        greedy: update the discount as neurons are removed (else one-shot against all neurons).

    Returns:
        block -> scores whose order is the discounted one (``greedy``: the elimination rank).

    Raises:
        InvalidArgumentError: negative scores, a block without covariance or of another width.
    """
    if gamma < 0 or damping < 0:
        raise InvalidArgumentError(f"gamma, damping: must be >= 0 (got {gamma}, {damping})")
    out: dict[int, torch.Tensor] = {}
    for block, s in scores.items():
        s64 = torch.as_tensor(s, dtype=torch.float64).cpu()
        if bool((s64 < 0).any()):
            raise InvalidArgumentError(f"scores[{block}]: redundancy needs non-negative scores")
        if block not in covariance:
            raise InvalidArgumentError(f"covariance: no covariance for block {block}")
        cov = torch.as_tensor(covariance[block], dtype=torch.float64).cpu()
        if cov.shape != (len(s64), len(s64)):
            raise InvalidArgumentError(f"covariance[{block}]: shape {tuple(cov.shape)} for {len(s64)} neurons")
        if greedy:
            out[block] = _greedy_order(s64, cov, gamma, damping).float()
        else:
            out[block] = (s64 * unexplained_share(cov, damping).pow(gamma)).float()
    return out
