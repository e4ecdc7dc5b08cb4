"""``hessian`` (OBD): per-image gradients from one backward pass agree with a per-image loop, and
the scores with Torch-Pruning's GroupHessianImportance and with the formula Σ w²·E[g²]."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from jas_prune.errors import InvalidArgumentError
from jas_prune.pruning.criteria import CRITERIA, ScoringInputs
from jas_prune.pruning.criteria.hessian import fisher_diagonal, hessian_scores
from jas_prune.pruning.graph import dependency_graph


def _brute_fisher(model, images, labels):
    """Mean over images of the squared gradient of each image's own loss, one backward per image."""
    weights = [m.weight for b in model.blocks for m in (b.mlp.fc1, b.mlp.fc2)]
    sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for x, y in zip(images, labels):
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        for s, g in zip(sums, torch.autograd.grad(loss, weights)):
            s += g.double().pow(2)
    return [s / len(labels) for s in sums]


def test_fisher_from_one_backward_matches_a_per_image_loop(model, loader, batch):
    x, y = batch
    linears = [m for b in model.blocks for m in (b.mlp.fc1, b.mlp.fc2)]
    fisher = fisher_diagonal(model, loader, linears)
    ref = _brute_fisher(model, x, y)
    for m, r in zip(linears, ref):
        torch.testing.assert_close(fisher[m], r, rtol=1e-4, atol=1e-12)
    keep = (y == 1) | (y == 4)
    sub = fisher_diagonal(model, loader, linears, classes=[1, 4])
    ref = _brute_fisher(model, x[keep], y[keep])
    torch.testing.assert_close(sub[linears[3]], ref[3], rtol=1e-4, atol=1e-12)


def test_scores_are_obd_and_torch_pruning_group_hessian(model, loader, batch):
    x, y = batch
    scores = hessian_scores(model, loader)
    ref = _brute_fisher(model, x, y)
    dg = dependency_graph(model)
    for k, blk in enumerate(model.blocks):
        w1, w2 = blk.mlp.fc1.weight.detach().double(), blk.mlp.fc2.weight.detach().double()
        f1, f2 = ref[2 * k], ref[2 * k + 1]
        formula = ((w1.pow(2) * f1).sum(1) + (w2.pow(2) * f2).sum(0)) / 2  # mean over the group's 2 layers
        torch.testing.assert_close(scores[k].double(), formula, rtol=1e-4, atol=0)
        # Torch-Pruning's own scorer on the same group, fed the brute-force Hessian diagonal
        blk.mlp.fc1.weight.grad, blk.mlp.fc2.weight.grad = f1.float(), f2.float()
        group = dg.get_pruning_group(blk.mlp.fc1, tp.prune_linear_out_channels, list(range(64)))
        tp_scores = tp.importance.GroupHessianImportance(normalizer=None)(group)
        torch.testing.assert_close(scores[k], tp_scores.float(), rtol=1e-4, atol=0)
        blk.mlp.fc1.weight.grad = blk.mlp.fc2.weight.grad = None
    # not magnitude, not Taylor: the ranking differs from both
    from jas_prune.pruning.criteria.magnitude import magnitude_scores

    assert not torch.equal(scores[0].argsort(), magnitude_scores(model)[0].argsort())


def test_leaves_the_model_as_it_was(model, loader):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model.blocks[0].mlp.fc1.weight, 7.0)
    model.blocks[0].mlp.fc1.weight.grad = marker
    model.head.weight.requires_grad_(False)
    model.train()
    CRITERIA.get("hessian").score(ScoringInputs(model=model, loader=loader, max_batches=1))
    assert model.blocks[0].mlp.fc1.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "blocks.0.mlp.fc1.weight")
    assert not model.head.weight.requires_grad and model.blocks[0].mlp.fc1.weight.requires_grad
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(len(b.mlp.fc1._forward_hooks) == 0 for b in model.blocks)


def test_registered_after_the_original_seven():
    c = CRITERIA.get("hessian")
    assert CRITERIA.names().index("hessian") >= 7
    assert c.needs_data and c.options is None and c.label == "Hessian (OBD)"


def test_needs_images(model, loader):
    with pytest.raises(InvalidArgumentError, match=r"loader: no images of classes \[42\]"):
        hessian_scores(model, loader, classes=[42])
    with pytest.raises(InvalidArgumentError, match="loader: the 'hessian' criterion needs probe data"):
        CRITERIA.get("hessian").score(ScoringInputs(model=model))
