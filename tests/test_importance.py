"""JASImportance as a Torch-Pruning plugin, its constructors, and the baseline criteria."""

from __future__ import annotations

import math
import sys
import types
import warnings

import pytest
import torch
import torch_pruning as tp

from jas_prune.importance import (
    CRITERIA,
    JASImportance,
    activation_scores,
    criterion_scores,
    dependency_graph,
    ffn_activation_stats,
    magnitude_scores,
    random_scores,
    taylor_scores,
    variance_scores,
    vit_slim_scores,
)

N_CLASSES = 6  # the six-class model, batch and loader fixtures live in conftest.py


def _meta_prune(model, imp, ratio, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=ratio, **kw)
        pruner.step()


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Original row index of every row of a pruned fc1 weight."""
    dist = torch.cdist(after, before)
    idx = dist.argmin(1)
    assert torch.allclose(before[idx], after)
    return idx.tolist()


def _non_ffn_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".mlp.fc1." not in k and ".mlp.fc2.weight" not in k}


def test_scores_only_fc1_groups(model):
    scores = random_scores(model, seed=0)
    imp = JASImportance(scores)
    dg = dependency_graph(model)
    fc1 = {id(b.mlp.fc1): i for i, b in enumerate(model.blocks)}
    seen = set()
    for group in dg.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        out = imp(group)
        root = group[0].dep.target.module
        if id(root) in fc1 and group[0].dep.handler == tp.prune_linear_out_channels:
            assert out is not None and out.shape == (root.out_features,)
            seen.add(fc1[id(root)])
        else:
            assert out is None
    assert seen == {0, 1, 2}
    assert set(imp.scores) == {0, 1, 2}
    assert torch.equal(imp.scores[1], scores[1])


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_metapruner_local_prunes_only_ffn_top_scores(model, ratio):
    scores = random_scores(model, seed=3)
    before_fc1 = [b.mlp.fc1.weight.detach().clone() for b in model.blocks]
    before_fc2 = [b.mlp.fc2.weight.detach().clone() for b in model.blocks]
    before_b1 = [b.mlp.fc1.bias.detach().clone() for b in model.blocks]
    other = _non_ffn_state(model)
    n = model.blocks[0].mlp.fc1.out_features
    _meta_prune(model, JASImportance(scores), ratio)
    n_keep = int(n * (1 - ratio))  # Torch-Pruning's rounding
    for i, blk in enumerate(model.blocks):
        assert blk.mlp.fc1.out_features == n_keep and blk.mlp.fc2.in_features == n_keep
        kept = _kept_rows(before_fc1[i], blk.mlp.fc1.weight.detach())
        assert sorted(kept) == sorted(torch.topk(scores[i], n_keep).indices.tolist())
        assert torch.equal(blk.mlp.fc2.weight, before_fc2[i][:, kept])
        assert torch.equal(blk.mlp.fc1.bias, before_b1[i][kept])
    after = model.state_dict()
    for k, v in other.items():  # qkv, proj, norms, patch embedding, tokens, head, fc2 bias
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, N_CLASSES)


def test_metapruner_global_exact_total_and_no_collapse(model):
    scores = random_scores(model, seed=1)
    scores[0] = scores[0] * 1e-6  # a layer whose raw scores are all tiny
    n = model.blocks[0].mlp.fc1.out_features
    total = 3 * n
    other = _non_ffn_state(model)
    _meta_prune(model, JASImportance(scores), 0.8, global_pruning=True)
    widths = [b.mlp.fc1.out_features for b in model.blocks]
    assert sum(widths) == int(total * (1 - 0.8))
    assert min(widths) >= math.ceil(0.05 * n)  # no layer collapses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in other.items())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, N_CLASSES)


def test_global_without_normalizer_uses_floor(tiny_vit):
    model = tiny_vit(num_classes=N_CLASSES, depth=3)
    scores = random_scores(model, seed=1)
    scores[0] = scores[0] * 1e-6
    n = model.blocks[0].mlp.fc1.out_features
    _meta_prune(model, JASImportance(scores, normalizer="none", min_keep=5), 0.6, global_pruning=True)
    assert model.blocks[0].mlp.fc1.out_features == 5  # only the floor survives the raw ranking
    assert model.blocks[1].mlp.fc1.out_features > 5


def test_protect_survives_metapruner(model):
    scores = random_scores(model, seed=2)
    weakest = torch.argsort(scores[1])[:3].tolist()
    before = model.blocks[1].mlp.fc1.weight.detach().clone()
    _meta_prune(model, JASImportance(scores, protect={1: weakest}), 0.5)
    kept = _kept_rows(before, model.blocks[1].mlp.fc1.weight.detach())
    assert set(weakest) <= set(kept)


def test_blocks_without_scores_are_left_alone(model):
    scores = random_scores(model, seed=0)
    n = model.blocks[0].mlp.fc1.out_features
    _meta_prune(model, JASImportance({1: scores[1]}), 0.5)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [n, n // 2, n]


def test_bad_scores_raise_named_errors(model):
    n = model.blocks[0].mlp.fc1.out_features
    with pytest.raises(ValueError, match=r"scores\[0\]"):
        JASImportance({0: torch.rand(3, 4)})
    with pytest.raises(ValueError, match=r"scores\[2\].*NaN"):
        JASImportance({2: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="scores"):
        JASImportance({})
    with pytest.raises(ValueError, match="scores: block keys"):
        JASImportance({"a": torch.rand(n)})
    with pytest.raises(ValueError, match="normalizer"):
        JASImportance({0: torch.rand(n)}, normalizer="zscore")
    with pytest.raises(ValueError, match=r"protect\[0\].*out of range"):
        JASImportance({0: torch.rand(n)}, protect={0: [n]})
    with pytest.raises(ValueError, match="protect: block 1"):
        JASImportance({0: torch.rand(n)}, protect={1: [0]})
    with pytest.raises(ValueError, match=r"scores\[1\]: 5 scores but block 1 fc1 has"):
        _meta_prune(model, JASImportance({1: torch.rand(5)}), 0.5)
    with pytest.raises(ValueError, match="block 7 does not exist"):
        _meta_prune(model, JASImportance({7: torch.rand(n)}), 0.5)


def test_iterative_pruning_asks_for_fresh_scores(model):
    imp = JASImportance(random_scores(model, seed=0))
    _meta_prune(model, imp, 0.5)
    with pytest.raises(ValueError, match="pruned already"):
        _meta_prune(model, imp, 0.5)


def test_from_loader_real_locate(model, loader, batch):
    from jas_prune.locate import locate

    imp = JASImportance.from_loader(model, loader, steps=3)
    x, y = batch
    ref = locate(model, x, y, steps=3)
    for j, block in enumerate(ref.layers):
        assert torch.allclose(imp.scores[block], ref.scores[j].mean(0), atol=1e-7, rtol=1e-4)
    sub = JASImportance.from_loader(model, loader, classes=[2, 4], steps=3, scope="all")
    keep = (y == 2) | (y == 4)
    ref = locate(model, x[keep], y[keep], steps=3, scope="all")
    assert sub.classes == [2, 4]
    assert torch.allclose(sub.scores[0], ref.scores[0].mean(0), atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match="classes"):
        JASImportance.from_loader(model, loader, classes=[99], steps=3)


def test_from_loader_averages_over_images(model, loader, monkeypatch):
    calls = []

    def fake_locate(m, images, labels, **settings):
        calls.append(settings)
        s = labels.float()[:, None].expand(-1, 4)
        return types.SimpleNamespace(scores=[s, 2 * s], layers=[0, 2])

    monkeypatch.setitem(sys.modules, "jas_prune.locate", types.SimpleNamespace(locate=fake_locate))
    imp = JASImportance.from_loader(model, loader, steps=5)
    assert calls[0] == {"steps": 5}
    labels = torch.arange(12) % N_CLASSES
    assert torch.allclose(imp.scores[0], torch.full((4,), labels.float().mean()))
    assert torch.allclose(imp.scores[2], torch.full((4,), 2 * labels.float().mean()))
    imp = JASImportance.from_loader(model, loader, classes=[5])
    assert torch.allclose(imp.scores[0], torch.full((4,), 5.0))


def _fake_masks(n: int):
    imp = torch.zeros(3, 2, n)
    imp[0] = 1.0
    imp[1] = 4.0
    imp[2, :, 0] = float("nan")  # a class without probe images
    topk = torch.zeros(3, 2, n, dtype=torch.bool)
    topk[0, 0, 3] = topk[1, 0, 5] = topk[1, 1, 7] = True
    by = {"mean": imp, "mean_abs": imp + 10.0}
    return types.SimpleNamespace(importance=imp, topk=topk, counts=torch.tensor([1, 3, 0]), layers=[0, 2],
                                 class_names=["a", "b", "c"], fingerprint={"model": "tiny"},
                                 importance_for=lambda how: by[how])


def test_from_run(model, monkeypatch, tmp_path):
    n = model.blocks[0].mlp.fc1.out_features
    fake = types.SimpleNamespace(load_masks=lambda run_dir: _fake_masks(n))
    monkeypatch.setitem(sys.modules, "jas_prune.aggregate", fake)
    imp = JASImportance.from_run(tmp_path)
    assert set(imp.scores) == {0, 2}
    assert torch.allclose(imp.scores[0], torch.full((n,), (1 * 1 + 3 * 4) / 4))  # count-weighted
    assert imp.protect == {} and imp.classes is None
    sub = JASImportance.from_run(tmp_path, classes=["b", 0])
    assert sub.classes == [0, 1]
    assert sub.protect == {0: [3, 5], 2: [7]}
    assert sub.fingerprint == {"model": "tiny"}
    only_b = JASImportance.from_run(tmp_path, classes=[1], protect_topk=False)
    assert torch.allclose(only_b.scores[2], torch.full((n,), 4.0)) and only_b.protect == {}
    assert only_b.aggregation == "mean"
    abs_b = JASImportance.from_run(tmp_path, classes=[1], aggregation="mean_abs")
    assert torch.allclose(abs_b.scores[2], torch.full((n,), 14.0)) and abs_b.aggregation == "mean_abs"
    with pytest.raises(ValueError, match="classes: unknown class name 'zebra'"):
        JASImportance.from_run(tmp_path, classes=["zebra"])
    with pytest.raises(ValueError, match="classes: class index 9"):
        JASImportance.from_run(tmp_path, classes=[9])
    with pytest.raises(ValueError, match="has probe images"):
        JASImportance.from_run(tmp_path, classes=["c"])


def test_from_run_for_another_model_is_a_fingerprint_error(model, monkeypatch, tmp_path):
    from jas_prune.errors import FingerprintMismatchError
    from jas_prune.prune import prune_ffn

    n = model.blocks[0].mlp.fc1.out_features
    monkeypatch.setitem(sys.modules, "jas_prune.aggregate",
                        types.SimpleNamespace(load_masks=lambda run_dir: _fake_masks(n + 8)))
    imp = JASImportance.from_run(tmp_path)
    with pytest.raises(FingerprintMismatchError, match=str(tmp_path)):
        _meta_prune(model, imp, 0.5)
    with pytest.raises(FingerprintMismatchError, match=str(tmp_path)):
        prune_ffn(model, imp, ratio=0.5)


def test_activation_statistics_match_hooks(model, loader, batch):
    x, _ = batch
    acts = {}
    hooks = [b.mlp.act.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.detach()))
             for k, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    stats = ffn_activation_stats(model, loader)
    for k, a in acts.items():
        flat = a.reshape(-1, a.shape[-1]).double()
        assert torch.allclose(stats[k]["mean"], flat.mean(0).float(), atol=1e-6)
        assert torch.allclose(activation_scores(model, loader, stats=stats)[k], flat.abs().mean(0).float(), atol=1e-6)
        assert torch.allclose(variance_scores(model, loader)[k], flat.var(0, unbiased=False).float(), atol=1e-6)
    sub = ffn_activation_stats(model, loader, classes=[1])
    assert sub[0]["count"] == 2 * acts[0].shape[1]
    with pytest.raises(ValueError, match="classes"):
        ffn_activation_stats(model, loader, classes=[42])


def test_magnitude_is_tp_group_l2(model):
    scores = magnitude_scores(model)
    for k, blk in enumerate(model.blocks):
        w1, w2 = blk.mlp.fc1.weight.detach(), blk.mlp.fc2.weight.detach()
        expected = (w1.pow(2).sum(1) + w2.pow(2).sum(0)) / 2  # TP: p=2, mean over the group's layers
        assert torch.allclose(scores[k], expected, rtol=1e-5)


def test_taylor_leaves_model_untouched(model, loader):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_scores(model, loader)
    assert all(p.grad is None for p in model.parameters())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(s.shape == (model.blocks[k].mlp.fc1.out_features,) and (s >= 0).all() and s.sum() > 0
               for k, s in scores.items())


def test_vit_slim_learns_scales_with_frozen_params(model, loader):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = vit_slim_scores(model, loader, lam=1e-2, epochs=2, lr=0.05)
    assert set(scores) == {0, 1, 2}
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in scores.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # hooks are gone: the model computes what it computed before
    with torch.no_grad():
        x = loader[0][0]
        assert torch.equal(model(x), model(x))
    assert len(model.blocks[0].mlp.act._forward_hooks) == 0
    with pytest.raises(ValueError, match="lam"):
        vit_slim_scores(model, loader, lam=-1.0)


def test_random_is_seeded(model):
    a, b, c = random_scores(model, seed=4), random_scores(model, seed=4), random_scores(model, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("method", [m for m in CRITERIA if m != "jas"])
def test_every_baseline_prunes_through_metapruner(tiny_vit, loader, method):
    model = tiny_vit(num_classes=N_CLASSES, depth=2)
    scores = criterion_scores(method, model, loader, vit_slim={"lambda": 1e-3, "epochs": 1, "lr": 0.01})
    n = model.blocks[0].mlp.fc1.out_features
    assert set(scores) == {0, 1} and all(s.shape == (n,) for s in scores.values())
    _meta_prune(model, JASImportance(scores), 0.5)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [n // 2, n // 2]
    assert torch.isfinite(model(loader[0][0])).all()


def test_criterion_scores_errors(model, loader):
    with pytest.raises(ValueError, match="method: unknown pruning criterion 'l1'"):
        criterion_scores("l1", model, loader)
    with pytest.raises(ValueError, match="loader"):
        criterion_scores("taylor", model, None)
    with pytest.raises(ValueError, match="vit_slim: unknown"):
        criterion_scores("vit_slim", model, loader, vit_slim={"momentum": 0.9})


def test_from_run_with_model_refuses_other_weights_of_the_same_shape(tiny_vit, tmp_path):
    from jas_prune.aggregate import aggregate, save_masks
    from jas_prune.errors import FingerprintMismatchError
    from jas_prune.pathstore import weights_digest

    mine, other = tiny_vit(num_classes=2, depth=2, seed=0), tiny_vit(num_classes=2, depth=2, seed=1)
    n = mine.blocks[0].mlp.fc1.out_features
    masks = aggregate(torch.zeros(4, 2, 1, dtype=torch.long), torch.rand(4, 2, n), torch.tensor([0, 1, 0, 1]),
                      num_classes=2, widths=n, topk=1, layers=[0, 1], class_names=["a", "b"],
                      fingerprint={"model": weights_digest(mine)})
    save_masks(masks, tmp_path)
    assert set(JASImportance.from_run(tmp_path, model=mine).scores) == {0, 1}
    with pytest.raises(FingerprintMismatchError, match="computed on a different model"):
        JASImportance.from_run(tmp_path, model=other)
