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


# -- attention units: groups of projection-input columns (heads, head dimensions) -------------------
HEADS, HEAD_DIM = 4, 3


def _columns(kind: str) -> torch.Tensor:
    """The projection-input columns of each head ([H, d]) or of each head dimension ([d, H])."""
    cols = torch.arange(HEADS * HEAD_DIM).view(HEADS, HEAD_DIM)
    return cols if kind == "heads" else cols.t().contiguous()


@pytest.mark.parametrize("kind", ["heads", "dims"])
def test_each_group_step_is_the_best_explicit_drop_and_refit(kind):
    units = _columns(kind)
    layers = [_layer(4, n=HEADS * HEAD_DIM, tokens=300), _layer(5, n=HEADS * HEAD_DIM, tokens=300)]
    greedy = greedy_obs(*_stats(layers), damping=0.0, units=units)
    for i, (h, y) in enumerate(layers):
        assert sorted(greedy.order[i].tolist()) == list(range(len(units)))
        removed: list[int] = []
        for k in range(len(units) - 1):
            left = [u for u in range(len(units)) if u not in removed]

            def kept(gone):
                return sorted(c for u in left if u not in gone for c in units[u].tolist())

            brute = {u: _refit_error(h, y, kept({u})) for u in left}
            pick = int(greedy.order[i, k])
            assert brute[pick] == pytest.approx(min(brute.values()), rel=1e-9, abs=1e-12)
            assert greedy.error[i, k].item() == pytest.approx(brute[pick], rel=1e-8, abs=1e-10)
            removed.append(pick)


def test_head_criterion_drops_the_head_whose_projection_refit_is_best(model, loader):
    """On the model's own attention projections (probe tokens), the ``obs`` head scores rank the
    greedy order, whose first head is the brute-force best drop-and-refit, and ``obs_jas`` with
    uniform head importance is ``obs``."""
    from jas_prune.pruning.attention import head_scores
    from jas_prune.pruning.criteria.obs import linear_fits

    inputs = ScoringInputs(model=model, loader=loader, options={"damping": 0.0})
    s = head_scores("obs", inputs)
    H, d = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    zs: dict[int, list] = {}
    hooks = [blk.attn.proj.register_forward_hook(lambda m, a, out, b=b: zs.setdefault(b, []).append((a[0], out)))
             for b, blk in enumerate(model.blocks)]
    with torch.no_grad():
        for x, *_ in loader:
            model(x)
    for hk in hooks:
        hk.remove()
    fits = linear_fits(model, loader, {b: blk.attn.proj for b, blk in enumerate(model.blocks)})
    for b, pairs in zs.items():
        z = torch.cat([p[0].reshape(-1, H * d) for p in pairs]).double()
        y = torch.cat([p[1].reshape(-1, p[1].shape[-1]) for p in pairs]).double()
        brute = [_refit_error(z, y, [c for c in range(H * d) if c // d != g]) for g in range(H)]
        assert int(s.heads[b].argmin()) == min(range(H), key=brute.__getitem__)
        assert s.dims[b].shape == (d,) and s.heads[b].shape == (H,)
        m = fits[b].moments()
        greedy = greedy_obs(m[2][None], m[3][None], (fits[b].sum_yy / fits[b].count - m[1].pow(2).sum())[None],
                            damping=0.0, units=torch.arange(H * d).view(H, d))
        assert torch.equal(s.heads[b].argsort(), greedy.order[0])
        assert greedy.error[0, 0].item() == pytest.approx(min(brute), rel=1e-7)
    cols = {b: torch.arange(H * d).view(H, d) for b in fits}
    plain = obs_scores(fits, units=cols)
    uniform = obs_scores(fits, units=cols, importance={b: torch.full((H,), 0.7) for b in fits}, alpha=2.0)
    assert all(torch.equal(plain[b], uniform[b]) for b in fits)


def test_recipe_prunes_heads_with_obs(tmp_path, tiny_builtin):
    import json

    from conftest import run_recipe

    recipe = ("version: 1\ndata: {images_per_class: 2, probe_images_per_class: 1, batch_size: 48}\n"
              "attribution: {method: jas, steps: 2, scope: all, formula: ig}\n"
              "prune: {methods: [obs], ratios: [0.5], reconstruction: [lsq], attention: {heads: 0.5}}\n")
    assert run_recipe(tmp_path, recipe, tmp_path / "run") == 0
    (entry,) = json.loads((tmp_path / "run" / "metrics.json").read_text())["pruned"]
    assert entry["method"] == "obs" and entry["attention"]["heads"] == 0.5
    assert all(len(k) == 1 for k in entry["attention"]["kept_heads"].values())
