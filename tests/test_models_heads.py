"""Attention heads on every supported family (tiny random-init models of ``test_families``):
heads are found, the two routes of the engine agree on head paths, and attention pruning either
equals the dense model with those heads and dimensions zeroed (fused and explicit attention),
refits the output projection, round-trips through save_pruned/load_pruned and exports to ONNX
with parity, in every family."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from families import FAMILIES, IDS, family_images, models  # noqa: F401 - the fixture

from jas_prune.attribution import JointAttribution
from jas_prune.models import discover_ffn
from jas_prune.models.heads import discover_heads
from jas_prune.pruning.attention import HeadScores, head_scores, prune_attention
from jas_prune.pruning.criteria import ScoringInputs


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_heads_located_and_routes_agree(fam, models):  # noqa: F811
    model = models(fam)
    heads = discover_heads(discover_ffn(model))
    assert [h.heads for h in heads] == [2, 2]
    x = family_images(model, n=2)
    y = torch.tensor([1, 3])
    kw = dict(steps=2, units=["ffn", "heads"], scope="all", formula="ig")
    tan = JointAttribution(model).attribute(x, y, **kw)
    rev = JointAttribution(model, path_mode="reverse").attribute(x, y, **kw)
    assert tan.head_paths.shape == (2, 2, 1) and torch.equal(tan.head_paths, rev.head_paths)
    torch.testing.assert_close(tan.jas, rev.jas, rtol=1e-4, atol=1e-6)


def _attention(model):
    return [h.attn for h in discover_heads(discover_ffn(model))]


def _heads_attr(attn):
    return "num_attention_heads" if hasattr(attn, "num_attention_heads") else "num_heads"


def _masked(model, summary):
    """The dense model with the removed heads' outputs and removed dimensions zeroed, written
    without jas-prune's slot layouts: a pre-hook zeroes the projection's removed input channels
    (removed heads, removed value dimensions), and the key rows of removed dimensions are
    zeroed (``qkv`` rows ``A + c``, or ``k_proj`` rows ``c``), so q·k loses them."""
    ref = copy.deepcopy(model)
    for b, h in enumerate(discover_heads(discover_ffn(ref))):
        H, d = h.heads, h.head_dim
        A = H * d
        keep = torch.zeros(H, d, dtype=torch.bool)
        for i in summary.kept_heads[b]:
            keep[i, summary.kept_dims[b]] = True
        keep = keep.flatten()
        gone_dims = torch.ones(d, dtype=torch.bool)
        gone_dims[summary.kept_dims[b]] = False
        gone_k = gone_dims.repeat(H)
        with torch.no_grad():
            qkv = getattr(h.attn, "qkv", None)
            k_lin, off = (qkv, A) if isinstance(qkv, torch.nn.Linear) else (h.attn.k_proj, 0)
            k_lin.weight[off:off + A][gone_k] = 0
            if k_lin.bias is not None:
                k_lin.bias[off:off + A][gone_k] = 0
        h.proj.register_forward_pre_hook(lambda _m, a, keep=keep: (a[0] * keep.to(a[0].dtype),))
    return ref


def _set_fused(model, fused: bool) -> None:
    """The fused kernel (scaled_dot_product_attention) or the explicit softmax(q·kᵀ·scale)·v path."""
    for attn in _attention(model):
        if hasattr(attn, "fused_attn"):
            attn.fused_attn = fused
        else:
            attn.config._attn_implementation = "sdpa" if fused else "eager"


def _no_zero_parameters(model):
    """Random values in every all-zero parameter (timm starts q_bias/v_bias and BEiT's relative
    position table at 0: a wrongly sliced one would go unnoticed)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_pruned_attention_equals_masked_dense_on_both_paths(fam, models):  # noqa: F811
    model = _no_zero_parameters(models(fam))
    scores = HeadScores({b: torch.randn(2, generator=torch.Generator().manual_seed(b)) for b in (0, 1)},
                        {b: torch.randn(16, generator=torch.Generator().manual_seed(5 + b)) for b in (0, 1)})
    pruned = copy.deepcopy(model)
    s = prune_attention(pruned, scores, heads=0.5, head_dims=0.5)
    for attn in _attention(pruned):
        assert getattr(attn, _heads_attr(attn)) == 1
        assert (attn.proj if hasattr(attn, "proj") else attn.o_proj).in_features == 8
        assert getattr(attn, "scale", getattr(attn, "scaling", None)) == 8 ** -0.5
    assert all(len(v) == 8 for v in s.kept_dims.values()) and all(len(v) == 1 for v in s.kept_heads.values())
    if discover_ffn(model).family == "timm-eva":  # rotary pairs (2i, 2i+1) stay or go together
        assert all(all((j ^ 1) in v for j in v) for v in s.kept_dims.values())
    ref = _masked(model, s)
    x = family_images(model, n=3)
    for fused in (True, False):
        _set_fused(pruned, fused)
        _set_fused(ref, fused)
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_attention_refit_checkpoint_and_onnx_parity(fam, models, tmp_path):  # noqa: F811
    pytest.importorskip("onnxruntime")
    from jas_prune import load_pruned, save_pruned
    from jas_prune.deploy import export_onnx, verify_onnx
    from jas_prune.pruning.reconstruct import reconstruct

    model = models(fam)
    pruned = copy.deepcopy(model)
    prune_attention(pruned, head_scores("magnitude", ScoringInputs(model=pruned)), heads=0.5, head_dims=0.5)
    x = family_images(model, n=16, seed=1)
    rep = reconstruct(pruned, model, [x], method="lsq", damping=1e-3)
    assert [r.block for r in rep.attention] == [0, 1]
    assert all(r.error_after <= r.error_before and r.width == 8 for r in rep.attention)
    again = load_pruned(save_pruned(pruned, tmp_path / "p.safetensors"))
    x = family_images(model, n=2)
    assert [getattr(a, _heads_attr(a)) for a in _attention(again)] == [1, 1]
    torch.testing.assert_close(again(x), pruned(x), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(pruned))(x), pruned(x), rtol=0, atol=0)
    export_onnx(pruned, tmp_path / "p.onnx")
    res = verify_onnx(tmp_path / "p.onnx", pruned, x, providers=["cpu"], atol=1e-4)
    assert res["passed"] and res["parity_max_abs"] <= 1e-4


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.key in ("vit", "hf-vit", "relpos")], ids=lambda f: f.key)
def test_explicit_group_scores_equal_torch_pruning(fam, models):  # noqa: F811
    """Magnitude and Taylor of the families sliced without the graph use channel_members; on
    families whose graph forms the head group it equals Torch-Pruning's group importances."""
    import torch_pruning as tp

    from jas_prune.models import FAMILIES as REG
    from jas_prune.pruning.attention import channel_members, head_groups

    model = models(fam)
    if fam.key == "relpos":  # the graph maps the relative-position MLP to the wrong channels: drop it
        for b in model.blocks:
            b.attn.rel_pos = None
    x = family_images(model, n=2)
    model.zero_grad()
    model(x).square().sum().backward()
    layout = REG.get(discover_ffn(model).family).attention
    mag = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    tay = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    for h, g in head_groups(model) if layout.graph else _groups_anyway(model):
        with torch.no_grad():
            torch.testing.assert_close(channel_members(h, layout, lambda w, _g: w.pow(2).sum(1)), mag(g))
            torch.testing.assert_close(channel_members(h, layout, lambda w, gr: (w * gr).abs().sum(1)), tay(g))


def _groups_anyway(model):
    import torch_pruning as tp

    from jas_prune.pruning.graph import dependency_graph

    dg = dependency_graph(model)
    for h in discover_heads(discover_ffn(model)):
        yield h, dg.get_pruning_group(h.proj, tp.prune_linear_in_channels, list(range(h.proj.in_features)))


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.hf], ids=lambda f: f.key)
def test_hf_save_pretrained_keeps_pruned_heads(fam, models, tmp_path):  # noqa: F811
    """The transformers config gets the pruned num_attention_heads/head_dim, so the library's own
    from_pretrained (and load_model('hf:DIR')) rebuilds the pruned model."""
    from jas_prune.models import load_model

    pruned = models(fam)
    prune_attention(pruned, head_scores("random", ScoringInputs(model=pruned)), heads=0.5, head_dims=0.5)
    pruned.save_pretrained(tmp_path / "p")
    again = load_model(f"hf:{tmp_path / 'p'}")
    assert (again.model.config.num_attention_heads, again.model.config.head_dim) == (1, 8)
    x = family_images(pruned, n=2)
    torch.testing.assert_close(again(x), pruned(x), rtol=0, atol=0)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_every_head_criterion_scores_every_family(fam, models):  # noqa: F811
    from jas_prune.pruning.attention import HEAD_CRITERIA

    model = models(fam)
    x = family_images(model, n=2)
    batch = (x, torch.tensor([1, 3]))
    for name in HEAD_CRITERIA.names():
        s = head_scores(name, ScoringInputs(model=model, loader=[batch], seed=1,
                                            locate_settings=dict(steps=2, scope="all", formula="ig")))
        assert set(s.heads) == set(s.dims) == {0, 1}, name
        assert all(v.shape == (2,) and torch.isfinite(v).all() for v in s.heads.values()), name
        assert all(v.shape == (16,) and torch.isfinite(v).all() for v in s.dims.values()), name


def test_eva_half_rotary_layout_prunes_pairs_i_and_i_plus_half():
    from jas_prune.models import create_model

    torch.manual_seed(0)
    model = create_model("eva02_tiny_patch14_224", num_classes=5, img_size=28, patch_size=14, embed_dim=32, depth=2,
                         num_heads=2, ref_feat_shape=(2, 2), rope_rotate_half=True).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    assert model.blocks[0].attn.rotate_half
    scores = HeadScores({b: torch.ones(2) for b in (0, 1)},
                        {b: torch.randn(16, generator=torch.Generator().manual_seed(b)) for b in (0, 1)})
    pruned = copy.deepcopy(model)
    s = prune_attention(pruned, scores, head_dims=0.5)
    assert all(sorted({j % 8 for j in v}) == sorted(j for j in v if j < 8) and len(v) == 8 for v in s.kept_dims.values())
    x = family_images(model, n=2)
    torch.testing.assert_close(pruned(x), _masked(model, s)(x), rtol=1e-4, atol=1e-5)
