"""``obs``: greedy structured Optimal Brain Surgeon on each FFN (reconstruction-aware selection).

A score that ignores the refit keeps neurons that the others reconstruct linearly. Structured OBS
(ZipLM, SlimGPT; Hassibi & Stork 1993 per column) chooses what to drop *jointly with* the
closed-form update of ``fc2``: on the calibration tokens of each block, with the hidden ``h`` and
the dense FFN output ``y``, the block's error after removing the set S and refitting the remaining
``fc2`` columns (ridge least squares with an undamped intercept, the ``lsq`` reconstruction of
:mod:`jas_prune.pruning.reconstruct`) is

    E(S) = min_{W: W[:, S] = 0, b}  mean ‖W h + b − y‖²  (+ λ‖W‖²),

and from the optimum, removing neuron q raises it by ``‖W[:, q]‖² / [A⁻¹]_qq`` (A the damped
covariance of h). At every step the neuron with the smallest rise goes, ``W`` takes the optimal
update of the remaining columns and ``A⁻¹`` a rank-one downdate, in float64, for all blocks of
one width at once (batched). The removal order is the ranking; a neuron's score is the block's
relative error (over the target's energy) once it is removed, so uniform pruning at any ratio
removes exactly the greedy prefix and global pruning compares blocks by relative error.

``obs_jas`` is the JAS-guided variant: the rise of each candidate is multiplied by its JAS
importance (normalised to mean 1 in its block) to the power ``alpha``, so a neuron the classes'
attribution needs is dropped later at equal reconstruction cost. With uniform importance it is
``obs``.

With ``prune.attention`` both also score attention heads and head dimensions
(:func:`obs_head_scores`): the same greedy OBS on each attention output projection over *groups*
of its input columns (a head's ``head_dim`` columns; a dimension's column in every head), the
rise of a group S being ``tr(W_S [A⁻¹]_SS⁻¹ W_Sᵀ)`` with an exact rank-|S| update.

Cost: one pass over the probe images (the ``fc2`` statistics, :class:`~jas_prune.pruning.
linfit.LinearFit`) and O(n³) per block for the n − 1 greedy steps (``group`` > 1 removes
that many neurons per step with a rank-``group`` update: fewer, larger matrix products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from pydantic import Field

from ...schema import Strict
from ..attention import HEAD_CRITERIA, HeadCriterion, HeadScores, jas_head_importance, layout_of
from . import CRITERIA, Criterion, CriterionScores, ScoringInputs

__all__ = ["ObsOptions", "ObsJasOptions", "GreedyObs", "greedy_obs", "linear_fits", "ffn_fits", "obs_scores",
           "obs_head_scores"]


class ObsOptions(Strict):
    """``prune.obs``."""

    #: relative ridge damping of the covariance (times its mean diagonal), as ``prune.calibration``
    damping: float = Field(default=1e-3, ge=0.0, allow_inf_nan=False)
    #: neurons removed per greedy step (1: exact greedy; more: faster on wide FFNs)
    group: int = Field(default=1, ge=1)


class ObsJasOptions(ObsOptions):
    """``prune.obs_jas``: ``obs`` with each rise multiplied by (JAS importance / block mean)^alpha."""

    alpha: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)


@dataclass
class GreedyObs:
    """A greedy OBS removal sequence per block (batched over blocks of one width).

    ``order[l, k]`` is the k-th unit (neuron, or group of columns) removed from block l (the last
    one is never removed); ``error[l, k]`` the block's error after removing ``order[l, :k + 1]``
    and refitting; ``base`` the error of the full refit (nothing removed).
    """

    order: torch.Tensor  # [L, U] long
    error: torch.Tensor  # [L, U] float64 (the last entry is +inf: the kept unit)
    base: torch.Tensor  # [L] float64


def _unit_rise(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor | None,
               removed: torch.Tensor) -> torch.Tensor:
    """The rise of the error when each unit S goes, ``tr(W_S [A⁻¹_SS]⁻¹ W_Sᵀ)`` [L, U] (one
    column: ``‖W_q‖² / [A⁻¹]_qq``). A removed unit's block is zero: it gets the identity (its
    rise is masked by the caller)."""
    if units is None:
        return w.pow(2).sum(1) / hinv.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float64).tiny)
    hb = hinv[:, units[:, :, None], units[:, None, :]]  # [L, U, k, k]
    hb = torch.where(removed[..., None, None], torch.eye(units.shape[1], dtype=hb.dtype, device=hb.device), hb)
    wb = w[:, :, units].permute(0, 2, 3, 1)  # [L, U, k, d]
    return (torch.linalg.solve(hb, wb) * wb).sum((-2, -1))


def greedy_obs(cov: torch.Tensor, cov_hy: torch.Tensor, var_y: torch.Tensor, *, damping: float = 1e-3,
               weights: torch.Tensor | None = None, group: int = 1, units: torch.Tensor | None = None) -> GreedyObs:
    """Greedy structured OBS on centred statistics (batched: a leading block dimension).

    Args:
        cov: ``Cov(h)`` [L, n, n]; cov_hy: ``Cov(h, y)`` [L, n, d]; var_y: ``tr Cov(y)`` [L].
        damping: ridge λ relative to the mean diagonal of ``cov`` (the error then includes λ‖W‖²).
        weights: [L, U] positive multipliers of each unit's rise (``obs_jas``); None: 1.
        group: units removed per step; each step's set is the ``group`` smallest rises, removed
            jointly with the exact rank-``group·k`` update.
        units: [U, k] the columns of each unit, removed together (an attention head's ``head_dim``
            columns of the output projection); None: every column is a unit (FFN neurons).
    """
    cov, cov_hy, var_y = cov.double(), cov_hy.double(), var_y.double()
    nb, n, _ = cov.shape
    if units is not None:
        units = units.to(cov.device)
    n_units = n if units is None else units.shape[0]
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(n, dtype=torch.float64, device=cov.device)
    a = cov + (damping * scale)[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(a)
    hinv = torch.cholesky_inverse(chol) if int(info.max()) == 0 else torch.linalg.pinv(a, hermitian=True)
    w = (hinv @ cov_hy).transpose(1, 2).contiguous()  # the optimal W [L, d, n]
    base = (var_y - (w.transpose(1, 2) * cov_hy).sum((1, 2))).clamp_min(0.0)
    removed = torch.zeros(nb, n_units, dtype=torch.bool, device=cov.device)
    order = torch.empty(nb, n_units, dtype=torch.long, device=cov.device)
    error = torch.full((nb, n_units), float("inf"), dtype=torch.float64, device=cov.device)
    rows = torch.arange(nb, device=cov.device)
    total, done = base.clone(), 0
    while done < n_units - 1:
        g = min(group, n_units - 1 - done)
        rise = _unit_rise(w, hinv, units, removed)
        obj = rise if weights is None else rise * weights
        obj = obj.masked_fill(removed, float("inf"))
        if g == 1 and units is None:
            q = obj.argmin(1)
            hq = hinv[rows, q]  # [L, n]
            scaled = hq / hq[rows, q][:, None]
            wq = w[rows, :, q]  # [L, d]
            total = total + rise[rows, q]
            w.baddbmm_(wq[:, :, None], scaled[:, None, :], alpha=-1.0)  # in place: no copy of A⁻¹ per step
            hinv.baddbmm_(hq[:, :, None], scaled[:, None, :], alpha=-1.0)
            us = qs = q[:, None]
        else:
            us = obj.topk(g, dim=1, largest=False).indices  # [L, g] units
            qs = us if units is None else units[us].flatten(1)  # [L, g·k] their columns
            m = qs.shape[1]
            hs = torch.gather(hinv, 1, qs[:, :, None].expand(nb, m, n))  # rows [L, m, n]
            hss = torch.gather(hs, 2, qs[:, None, :].expand(nb, m, m))  # [L, m, m]
            ws = torch.gather(w, 2, qs[:, None, :].expand(nb, w.shape[1], m))  # [L, d, m]
            sol = torch.linalg.solve(hss, hs)  # Hss⁻¹ H[S, :]
            total = total + (torch.linalg.solve(hss, ws.transpose(1, 2)) * ws.transpose(1, 2)).sum((1, 2))
            w.baddbmm_(ws, sol, alpha=-1.0)
            hinv.baddbmm_(hs.transpose(1, 2), sol, alpha=-1.0)
        # the removed rows and columns are exactly zero: clear the rounding left in them
        removed[rows[:, None], us] = True
        sel = rows[:, None].expand_as(qs)
        w[sel, :, qs] = 0.0
        hinv[sel, qs, :] = 0.0
        hinv[sel, :, qs] = 0.0
        order[:, done:done + us.shape[1]] = us
        error[:, done:done + us.shape[1]] = total[:, None]
        done += us.shape[1]
    order[:, n_units - 1] = (~removed).long().argmax(1)
    return GreedyObs(order=order, error=error, base=base)


def linear_fits(model: torch.nn.Module, loader: Iterable, layers: dict[int, torch.nn.Linear], *,
                classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                max_batches: int | None = None) -> dict[int, "LinearFit"]:
    """The statistics of each linear layer (input, output) on the probe tokens, one
    :class:`~jas_prune.pruning.linfit.LinearFit` per block.

    Raises:
        InvalidArgumentError: no probe image (of ``classes``).
    """
    from ..linfit import LinearFit
    from ..stats import device_of, forward_probe

    dev = device_of(model, device)
    fits = {b: LinearFit(m.in_features, m.out_features, device=dev) for b, m in layers.items()}

    def hook(index: int):
        return lambda _m, args, out: fits[index].add(args[0], out)

    forward_probe(model, loader, [m.register_forward_hook(hook(b)) for b, m in layers.items()], classes=classes,
                  device=dev, max_batches=max_batches)
    return fits


def ffn_fits(model: torch.nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
             device: torch.device | str | None = None, max_batches: int | None = None) -> dict[int, "LinearFit"]:
    """The ``fc2`` statistics of every FFN on the probe tokens: hidden (the input of ``fc2``) and
    the dense FFN output (its output)."""
    from ...models import discover_ffn

    layers = {l.index: l.fc2 for l in discover_ffn(model).layers if l.prunable}
    return linear_fits(model, loader, layers, classes=classes, device=device, max_batches=max_batches)


def obs_scores(fits: dict[int, "LinearFit"], *, damping: float = 1e-3, group: int = 1,
               importance: dict[int, torch.Tensor] | None = None, alpha: float = 1.0,
               units: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Per-unit scores from the greedy OBS order: the block's relative error once the unit is
    removed (later = higher; the unit never removed scores above all). ``importance``: the JAS
    scores that weigh each rise (``obs_jas``); ``units``: per block the ``[U, k]`` columns of
    each unit (:func:`greedy_obs`), None for one unit per column (FFN neurons)."""
    by_shape: dict[tuple, list[int]] = {}
    for b, fit in fits.items():
        cols = None if units is None else tuple(units[b].flatten().tolist()) + tuple(units[b].shape)
        by_shape.setdefault((fit.n_in, cols), []).append(b)
    out: dict[int, torch.Tensor] = {}
    for blocks in by_shape.values():
        moments = [fits[b].moments() for b in blocks]
        cov = torch.stack([m[2] for m in moments])
        cov_hy = torch.stack([m[3] for m in moments])
        var_y = torch.stack([(fits[b].sum_yy / fits[b].count - m[1].pow(2).sum()) for b, m in zip(blocks, moments)])
        weights = None
        if importance is not None:
            s = torch.stack([importance[b].double().to(cov.device).clamp_min(0.0) for b in blocks])
            s = s / s.mean(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            weights = s.clamp_min(1e-6).pow(alpha)
        cols = None if units is None else units[blocks[0]]
        greedy = greedy_obs(cov, cov_hy, var_y, damping=damping, weights=weights, group=group, units=cols)
        energy = var_y.clamp_min(torch.finfo(torch.float64).tiny)
        n = greedy.order.shape[1]
        for i, b in enumerate(blocks):
            rel = (greedy.error[i] / energy[i]).clamp(max=1e6)
            rel[-1] = rel[-2] + 1.0 if n > 1 else 1.0  # the unit never removed
            # strictly increasing in removal order (ties of equal error broken by the order)
            rel = torch.cummax(rel, 0).values + torch.arange(n, dtype=torch.float64) * 1e-12
            score = torch.empty(n, dtype=torch.float64)
            score[greedy.order[i].cpu()] = rel.cpu()
            out[b] = score.float()
    return out


def _fits(inputs: ScoringInputs, name: str) -> dict:
    cache = inputs._cache
    if "ffn_fits" not in cache:
        cache["ffn_fits"] = ffn_fits(inputs.model, inputs.require_loader(name), classes=inputs.classes,
                                     device=inputs.device, max_batches=inputs.max_batches)
    return cache["ffn_fits"]


def _score_obs(inputs: ScoringInputs) -> CriterionScores:
    opts = inputs.options_as(ObsOptions, "prune.obs")
    return CriterionScores(obs_scores(_fits(inputs, "obs"), damping=opts.damping, group=opts.group), cumulative=True)


def _score_obs_jas(inputs: ScoringInputs) -> CriterionScores:
    from dataclasses import replace

    opts = inputs.options_as(ObsJasOptions, "prune.obs_jas")
    jas = CRITERIA.get("jas").score(replace(inputs, options=None))
    scores = obs_scores(_fits(inputs, "obs_jas"), damping=opts.damping, group=opts.group,
                        importance=jas.scores, alpha=opts.alpha)
    return CriterionScores(scores, jas.protect, cumulative=True)


def obs_head_scores(inputs: ScoringInputs, name: str = "obs") -> HeadScores:
    """Greedy structured OBS on each attention output projection (:func:`greedy_obs` over groups
    of its input columns, on the probe tokens): heads are the groups ``h·d:(h+1)·d``; a head
    dimension j is the group ``{h·d + j}`` of every head — its value channels, so the dimension
    score covers the value path only (the query/key channels removed with it have no closed-form
    refit here: ``prune.attention.logits`` compensates them). ``obs_jas``: each head's rise times
    (head JAS / block mean)^alpha, head JAS obtained (and protected) as the ``jas`` head scores;
    its dimension scores are those of ``obs``. One unit per greedy step (a block has few heads
    and dimensions)."""
    opts = inputs.options_as(ObsJasOptions if name == "obs_jas" else ObsOptions, f"prune.{name}")
    heads = layout_of(inputs.model)[1]
    if "attention_fits" not in inputs._cache:
        inputs._cache["attention_fits"] = linear_fits(
            inputs.model, inputs.require_loader(name), {h.index: h.proj for h in heads}, classes=inputs.classes,
            device=inputs.device, max_batches=inputs.max_batches)
    fits = inputs._cache["attention_fits"]
    cols = {h.index: torch.arange(h.heads * h.head_dim).view(h.heads, h.head_dim) for h in heads}
    importance, protect = jas_head_importance(inputs) if name == "obs_jas" else (None, {})
    by_head = obs_scores(fits, damping=opts.damping, units=cols, importance=importance,
                         alpha=getattr(opts, "alpha", 1.0))
    by_dim = obs_scores(fits, damping=opts.damping, units={b: c.t().contiguous() for b, c in cols.items()})
    return HeadScores(by_head, by_dim, protect, cumulative=True)


CRITERIA.add(Criterion(
    name="obs", label="OBS", colour="#17becf", needs_data=True, score=_score_obs, options=ObsOptions,
    summary="greedy structured OBS: drop the neuron whose removal with the optimal fc2 update raises the "
            "block's calibration error least",
))
CRITERIA.add(Criterion(
    name="obs_jas", label="OBS×JAS", colour="#bcbd22", needs_data=True, score=_score_obs_jas, options=ObsJasOptions,
    summary="greedy structured OBS with each neuron's error rise weighted by its JAS importance^alpha",
))
HEAD_CRITERIA.add(HeadCriterion("obs", obs_head_scores))
HEAD_CRITERIA.add(HeadCriterion("obs_jas", lambda inputs: obs_head_scores(inputs, "obs_jas")))
