"""Reconstruction-aware scores (jas_prune.pruning.redundancy) against brute-force references."""

import pytest
import torch

from jas_prune.errors import InvalidArgumentError
from jas_prune.pruning.redundancy import hidden_covariance, redundancy_scores, unexplained_share


def _cov(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, n, generator=g, dtype=torch.float64)
    x[:, 3] = 0.9 * x[:, 1] + 0.1 * x[:, 3]  # neuron 3 nearly a copy of neuron 1
    x = x - x.mean(0)
    return x, x.T @ x / len(x)


def _r2(x, j, others):
    """1 - R² of column j regressed (with intercept, centred data) on the columns ``others``."""
    if not others:
        return 1.0
    a = x[:, others]
    sol = torch.linalg.lstsq(a, x[:, j:j + 1]).solution
    resid = x[:, j:j + 1] - a @ sol
    return float(resid.pow(2).sum() / x[:, j].pow(2).sum())


def test_unexplained_share_is_one_minus_r2_of_a_regression_on_the_others():
    x, cov = _cov()
    u = unexplained_share(cov, damping=0.0)
    for j in range(cov.shape[0]):
        assert float(u[j]) == pytest.approx(_r2(x, j, [k for k in range(7) if k != j]), rel=1e-6)
    assert float(u[3]) < 0.1 and float(u[1]) < 0.5  # the near-copies explain each other


def test_greedy_order_matches_recomputing_on_the_remaining_neurons():
    x, cov = _cov(seed=1)
    s = torch.rand(7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    rank = redundancy_scores({0: s}, {0: cov}, gamma=1.0, damping=0.0, greedy=True)[0]
    alive, order = list(range(7)), []
    while alive:  # brute force: regress every remaining neuron on the other remaining ones
        cost = {j: float(s[j]) * _r2(x, j, [k for k in alive if k != j]) for j in alive}
        j = min(cost, key=cost.get)
        order.append(j)
        alive.remove(j)
    assert torch.argsort(rank).tolist() == order


def test_gamma_zero_keeps_the_criterions_order_and_one_shot_multiplies():
    _, cov = _cov()
    s = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 6.0])
    greedy = redundancy_scores({2: s}, {2: cov}, gamma=0.0)[2]
    assert torch.argsort(greedy).tolist() == torch.argsort(s).tolist()
    once = redundancy_scores({2: s}, {2: cov}, gamma=1.0, greedy=False, damping=1e-3)[2]
    torch.testing.assert_close(once, (s.double() * unexplained_share(cov, 1e-3)).float())


def test_bad_inputs_are_named():
    _, cov = _cov()
    with pytest.raises(InvalidArgumentError, match=r"scores\[0\]: redundancy needs non-negative scores"):
        redundancy_scores({0: -torch.ones(7)}, {0: cov})
    with pytest.raises(InvalidArgumentError, match="no covariance for block 1"):
        redundancy_scores({1: torch.ones(7)}, {0: cov})
    with pytest.raises(InvalidArgumentError, match=r"covariance\[0\]: shape \(7, 7\) for 5 neurons"):
        redundancy_scores({0: torch.ones(5)}, {0: cov})


def test_hidden_covariance_streams_fc2_inputs(tiny_vit):
    from jas_prune.models import discover_ffn

    model = tiny_vit(num_classes=4, depth=2)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cov = hidden_covariance(model, [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(2, dtype=torch.long))])
    got = {}
    layer = discover_ffn(model).layers[1]
    h = layer.fc2.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    hh = got["h"].reshape(-1, layer.hidden).double()
    ref = torch.cov(hh.T, correction=0)
    torch.testing.assert_close(cov[1], ref, rtol=1e-6, atol=1e-9)
