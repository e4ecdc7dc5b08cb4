"""The engine's two routes to the path neurons' gradients, the joint IG method and the
accumulation dtype.

``tangent`` (the kept stream advanced with forward-mode autograd) and ``reverse`` (every pass
backpropagated to the first edited block) must give the same numbers to rounding; a model whose
block lacks a forward-mode derivative must fall back to ``reverse``. ``joint_ig`` is checked
against a brute-force reference built from the helpers of ``test_attribution_api`` (their own hooks, one
image and one step at a time).
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import ref_clean, ref_grads, ref_rule

from jas_prune.attribution import METHODS, JointAttribution, locate
from jas_prune.attribution import engine as engine_mod
from jas_prune.testing import random_vit
from jas_prune.errors import InvalidArgumentError

B = 3


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=4, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=2, dtype=torch.float64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.fixture(scope="module")
def labels():
    return torch.tensor([0, 3, 4])


COMBOS = [
    dict(scope="cls", formula="paper", quadrature="left", topk=1),
    dict(scope="cls", formula="ig", quadrature="gauss", topk=2, layers=[0, 2, 3]),
    dict(scope="all", formula="paper", quadrature="right", topk=2, layers=[1, 3]),
    dict(scope="all", formula="ig", quadrature="trapezoid", topk=1, internal_batch_size=4),
    dict(scope="cls", formula="paper", quadrature="left", topk=2, candidates="exact", layers=[1, 2]),
    dict(scope="all", formula="ig", quadrature="gauss", topk=1, candidates="exact", internal_batch_size=5),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
def test_tangent_and_reverse_routes_agree(model, images, labels, combo):
    tan = JointAttribution(model).attribute(images, labels, steps=3, **combo)
    rev = JointAttribution(model, path_mode="reverse").attribute(images, labels, steps=3, **combo)
    assert torch.equal(tan.paths, rev.paths)
    torch.testing.assert_close(tan.jas, rev.jas, rtol=1e-9, atol=1e-15)
    for a, b in zip(tan.scores, rev.scores):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_tangent_route_runs_fewer_block_rows(model, images, labels):
    """The kept stream skips the blocks below the located one: count the rows every block call
    forwards (B = 3 images, m = 2 steps, 4 blocks, one chunk)."""
    rows = {"n": 0}

    def count(_mod, _args, out):
        rows["n"] += out.shape[0]

    hs = [blk.register_forward_hook(count) for blk in model.blocks]
    try:
        n = {}
        for mode in ("reverse", "tangent"):
            rows["n"] = 0
            JointAttribution(model, path_mode=mode).attribute(images, labels, steps=2)
            n[mode] = rows["n"]
    finally:
        for h in hs:
            h.remove()
    # reverse: clean forward 4 blocks × 3 images, then 4 layer passes + the path pass, each
    # through all 4 blocks with 6 rows
    assert n["reverse"] == 12 + 5 * 4 * 6
    # tangent: clean 12; layer passes from block l (blocks below on one image, 6 rows from l on):
    # 24, 1 + 18, 2 + 12, 3 + 6; the path pass from block 3: 3 + 6; advances through block l
    # (blocks below on one image): 6, 1 + 6, 2 + 6
    assert n["tangent"] == 12 + (24 + 19 + 14 + 9) + 9 + (6 + 7 + 8)


class _GeluNoJvp(torch.autograd.Function):
    """GELU with a backward but no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(g, x)


class _Act(torch.nn.Module):
    def forward(self, x):
        return _GeluNoJvp.apply(x)


def test_model_without_forward_mode_falls_back_to_reverse(model, images, labels):
    m = copy.deepcopy(model)
    for blk in m.blocks:
        blk.mlp.act = _Act()
    ref = JointAttribution(model, path_mode="reverse").attribute(images, labels, steps=3, scope="all", formula="ig")
    got = JointAttribution(m).attribute(images, labels, steps=3, scope="all", formula="ig")
    assert torch.equal(got.paths, ref.paths)
    torch.testing.assert_close(got.jas, ref.jas, rtol=1e-9, atol=1e-15)
    assert sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules()) == 0


def test_path_mode_is_checked(model):
    with pytest.raises(InvalidArgumentError, match="path_mode: must be one of tangent, reverse"):
        JointAttribution(model, path_mode="forward")


# --------------------------------------------------------------------------- joint IG
def ref_joint_ig(model, x1, target, layers, steps, quadrature, scope):
    """Every located block's scope hidden clamped to α·clean at once; IG per neuron."""
    clean, _ = ref_clean(model, x1, scope)
    nodes, w = ref_rule(quadrature, steps)
    acc = {l: torch.zeros_like(clean[l]) for l in layers}
    for a, wk in zip(nodes, w):
        _, g = ref_grads(model, x1, target, {l: clean[l] * a for l in layers}, scope)
        for l in layers:
            acc[l] += wk * clean[l] * g[l]
    return {l: (v if scope == "cls" else v.sum(0)) for l, v in acc.items()}


@pytest.mark.parametrize("scope,quadrature,layers", [("cls", "left", [0, 1, 2, 3]), ("all", "gauss", [1, 3])])
def test_joint_ig_matches_reference(model, images, labels, scope, quadrature, layers):
    res = locate(model, images, labels, method="joint_ig", steps=4, topk=2, scope=scope, quadrature=quadrature,
                 layers=layers)
    assert res.layers == layers
    for b in range(B):
        ref = ref_joint_ig(model, images[b:b + 1], int(labels[b]), layers, 4, quadrature, scope)
        for i, l in enumerate(layers):
            torch.testing.assert_close(res.scores[i][b], ref[l], rtol=1e-6, atol=1e-12)
            assert res.paths[b, i].tolist() == ref[l].topk(2).indices.tolist()


@pytest.mark.parametrize("scope", ["cls", "all"])
def test_joint_ig_completeness_over_every_ffn_neuron(model, images, labels, scope):
    res = locate(model, images, labels, method="joint_ig", steps=32, quadrature="gauss", scope=scope)
    total = sum(s.sum(1) for s in res.scores)
    zero = {l: torch.zeros_like(v) for l, v in ref_clean(model, images[:1], scope)[0].items()}
    diffs = []
    for b in range(B):
        F0, _ = ref_grads(model, images[b:b + 1], int(labels[b]), zero, scope)
        diffs.append(res.probs[b].item() - F0)
        assert abs(total[b].item() - diffs[-1]) < 1e-3 * abs(diffs[-1]) + 1e-9
    assert max(abs(d) for d in diffs) > 1e-3


def test_joint_ig_is_registered():
    m = METHODS.get("joint_ig")
    assert m.name == "joint_ig" and m.label == "joint IG"
    assert len({x.colour for x in METHODS}) == len(list(METHODS))


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("kw", [dict(), dict(scope="all", formula="ig"), dict(method="joint_ig", scope="all")])
def test_bfloat16_model_accumulates_in_float32(monkeypatch, kw):
    m32 = random_vit(depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=8, mlp_ratio=4.0,
                     num_classes=5, seed=5)
    mbf = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 5
    seen = []
    real = engine_mod.JointAttribution._passes

    def spy(self, st, *a, **k):
        seen.append((st.nodes.dtype, st.weights.dtype, {v.dtype for v in st.vbar.values()}))
        for sl, g, dots in real(self, st, *a, **k):
            assert {t.dtype for t in g.values()} == {torch.float32}
            assert dots is None or dots.dtype == torch.float32
            yield sl, g, dots

    monkeypatch.setattr(engine_mod.JointAttribution, "_passes", spy)
    rb = locate(mbf, x, y, steps=8, **kw)
    r32 = locate(m32, x, y, steps=8, **kw)
    assert seen and all(s == (torch.float32, torch.float32, {torch.float32}) for s in seen)
    assert rb.jas.dtype == rb.probs.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in rb.scores)
    assert torch.isfinite(rb.jas).all() and all(torch.isfinite(s).all() for s in rb.scores)
    assert (rb.paths == r32.paths).float().mean() >= 0.75
    top = torch.stack(r32.scores).abs().max()
    assert (torch.stack(rb.scores) - torch.stack(r32.scores)).abs().max() < 0.1 * top
