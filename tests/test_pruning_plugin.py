"""JASImportance as a Torch-Pruning plugin: only FFN groups, local/global, protection, its
constructors (from a loader, from a run's masks) and its per-module cache."""

from __future__ import annotations

import copy
import gc
import math
import sys
import types
import warnings
import weakref

import pytest
import torch
import torch_pruning as tp

from jas_prune.errors import ClassSelectionError, FingerprintMismatchError, InvalidArgumentError
from jas_prune.pruning.criteria.random import random_scores
from jas_prune.pruning.graph import dependency_graph, update_attention_geometry
from jas_prune.pruning.plugin import JASImportance
from jas_prune.testing import meta_prune

N_CLASSES = 6  # the six-class model, batch and loader fixtures live in conftest.py


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
    meta_prune(model, JASImportance(scores), ratio)
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
    meta_prune(model, JASImportance(scores), 0.8, global_pruning=True)
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
    meta_prune(model, JASImportance(scores, normalizer="none", min_keep=5), 0.6, global_pruning=True)
    assert model.blocks[0].mlp.fc1.out_features == 5  # only the floor survives the raw ranking
    assert model.blocks[1].mlp.fc1.out_features > 5


def test_protect_survives_metapruner(model):
    scores = random_scores(model, seed=2)
    weakest = torch.argsort(scores[1])[:3].tolist()
    before = model.blocks[1].mlp.fc1.weight.detach().clone()
    meta_prune(model, JASImportance(scores, protect={1: weakest}), 0.5)
    kept = _kept_rows(before, model.blocks[1].mlp.fc1.weight.detach())
    assert set(weakest) <= set(kept)


def test_blocks_without_scores_are_left_alone(model):
    scores = random_scores(model, seed=0)
    n = model.blocks[0].mlp.fc1.out_features
    meta_prune(model, JASImportance({1: scores[1]}), 0.5)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [n, n // 2, n]


def test_bad_scores_raise_named_errors(model):
    n = model.blocks[0].mlp.fc1.out_features
    with pytest.raises(InvalidArgumentError, match=r"scores\[0\]"):
        JASImportance({0: torch.rand(3, 4)})
    with pytest.raises(InvalidArgumentError, match=r"scores\[2\].*NaN"):
        JASImportance({2: torch.tensor([1.0, float("nan")])})
    with pytest.raises(InvalidArgumentError, match="scores"):
        JASImportance({})
    with pytest.raises(InvalidArgumentError, match="scores: block keys"):
        JASImportance({"a": torch.rand(n)})
    with pytest.raises(InvalidArgumentError, match="normalizer"):
        JASImportance({0: torch.rand(n)}, normalizer="zscore")
    with pytest.raises(InvalidArgumentError, match=r"protect\[0\].*out of range"):
        JASImportance({0: torch.rand(n)}, protect={0: [n]})
    with pytest.raises(InvalidArgumentError, match="protect: block 1"):
        JASImportance({0: torch.rand(n)}, protect={1: [0]})
    with pytest.raises(InvalidArgumentError, match=r"scores\[1\]: 5 scores but block 1 has 64 neurons"):
        meta_prune(model, JASImportance({1: torch.rand(5)}), 0.5)
    with pytest.raises(InvalidArgumentError, match="block 7 does not exist"):
        meta_prune(model, JASImportance({7: torch.rand(n)}), 0.5)


def test_iterative_pruning_asks_for_fresh_scores(model):
    imp = JASImportance(random_scores(model, seed=0))
    meta_prune(model, imp, 0.5)
    with pytest.raises(InvalidArgumentError, match="pruned already"):
        meta_prune(model, imp, 0.5)


def test_from_loader_real_locate(model, loader, batch):
    from jas_prune import locate

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
    with pytest.raises(InvalidArgumentError, match="classes"):
        JASImportance.from_loader(model, loader, classes=[99], steps=3)


def test_from_loader_averages_over_images(model, loader, monkeypatch):
    calls = []

    def fake_locate(m, images, labels, settings=None, **kwargs):
        calls.append(kwargs)
        s = labels.float()[:, None].expand(-1, 4)
        return types.SimpleNamespace(scores=[s, 2 * s], layers=[0, 2])

    import jas_prune.attribution.api

    monkeypatch.setattr(jas_prune.attribution.api, "locate", fake_locate)
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
    with pytest.raises(ClassSelectionError, match="classes: 'zebra' is not a class of the data set \\(3 classes"):
        JASImportance.from_run(tmp_path, classes=["zebra"])
    with pytest.raises(ClassSelectionError, match="classes: 9 is not a class"):
        JASImportance.from_run(tmp_path, classes=[9])
    with pytest.raises(InvalidArgumentError, match=r"classes: none of \['c'\] has probe images"):
        JASImportance.from_run(tmp_path, classes=["c"])


def test_from_run_for_another_model_is_a_fingerprint_error(model, monkeypatch, tmp_path):
    from jas_prune.pruning.prune import prune_ffn

    n = model.blocks[0].mlp.fc1.out_features
    monkeypatch.setitem(sys.modules, "jas_prune.aggregate",
                        types.SimpleNamespace(load_masks=lambda run_dir: _fake_masks(n + 8)))
    imp = JASImportance.from_run(tmp_path)
    with pytest.raises(FingerprintMismatchError, match=str(tmp_path)):
        meta_prune(model, imp, 0.5)
    with pytest.raises(FingerprintMismatchError, match=str(tmp_path)):
        prune_ffn(model, imp, ratio=0.5)


def test_from_run_with_model_refuses_other_weights_of_the_same_shape(tiny_vit, tmp_path):
    from jas_prune.aggregate import aggregate, save_masks
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


# -- the fc1 -> block cache (issue 15: keyed by id(model), a recycled id pruned nothing) ----------


def _ffn_widths(model) -> list[int]:
    return [b.mlp.fc1.out_features for b in model.blocks]


def test_one_instance_prunes_a_model_whose_modules_were_replaced(model):
    """Same model object (same id) with new fc1 modules: the situation of a deep copy that gets
    a freed model's id. A cache keyed by the model's id maps nothing and prunes nothing."""
    imp = JASImportance(random_scores(model, seed=0))
    n = model.blocks[0].mlp.fc1.out_features
    template = copy.deepcopy(model)
    meta_prune(model, imp, 0.5)
    assert _ffn_widths(model) == [n // 2] * 3
    before = id(model)
    model.blocks = copy.deepcopy(template.blocks)  # dense FFNs again, every fc1 a new module
    assert id(model) == before and _ffn_widths(model) == [n] * 3
    meta_prune(model, imp, 0.5)
    assert _ffn_widths(model) == [n // 2] * 3


def test_one_instance_prunes_every_fresh_copy(model):
    """The issue's loop: fresh deep copies, each freed before the next (ids get recycled)."""
    imp = JASImportance(random_scores(model, seed=0))
    n = model.blocks[0].mlp.fc1.out_features
    for _ in range(6):
        m = copy.deepcopy(model)
        meta_prune(m, imp, 0.5)
        assert _ffn_widths(m) == [n // 2] * 3
        del m
        gc.collect()


def test_cache_keeps_no_model_alive(tiny_vit):
    m = tiny_vit(num_classes=N_CLASSES, depth=2)
    imp = JASImportance(random_scores(m, seed=0))
    meta_prune(m, imp, 0.5)
    assert len(imp._fc1_blocks) == 2
    ref = weakref.ref(m.blocks[0].mlp.fc1)
    del m
    gc.collect()
    assert ref() is None and len(imp._fc1_blocks) == 0


# -- Torch-Pruning's whole workflow: a fallback for the other groups, every MetaPruner option -------


def _tp_scores(model, imp) -> dict[int, torch.Tensor]:
    """What a Torch-Pruning importance gives each FFN neuron group (all neurons selected)."""
    from jas_prune.pruning.graph import fc1_groups

    return {b: imp(g).detach().float() for b, g in fc1_groups(model)}


def _vit(tiny_vit):
    return tiny_vit(num_classes=N_CLASSES, depth=2, embed_dim=64, num_heads=4)


OPTIONS = {
    "local": dict(pruning_ratio=0.5),
    "global": dict(pruning_ratio=0.4, global_pruning=True),
    "isomorphic": dict(pruning_ratio=0.4, global_pruning=True, isomorphic=True),
    "round_to": dict(pruning_ratio=0.3, round_to=8),
    "heads": dict(pruning_ratio=0.25, prune_num_heads=True, head_pruning_ratio=0.5),
    "max_ratio": dict(pruning_ratio=0.6, max_pruning_ratio=0.5, global_pruning=True),
    "ratio_dict": dict(pruning_ratio=0.5, ratio_dict=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_with_a_fallback_every_option_behaves_as_with_torch_prunings_own_importance(tiny_vit, option):
    """JASImportance(scores of importance X on the FFN groups, fallback=X) prunes exactly what X
    alone prunes, under every MetaPruner option: FFN neurons, heads, head dims, the embedding."""
    kw = dict(OPTIONS[option])
    results = []
    for use_jas in (False, True):
        model = _vit(tiny_vit)
        x_imp = tp.importance.GroupMagnitudeImportance(p=2)
        imp = JASImportance(_tp_scores(model, x_imp), normalizer="none", min_keep=1, fallback=x_imp) if use_jas else x_imp
        args = {k: v for k, v in kw.items() if k != "ratio_dict"}
        if kw.get("ratio_dict"):
            args["pruning_ratio_dict"] = {model.blocks[0].attn: 0.25, model.blocks[1].mlp: 0.75}
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a fallback means no "options do nothing" warning
            warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
            tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=imp, ignored_layers=[model.head],
                                 num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks}, **args).step()
        results.append(model.state_dict())
    plain, jas = results
    assert {k: v.shape for k, v in jas.items()} == {k: v.shape for k, v in plain.items()}
    for k in plain:
        assert torch.equal(jas[k], plain[k]), k
    assert plain["blocks.0.mlp.fc1.weight"].shape[0] < 128  # something was pruned


def test_fallback_scores_only_the_other_groups(model):
    fb = tp.importance.GroupMagnitudeImportance()
    scores = random_scores(model, seed=0)
    imp = JASImportance(scores, fallback=fb)
    dg = dependency_graph(model)
    fc1 = {id(b.mlp.fc1) for b in model.blocks}
    for group in dg.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        got = imp(group)
        if id(root) in fc1 and group[0].dep.handler == tp.prune_linear_out_channels:
            assert not torch.equal(got, fb(group))
        else:
            assert torch.equal(got, fb(group))
    assert "fallback=GroupMagnitudeImportance" in repr(imp)
    with pytest.raises(InvalidArgumentError, match="fallback: another JASImportance"):
        JASImportance(scores, fallback=JASImportance(scores))
    with pytest.raises(InvalidArgumentError, match="fallback: expected a Torch-Pruning importance"):
        JASImportance(scores, fallback=3)


def test_head_options_without_fallback_warn_once_naming_them(tiny_vit):
    m = _vit(tiny_vit)
    imp = JASImportance(random_scores(m, seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = tp.pruner.MetaPruner(m, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5,
                                      num_heads={b.attn.qkv: b.attn.num_heads for b in m.blocks}, prune_num_heads=True,
                                      head_pruning_ratio=0.5, pruning_ratio_dict={m.blocks[0].attn: 0.3},
                                      ignored_layers=[m.head])
        pruner.step()
    ours = [str(w.message) for w in caught if "JASImportance" in str(w.message)]
    assert len(ours) == 1, ours
    for name in ("num_heads", "prune_num_heads", "head_pruning_ratio",
                 "pruning_ratio_dict entries for non-FFN modules (blocks.0.attn.qkv, blocks.0.attn.proj)"):
        assert name in ours[0]
    assert [b.attn.qkv.out_features for b in m.blocks] == [192, 192]  # indeed nothing but FFNs went
    m2 = _vit(tiny_vit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.pruner.MetaPruner(m2, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5).step()
    assert not [w for w in caught if "JASImportance" in str(w.message)]


def test_iterative_steps_recompute_jas_from_the_loader(tiny_vit, loader):
    """iterative_steps=3 with from_loader: the scores are recomputed on the pruned model before
    steps 2 and 3 (also after heads went: the attention geometry is brought up to date), and the
    widths follow Torch-Pruning's schedule as with its own importance."""
    m = _vit(tiny_vit)
    ref = _vit(tiny_vit)
    imp = JASImportance.from_loader(m, loader, steps=2, fallback=tp.importance.GroupMagnitudeImportance())
    widths = []
    for model, importance in ((m, imp), (ref, tp.importance.GroupMagnitudeImportance())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=importance, pruning_ratio=0.5,
                                          iterative_steps=3, num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
                                          prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.head])
            for _ in range(3):
                pruner.step()
        update_attention_geometry(model, pruner.num_heads)  # after the last step, as Torch-Pruning's example does
        widths.append([(b.mlp.fc1.out_features, b.attn.qkv.out_features, b.attn.num_heads) for b in model.blocks])
    assert imp.rescores == 2
    assert widths[0] == widths[1] and widths[0][0][2] < 4  # heads went too (by Torch-Pruning's per-step rule)
    with torch.no_grad():
        assert torch.isfinite(m(torch.randn(2, 3, 32, 32))).all()


def test_iterative_steps_with_fixed_scores_are_refused_before_anything_is_pruned(model):
    imp = JASImportance(random_scores(model, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=r"iterative_steps: MetaPruner\(iterative_steps=3\).*from_loader"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5,
                                 iterative_steps=3).step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
