"""pruning.prune / pruning.finetune: exact keep sets through the dependency graph, modes, protection, compensation, head cut."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch_pruning as tp

from jas_prune.errors import BudgetError, ClassSelectionError, InvalidArgumentError, PruneSettingError
from jas_prune.pruning.criteria.random import random_scores
from jas_prune.pruning.finetune import finetune
from jas_prune.pruning.plugin import JASImportance
from jas_prune.pruning.prune import PruneSummary, cut_head, prune_ffn, remap_labels, resolve_head_classes
from jas_prune.pruning.stats import ffn_activation_stats

N_CLASSES = 6  # the six-class model, batch and loader fixtures live in conftest.py


def _other_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if ".mlp.fc1." not in k and ".mlp.fc2.weight" not in k}


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_uniform_keeps_exactly_the_top_scores(model, ratio):
    scores = random_scores(model, seed=7)
    fc1 = [b.mlp.fc1.weight.detach().clone() for b in model.blocks]
    b1 = [b.mlp.fc1.bias.detach().clone() for b in model.blocks]
    fc2 = [b.mlp.fc2.weight.detach().clone() for b in model.blocks]
    other = _other_state(model)
    n = fc1[0].shape[0]
    summary = prune_ffn(model, scores, ratio=ratio)
    n_keep = n - round(n * ratio)
    for i, blk in enumerate(model.blocks):
        kept = summary.kept[i]
        assert kept == sorted(torch.topk(scores[i], n_keep).indices.tolist())
        assert torch.equal(blk.mlp.fc1.weight, fc1[i][kept])
        assert torch.equal(blk.mlp.fc1.bias, b1[i][kept])
        assert torch.equal(blk.mlp.fc2.weight, fc2[i][:, kept])
        assert isinstance(blk.mlp.fc1, torch.nn.Linear) and blk.mlp.fc1.out_features == n_keep
    after = model.state_dict()
    for k, v in other.items():  # attention, norms, patch embedding, tokens, head, fc2.bias untouched
        assert torch.equal(after[k], v), k
    assert summary.widths_after == {0: n_keep, 1: n_keep, 2: n_keep}
    assert summary.params_before - summary.params_after == 3 * (n - n_keep) * (2 * 32 + 1)
    assert summary.params_after == sum(p.numel() for p in model.parameters())
    assert summary.removed_fraction == pytest.approx((n - n_keep) / n)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, N_CLASSES)
    d = summary.to_dict()
    assert d["kept"]["0"] == summary.kept[0] and d["mode"] == "uniform"


def test_global_matches_metapruner_and_never_collapses(tiny_vit):
    a, b = tiny_vit(num_classes=N_CLASSES, depth=3), tiny_vit(num_classes=N_CLASSES, depth=3)
    scores = random_scores(a, seed=11)
    scores[2] = scores[2] * 1e-4
    # 0.75 of 192 is exact: Torch-Pruning keeps int(N * (1 - r)), prune_ffn removes round(N * r)
    summary = prune_ffn(a, scores, ratio=0.75, mode="global")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(b, torch.randn(1, 3, 32, 32), importance=JASImportance(scores),
                             pruning_ratio=0.75, global_pruning=True).step()
    for i in range(3):
        assert torch.equal(a.blocks[i].mlp.fc1.weight, b.blocks[i].mlp.fc1.weight)
    n = 64
    assert sum(summary.widths_after.values()) == 3 * n // 4
    assert len(set(summary.widths_after.values())) > 1  # really global, not uniform
    assert min(summary.widths_after.values()) >= 4  # 5 % floor of 64 neurons


def test_protect_is_kept(model):
    scores = random_scores(model, seed=1)
    weakest = torch.argsort(scores[0])[:4].tolist()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[weakest[:2]] = True
    summary = prune_ffn(model, scores, ratio=0.5, protect={0: weakest, 1: mask})
    assert set(weakest) <= set(summary.kept[0])
    assert set(weakest[:2]) <= set(summary.kept[1])
    assert len(summary.kept[0]) == 32  # the budget holds
    assert summary.protected == {0: 4, 1: 2}


def test_protect_from_importance_and_over_budget(model):
    scores = random_scores(model, seed=1)
    weakest = torch.argsort(scores[2])[:3].tolist()
    summary = prune_ffn(copy.deepcopy(model), JASImportance(scores, protect={2: weakest}), ratio=0.5)
    assert set(weakest) <= set(summary.kept[2])
    with pytest.raises(BudgetError, match=r"protect\[1\]: 40 protected neurons"):
        prune_ffn(model, scores, ratio=0.5, protect={1: list(range(40))})


def test_bias_compensation_brings_output_closer(model, batch, loader):
    x, _ = batch
    stats = ffn_activation_stats(model, loader)
    with torch.no_grad():
        dense = model(x)
    errors = []
    for comp in (None, stats):
        m = copy.deepcopy(model)
        fc2_bias = m.blocks[1].mlp.fc2.bias.detach().clone()
        summary = prune_ffn(m, random_scores(model, seed=0), ratio=0.5, bias_compensation=comp)
        if comp is not None:
            blk = model.blocks[1].mlp
            removed = [i for i in range(64) if i not in set(summary.kept[1])]
            expected = fc2_bias + blk.fc2.weight.detach()[:, removed] @ stats[1]["mean"][removed]
            assert torch.allclose(m.blocks[1].mlp.fc2.bias, expected, atol=1e-6)
            assert summary.bias_compensation
        with torch.no_grad():
            errors.append((m(x) - dense).pow(2).mean().item())
    assert errors[1] < errors[0]


def test_class_specialised_head_cut_maps_labels(model, batch):
    x, _ = batch
    scores = random_scores(model, seed=0)
    ref = copy.deepcopy(model)
    prune_ffn(ref, scores, ratio=0.5)
    names = [f"c{i}" for i in range(N_CLASSES)]
    summary = prune_ffn(model, scores, ratio=0.5, head_classes=[4, "c1", 5], class_names=names)
    assert summary.head_classes == [1, 4, 5]
    assert summary.head_class_names == ["c1", "c4", "c5"]
    assert model.head.out_features == 3 and model.num_classes == 3
    assert model.jas_head_classes == [1, 4, 5]
    with torch.no_grad():
        full, cut = ref(x), model(x)
    assert torch.allclose(cut, full[:, [1, 4, 5]], atol=1e-6)
    labels = torch.tensor([4, 0, 5, 1, 3])
    assert remap_labels(labels, summary.head_classes).tolist() == [1, -1, 2, 0, -1]
    # a second cut composes: outputs keep referring to the original classes
    assert cut_head(model, [0, 2]) == [1, 5]
    assert model.jas_head_class_names == ["c1", "c5"]
    with torch.no_grad():
        assert torch.allclose(model(x), full[:, [1, 5]], atol=1e-6)


def test_bad_inputs_name_the_argument(model):
    scores = random_scores(model, seed=0)
    for bad in (0, 1, 1.5, -0.1, True, "0.5"):
        with pytest.raises(InvalidArgumentError, match=f"ratio: {bad!r} is outside"):
            prune_ffn(model, scores, ratio=bad)
    with pytest.raises(InvalidArgumentError, match="mode: unknown 'layerwise'"):
        prune_ffn(model, scores, ratio=0.5, mode="layerwise")
    with pytest.raises(InvalidArgumentError, match="scores: block 5 does not exist"):
        prune_ffn(model, {5: torch.rand(64)}, ratio=0.5)
    with pytest.raises(InvalidArgumentError, match=r"scores\[1\]: 10 scores for 64 FFN neurons"):
        prune_ffn(model, {1: torch.rand(10)}, ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="protect: block 2 is not among the pruned blocks"):
        prune_ffn(model, {1: torch.rand(64)}, ratio=0.5, protect={2: [0]})
    with pytest.raises(InvalidArgumentError, match=r"bias_compensation\[0\]: 3 means"):
        prune_ffn(model, scores, ratio=0.5, bias_compensation={b: torch.zeros(3) for b in range(3)})
    with pytest.raises(InvalidArgumentError, match="bias_compensation: no mean activations for block 2"):
        prune_ffn(model, scores, ratio=0.5, bias_compensation={0: torch.zeros(64), 1: torch.zeros(64)})
    with pytest.raises(ClassSelectionError, match=r"head_classes: 9 is not a class of the data set \(6 classes\)"):
        prune_ffn(model, scores, ratio=0.5, head_classes=[9])
    with pytest.raises(ClassSelectionError, match="head_classes: 'dog' is not a class"):
        prune_ffn(model, scores, ratio=0.5, head_classes=["dog"])
    with pytest.raises(BudgetError, match="ratio: removing 0.99"):
        prune_ffn(model, scores, ratio=0.99, mode="global")
    # nothing was changed by the failed calls
    assert [b.mlp.fc1.out_features for b in model.blocks] == [64, 64, 64]
    assert model.head.out_features == N_CLASSES


def test_partial_blocks_only(model):
    summary = prune_ffn(model, {1: torch.rand(64)}, ratio=0.25, mode="global")
    assert [b.mlp.fc1.out_features for b in model.blocks] == [64, 48, 64]
    assert isinstance(summary, PruneSummary) and list(summary.kept) == [1]


def test_finetune_after_head_cut(model, loader):
    prune_ffn(model, random_scores(model, seed=0), ratio=0.5, head_classes=[0, 3])
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    out = finetune(model, loader, epochs=1, lr=1e-3)
    assert out["steps"] == 2 and out["loss"] == out["loss"]  # finite, not NaN
    assert not torch.equal(before, model.blocks[0].mlp.fc1.weight)
    assert not model.training
    assert finetune(model, loader, epochs=0)["steps"] == 0


def test_settings_the_model_cannot_meet_are_prune_setting_errors(model):
    """Model incompatibilities are ``PruneSettingError`` (the recipe turns them into user errors)."""
    from torch import nn

    scores = {b: torch.rand(64) for b in range(3)}
    no_bias = copy.deepcopy(model)
    no_bias.blocks[1].mlp.fc2.bias = None
    with pytest.raises(PruneSettingError, match="bias_compensation: block 1 fc2 has no bias"):
        prune_ffn(no_bias, scores, ratio=0.5, bias_compensation={b: torch.zeros(64) for b in range(3)})
    mlp_head = copy.deepcopy(model)
    mlp_head.head = nn.Sequential(nn.Linear(mlp_head.head.in_features, 6))
    with pytest.raises(PruneSettingError, match="not a linear classifier"):
        prune_ffn(mlp_head, scores, ratio=0.5, head_classes=[0, 1])
    with pytest.raises(BudgetError) as info:  # min_keep alone: no class masks involved
        prune_ffn(copy.deepcopy(model), scores, ratio=0.99, mode="global", min_keep=0.5)
    assert not info.value.protected


def test_head_classes_resolve_against_the_head():
    names = ["cat", "dog", "3"]
    assert resolve_head_classes(["dog", 0], 5, names) == [0, 1]
    assert resolve_head_classes(["3", "4", 3], 5, names) == [2, 3, 4]  # a name first, then digits; unnamed outputs by index
    assert resolve_head_classes(4, 5) == [4]
    with pytest.raises(ClassSelectionError, match="head_classes: 'cow' is not a class of the data set"):
        resolve_head_classes(["cow"], 5, names)
    with pytest.raises(ClassSelectionError, match="head_classes: must list at least one class"):
        resolve_head_classes([], 5)
    with pytest.raises(InvalidArgumentError, match="class_names: 3 names for a head with 2 outputs"):
        resolve_head_classes([0], 2, names)


def test_scores_of_a_run_that_do_not_fit_are_a_fingerprint_error(model):
    from jas_prune.errors import FingerprintMismatchError

    with pytest.raises(FingerprintMismatchError,
                       match=r"importance from run runs/x does not fit this model: scores\[1\]: 10 scores for 64"):
        prune_ffn(model, {1: torch.rand(10)}, ratio=0.5, run_dir="runs/x")
    with pytest.raises(InvalidArgumentError):  # the same scores, not from a run
        prune_ffn(model, {1: torch.rand(10)}, ratio=0.5)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [64, 64, 64]
