"""``obs`` / ``obs_jas``: every greedy step is the best explicit drop-and-refit (brute force over
every candidate), the predicted error is the explicitly refit error, and the JAS-guided variant
with uniform importance is OBS."""

from __future__ import annotations

import pytest
import torch

from jas_prune.pruning.criteria import CRITERIA, ScoringInputs
from jas_prune.pruning.criteria.obs import ffn_fits, greedy_obs, obs_scores
from jas_prune.pruning.reconstruct import LinearFit


def _layer(seed: int, tokens: int = 200, n: int = 7, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.3  # correlated neurons
    y = h @ torch.randn(n, d, generator=g, dtype=torch.float64) + 0.2 * torch.randn(tokens, d, generator=g,
                                                                                      dtype=torch.float64)
    return h, y


def _fit(h, y) -> LinearFit:
    fit = LinearFit(h.shape[1], y.shape[1])
    fit.add(h, y)
    return fit


def _refit_error(h, y, kept) -> float:
    """Explicit drop-and-refit: ordinary least squares (with intercept) on the kept neurons."""
    fit = _fit(h[:, kept], y)
    w, b, _ = fit.solve(0.0)
    return fit.error(w, b)


def _stats(layers):
    fits = [_fit(h, y) for h, y in layers]
    moments = [f.moments() for f in fits]
    cov = torch.stack([m[2] for m in moments])
    cov_hy = torch.stack([m[3] for m in moments])
    var_y = torch.stack([f.sum_yy / f.count - m[1].pow(2).sum() for f, m in zip(fits, moments)])
    return cov, cov_hy, var_y


def test_each_greedy_step_is_the_best_explicit_drop_and_refit():
    layers = [_layer(0), _layer(1)]
    greedy = greedy_obs(*_stats(layers), damping=0.0)  # two blocks batched
    for i, (h, y) in enumerate(layers):
        n = h.shape[1]
        assert sorted(greedy.order[i].tolist()) == list(range(n))
        assert greedy.base[i].item() == pytest.approx(_refit_error(h, y, list(range(n))), rel=1e-9)
        removed: list[int] = []
        for k in range(n - 1):
            left = [j for j in range(n) if j not in removed]
            brute = {q: _refit_error(h, y, [j for j in left if j != q]) for q in left}
            pick = int(greedy.order[i, k])
            assert brute[pick] == pytest.approx(min(brute.values()), rel=1e-9, abs=1e-12)
            # the predicted error is the explicitly refit error
            assert greedy.error[i, k].item() == pytest.approx(brute[pick], rel=1e-8, abs=1e-10)
            removed.append(pick)


def test_group_steps_predict_the_refit_error_exactly():
    h, y = _layer(2, n=9)
    greedy = greedy_obs(*_stats([(h, y)]), damping=0.0, group=3)
    order = greedy.order[0].tolist()
    for k in (2, 5, 7):  # after each group of three (the last step removes the remaining two)
        kept = sorted(order[k + 1:])
        assert greedy.error[0, k].item() == pytest.approx(_refit_error(h, y, kept), rel=1e-8)


def test_damped_error_is_the_ridge_objective():
    h, y = _layer(3)
    fit = _fit(h, y)
    greedy = greedy_obs(*_stats([(h, y)]), damping=0.1)
    kept = sorted(greedy.order[0, 3:].tolist())
    sub = _fit(h[:, kept], y)
    w, b, _ = sub.solve(0.1 * float(fit.moments()[2].diagonal().mean()) / float(sub.moments()[2].diagonal().mean()))
    assert greedy.error[0, 2].item() == pytest.approx(sub.error(w, b) + 0.1 * float(
        fit.moments()[2].diagonal().mean()) * float(w.pow(2).sum()), rel=1e-8)


def test_jas_guided_with_uniform_importance_is_obs(model, loader):
    fits = ffn_fits(model, loader)
    plain = obs_scores(fits)
    uniform = obs_scores(fits, importance={b: torch.full_like(s, 3.0) for b, s in plain.items()}, alpha=2.0)
    for b in plain:
        assert torch.equal(plain[b], uniform[b])
    # non-uniform importance changes the order
    skew = obs_scores(fits, importance={b: torch.arange(len(s), dtype=torch.float32) + 1 for b, s in plain.items()})
    assert any(not torch.equal(plain[b].argsort(), skew[b].argsort()) for b in plain)


def test_criterion_scores_rank_the_greedy_order(model, loader):
    scores = CRITERIA.get("obs").score(ScoringInputs(model=model, loader=loader, options={"damping": 0.0})).scores
    fits = ffn_fits(model, loader)
    m = fits[0].moments()
    greedy = greedy_obs(m[2][None], m[3][None], (fits[0].sum_yy / fits[0].count - m[1].pow(2).sum())[None],
                        damping=0.0)
    assert torch.equal(scores[0].argsort(), greedy.order[0])
    assert set(scores) == {i for i in range(len(model.blocks))}
