"""Tests of the JAS engine against a brute-force reference written straight from SPEC §2.

The reference below uses its own hooks (in-place writes into a cloned hidden), one image, one
step and — for ``exact`` — one candidate at a time, and explicit Python sums over the neurons of
the set, so it shares no code with :mod:`jas_prune.locate`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from jas_prune.attribution import METHODS, JointAttribution, locate, path_jas
from jas_prune.testing import random_vit
from jas_prune.errors import AttributionSettingError, RecipeError
from jas_prune.neurons import edit
from reference import ref_clean, ref_grads, ref_rule

B, STEPS = 2, 3


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=3, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def labels():
    return torch.tensor([1, 2])


# --------------------------------------------------------------------------- reference
def scaled_values(clean, scaled, alpha):
    """Clean scope values with the neurons in scaled[l] (a list, or 'all') multiplied by alpha."""
    out = {}
    for l, who in scaled.items():
        v = clean[l].clone()
        if who == "all":
            v = v * alpha
        else:
            for u in who:
                v[..., u] = v[..., u] * alpha
        out[l] = v
    return out


def ref_jas_of_set(S, clean, grads_per_step, w, formula, scope):
    """JAS of S = [(l, u), ...] from per-step gradient dicts, straight from SPEC §2."""
    def vbar(l, u):
        return float(clean[l][..., u].sum())

    def gsum(g, l, u):
        return float(g[l][..., u].sum())

    if formula == "paper":
        v_total = sum(vbar(l, u) for l, u in S)
        g_total = sum(w[k] * sum(gsum(g, l, u) for l, u in S) for k, g in enumerate(grads_per_step))
        return v_total * g_total
    total = 0.0
    for l, u in S:
        for k, g in enumerate(grads_per_step):
            total += w[k] * float((clean[l][..., u] * g[l][..., u]).sum())
    return total


def ref_locate_one(model, x1, target, layers, *, steps, topk, scope, formula, quadrature, candidates):
    clean, _ = ref_clean(model, x1, scope)
    nodes, w = ref_rule(quadrature, steps)
    path: dict[int, list[int]] = {}
    all_scores = []
    for l in layers:
        n = clean[l].shape[-1]
        P = [(lp, u) for lp, us in path.items() for u in us]
        scores = []
        if candidates == "layer_scaled":
            grads = []
            for a in nodes:
                scaled = {lp: list(us) for lp, us in path.items()}
                scaled[l] = "all"
                grads.append(ref_grads(model, x1, target, scaled_values(clean, scaled, a), scope)[1])
            for j in range(n):
                scores.append(ref_jas_of_set(P + [(l, j)], clean, grads, w, formula, scope))
        else:
            for j in range(n):
                grads = []
                for a in nodes:
                    scaled = {lp: list(us) for lp, us in path.items()}
                    scaled[l] = [j]
                    grads.append(ref_grads(model, x1, target, scaled_values(clean, scaled, a), scope)[1])
                scores.append(ref_jas_of_set(P + [(l, j)], clean, grads, w, formula, scope))
        sc = torch.tensor(scores, dtype=torch.float64)
        path[l] = sorted(range(n), key=lambda j: -scores[j])[:topk]
        all_scores.append(sc)
    jas = ref_path_jas_one(model, x1, target, path, clean, nodes, w, formula, scope)
    return path, all_scores, jas


def ref_path_jas_one(model, x1, target, path, clean, nodes, w, formula, scope):
    grads = [ref_grads(model, x1, target, scaled_values(clean, {l: list(u) for l, u in path.items()}, a), scope)[1]
             for a in nodes]
    S = [(l, u) for l, us in path.items() for u in us]
    return ref_jas_of_set(S, clean, grads, w, formula, scope)


def check_against_reference(model, images, labels, res, *, layers, steps, topk, scope, formula, quadrature,
                            candidates, target):
    probs = torch.softmax(model(images), -1).detach()
    targets = labels if target == "label" else probs.argmax(1)
    assert torch.equal(res.targets, targets)
    torch.testing.assert_close(res.probs, probs.gather(1, targets[:, None])[:, 0], rtol=1e-10, atol=1e-12)
    assert res.layers == layers
    assert res.paths.shape == (images.shape[0], len(layers), topk)
    for b in range(images.shape[0]):
        path, scores, jas = ref_locate_one(model, images[b:b + 1], int(targets[b]), layers, steps=steps, topk=topk,
                                           scope=scope, formula=formula, quadrature=quadrature, candidates=candidates)
        for i, l in enumerate(layers):
            torch.testing.assert_close(res.scores[i][b], scores[i], rtol=1e-5, atol=1e-12)
            assert res.paths[b, i].tolist() == path[l], (b, l)
        assert res.jas[b].item() == pytest.approx(jas, rel=1e-5, abs=1e-12)


COMBOS = [
    dict(scope=s, formula=f, quadrature=q, candidates="layer_scaled", topk=1 + (i % 2),
         target="label" if i % 3 else "pred", layers=[0, 1, 2] if i % 4 else [0, 2])
    for i, (s, f, q) in enumerate(itertools.product(["cls", "all"], ["paper", "ig"],
                                                     ["left", "right", "trapezoid", "gauss"]))
] + [
    dict(scope="cls", formula="paper", quadrature="left", candidates="exact", topk=1, target="label", layers=[0, 1, 2]),
    dict(scope="all", formula="ig", quadrature="gauss", candidates="exact", topk=2, target="pred", layers=[1, 2]),
    dict(scope="cls", formula="ig", quadrature="right", candidates="exact", topk=2, target="label", layers=[0, 2]),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
def test_jas_matches_bruteforce_reference(model, images, labels, combo):
    res = locate(model, images, labels, method="jas", steps=STEPS, **combo)
    check_against_reference(model, images, labels, res, steps=STEPS, **combo)
    assert res.settings["target"] == combo["target"]


def test_layers_prefix_depth_and_internal_batch_size(model, images, labels):
    full = locate(model, images, labels, steps=4, topk=2, layers=2)
    assert full.layers == [0, 1]
    for ibs in (1, 3, 5):
        chunked = locate(model, images, labels, steps=4, topk=2, layers=2, internal_batch_size=ibs)
        assert torch.equal(chunked.paths, full.paths)
        torch.testing.assert_close(chunked.jas, full.jas, rtol=1e-10, atol=1e-14)
        for a, b in zip(chunked.scores, full.scores):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    ex = locate(model, images, labels, steps=2, candidates="exact", layers=[1], internal_batch_size=7)
    ex2 = locate(model, images, labels, steps=2, candidates="exact", layers=[1])
    torch.testing.assert_close(ex.scores[0], ex2.scores[0], rtol=1e-10, atol=1e-14)


def test_path_jas_matches_locate(model, images, labels):
    for kw in (dict(scope="cls", formula="paper"), dict(scope="all", formula="ig", quadrature="gauss")):
        res = locate(model, images, labels, steps=STEPS, topk=2, **kw)
        again = path_jas(model, images, res.targets, res.paths, steps=STEPS, **kw)
        torch.testing.assert_close(again, res.jas, rtol=1e-10, atol=1e-14)
    # [B, L] paths are accepted for K = 1
    res = locate(model, images, labels, steps=STEPS)
    torch.testing.assert_close(path_jas(model, images, labels, res.paths[:, :, 0], steps=STEPS), res.jas)


def test_default_paths_follow_released_code(model, images, labels):
    """The default settings find the paths of the released code's structure (one image at a time,
    a separate backward per path layer)."""
    from jas_prune.testing import released_loop_locate

    m32 = random_vit(depth=4, embed_dim=16, num_heads=2, img_size=16, patch_size=8, num_classes=5, seed=3)
    x = images.float()
    ref_paths, ref_jas = released_loop_locate(m32, x, labels, steps=20)
    res = locate(m32, x, labels)
    assert torch.equal(res.paths[:, :, 0], ref_paths)
    torch.testing.assert_close(res.jas, ref_jas, rtol=1e-4, atol=1e-7)


def _zeroed_clamped_F(model, x1, target, path, scope):
    """F with the path neurons zeroed and every other neuron of their blocks held at clean values."""
    clean, p = ref_clean(model, x1, scope)
    F0, _ = ref_grads(model, x1, target, scaled_values(clean, path, 0.0), scope)
    return float(p[target]), F0


@pytest.mark.parametrize("scope", ["cls", "all"])
def test_ig_gauss_completeness(model, images, labels, scope):
    res = locate(model, images, labels, steps=32, topk=2, formula="ig", quadrature="gauss", scope=scope)
    for b in range(B):
        path = {l: res.paths[b, i].tolist() for i, l in enumerate(res.layers)}
        F1, F0 = _zeroed_clamped_F(model, images[b:b + 1], int(labels[b]), path, scope)
        diff = F1 - F0
        assert abs(diff) > 1e-3
        assert abs(res.jas[b].item() - diff) < 0.01 * abs(diff)


def test_ig_completeness_single_layer_with_edit(model, images, labels):
    """For a one-layer set, 'S zeroed' is plainly neurons.edit(×0): no clamping is involved."""
    res = locate(model, images, labels, steps=32, topk=3, formula="ig", quadrature="gauss", layers=[1])
    n = model.blocks[1].mlp.fc1.out_features
    mult = torch.ones(B, n, dtype=torch.float64)
    mult.scatter_(1, res.paths[:, 0], 0.0)
    with torch.no_grad(), edit(model, {1: mult}, scope="cls"):
        F0 = torch.softmax(model(images), -1).gather(1, labels[:, None])[:, 0]
    diff = res.probs - F0
    assert (diff.abs() > 1e-4).all()
    assert ((res.jas - diff).abs() < 0.01 * diff.abs()).all()


@pytest.mark.parametrize("scope,quadrature", [("cls", "left"), ("all", "gauss")])
def test_knowledge_is_textbook_ig(model, images, labels, scope, quadrature):
    steps = 5
    res = locate(model, images, labels, method="knowledge", steps=steps, topk=2, scope=scope, quadrature=quadrature)
    nodes, w = ref_rule(quadrature, steps)
    for b in range(B):
        x1, t = images[b:b + 1], int(labels[b])
        clean, _ = ref_clean(model, x1, scope)
        for i, l in enumerate(res.layers):
            baseline = torch.zeros_like(clean[l])
            avg_grad = torch.zeros_like(clean[l])
            for a, wk in zip(nodes, w):
                point = baseline + a * (clean[l] - baseline)
                _, g = ref_grads(model, x1, t, {l: point}, scope)
                avg_grad += wk * g[l]
            ig = (clean[l] - baseline) * avg_grad
            ig = ig if scope == "cls" else ig.sum(0)
            torch.testing.assert_close(res.scores[i][b], ig, rtol=1e-5, atol=1e-12)
            assert res.paths[b, i].tolist() == ig.topk(2).indices.tolist()


@pytest.mark.parametrize("scope", ["cls", "all"])
def test_influence_pattern_reference(model, images, labels, scope):
    steps = 4
    res = locate(model, images, labels, method="influence_pattern", steps=steps, topk=2, scope=scope)
    nodes, w = ref_rule("left", steps)
    for b in range(B):
        t = int(labels[b])
        acc = {l: 0.0 for l in res.layers}
        for a, wk in zip(nodes, w):
            xs = (images[b:b + 1] * a).requires_grad_(True)
            store = {}
            hs = [model.blocks[l].mlp.act.register_forward_hook(lambda m, i, o, l=l: store.__setitem__(l, o))
                  for l in res.layers]
            try:
                F = torch.softmax(model(xs), -1)[0, t]
                gs = torch.autograd.grad(F, [store[l] for l in res.layers])
            finally:
                for h in hs:
                    h.remove()
            for l, g in zip(res.layers, gs):
                acc[l] = acc[l] + wk * (g[0, 0] if scope == "cls" else g[0].sum(0))
        for i, l in enumerate(res.layers):
            torch.testing.assert_close(res.scores[i][b], acc[l], rtol=1e-5, atol=1e-12)
            assert res.paths[b, i].tolist() == acc[l].topk(2).indices.tolist()


def test_activation_baseline_and_its_jas(model, images, labels):
    res = locate(model, images, labels, method="activation", steps=STEPS, topk=2, scope="all")
    clean = [ref_clean(model, images[b:b + 1], "all")[0] for b in range(B)]
    for i, l in enumerate(res.layers):
        v = torch.stack([c[l].sum(0) for c in clean])
        torch.testing.assert_close(res.scores[i], v)
        assert torch.equal(res.paths[:, i], v.topk(2, dim=1).indices)
    torch.testing.assert_close(res.jas, path_jas(model, images, labels, res.paths, steps=STEPS, scope="all"))


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS.names())  # every registered attribution method, without a list
def test_model_left_unchanged(model, images, labels, method):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    flags = {n: (i % 2 == 0) for i, (n, _) in enumerate(model.named_parameters())}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    try:
        res = locate(model, images, labels, method=method, steps=2, topk=1, internal_batch_size=3)
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert _all_hooks(model) == 0
        assert all(p.grad is None for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])
        assert res.paths.dtype == torch.long and res.jas.shape == (B,)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_hooks_removed_on_exception(model, images, labels):
    calls = {"n": 0}

    def boom(m, i, o):
        calls["n"] += 1
        if calls["n"] > 1:  # let the clean forward pass, fail inside a scaled pass
            raise RuntimeError("boom")

    h = model.head.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            locate(model, images, labels, steps=2)
    finally:
        h.remove()
    assert _all_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_no_class_token_model_supports_only_all():
    m = random_vit(depth=2, embed_dim=16, num_heads=2, img_size=16, patch_size=8, num_classes=4, dtype=torch.float64)
    import timm

    m2 = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                           num_classes=4, class_token=False, global_pool="avg").double().eval()
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if k in m2.state_dict()
                        and v.shape == m2.state_dict()[k].shape}, strict=False)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(AttributionSettingError, match=r"attribution\.scope.*class token"):
        locate(m2, x, torch.tensor([0, 1]))
    res = locate(m2, x, torch.tensor([0, 1]), scope="all", steps=2, topk=2)
    assert res.paths.shape == (2, 2, 2)
    assert torch.isfinite(res.jas).all()


def test_captum_style_object(model, images, labels):
    ja = JointAttribution(model)
    r1 = ja.attribute(images, target=labels, steps=STEPS)
    r2 = ja.attribute(images, target=labels, steps=STEPS)  # stateless between calls
    assert torch.equal(r1.paths, r2.paths) and torch.equal(r1.jas, r2.jas)
    r3 = ja.attribute(images, target=None, steps=STEPS)
    assert torch.equal(r3.targets, torch.softmax(model(images), -1).argmax(1))
    r4 = ja.attribute(images, target=2, steps=STEPS)
    assert r4.targets.tolist() == [2, 2]


@pytest.mark.parametrize("kwargs,key", [
    (dict(method="gradcam"), "attribution.method"),
    (dict(steps=0), "attribution.steps"),
    (dict(steps=2.5), "attribution.steps"),
    (dict(steps=1, quadrature="trapezoid"), "attribution.steps"),
    (dict(topk=0), "attribution.topk"),
    (dict(topk=33), "attribution.topk: 33 exceeds the FFN width 32 of block 0"),
    (dict(scope="patch"), "attribution.scope"),
    (dict(formula="sum"), "attribution.formula"),
    (dict(quadrature="simpson"), "attribution.quadrature"),
    (dict(candidates="all"), "attribution.candidates"),
    (dict(target="logit"), "attribution.target"),
    (dict(layers=0), "attribution.layers"),
    (dict(layers=4), "attribution.layers"),
    (dict(layers=[0, 3]), "attribution.layers"),
    (dict(layers=[1, 1]), "attribution.layers"),
    (dict(layers=[]), "attribution.layers"),
    (dict(internal_batch_size=0), "attribution.internal_batch_size"),
])
def test_bad_settings_name_the_setting(model, images, labels, kwargs, key):
    with pytest.raises(AttributionSettingError) as info:
        locate(model, images, labels, **kwargs)
    assert key in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RecipeError)


def test_label_target_needs_labels_and_valid_labels(model, images):
    with pytest.raises(AttributionSettingError, match=r"attribution\.target"):
        locate(model, images, None)
    with pytest.raises(AttributionSettingError, match="target"):
        locate(model, images, torch.tensor([0, 9]))
    res = locate(model, images, None, target="pred", steps=2)
    assert res.settings["target"] == "pred"


def test_relu_model_matches_reference(images, labels):
    """Activations whose backward reads their output (ReLU) take the out-of-place write path."""
    import timm

    m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                          mlp_ratio=2.0, num_classes=5, act_layer=torch.nn.ReLU)
    m.load_state_dict(random_vit(depth=2, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0,
                                 num_classes=5, seed=4).state_dict())
    m = m.double().eval()
    combo = dict(scope="cls", formula="paper", quadrature="left", candidates="layer_scaled", topk=2,
                 target="label", layers=[0, 1])
    res = locate(m, images, labels, steps=STEPS, **combo)
    check_against_reference(m, images, labels, res, steps=STEPS, **combo)
