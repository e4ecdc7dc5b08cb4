"""Attention pruning (heads and head dimensions): the pruned model equals the masked dense model,
survives save/load and ONNX export, scores come from every head criterion, a bias table shared by
all blocks refuses head removal in one line, and the output projection refit never raises the calibration error."""

from __future__ import annotations

import copy

import pytest
import torch

from jas_prune.testing import random_vit
from jas_prune.errors import PruneSettingError, UnsupportedModelError
from jas_prune.pruning.attention import (HEAD_CRITERIA, AttentionSettings, HeadScores, head_scores,
                                         prune_attention)
from jas_prune.pruning.criteria import ScoringInputs

H, D = 4, 16


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=2, embed_dim=D, num_heads=H, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=2)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def masked(model, summary):
    """The dense model with the removed heads' and dimensions' q/k/v rows and proj columns zeroed."""
    ref = copy.deepcopy(model)
    d = D // H
    with torch.no_grad():
        for b, blk in enumerate(ref.blocks):
            keep = torch.zeros(3, H, d, dtype=torch.bool)
            for i in summary.kept_heads[b]:
                keep[:, i, summary.kept_dims[b]] = True
            keep = keep.flatten()
            blk.attn.qkv.weight[~keep] = 0
            blk.attn.qkv.bias[~keep] = 0
            blk.attn.proj.weight[:, ~keep[2 * D:]] = 0
    return ref


@pytest.mark.parametrize("heads,dims", [(0.5, 0.0), (0.0, 0.5), (0.25, 0.5)])
def test_pruned_equals_masked_dense(model, batch, heads, dims):
    scores = HeadScores({b: torch.randn(H, generator=torch.Generator().manual_seed(b)) for b in (0, 1)},
                        {b: torch.randn(D // H, generator=torch.Generator().manual_seed(9 + b)) for b in (0, 1)})
    pruned = copy.deepcopy(model)
    s = prune_attention(pruned, scores, heads=heads, head_dims=dims)
    kept_h, kept_d = H - round(H * heads), D // H - round(D // H * dims)
    for b, blk in enumerate(pruned.blocks):
        assert blk.attn.num_heads == kept_h and blk.attn.head_dim == kept_d
        assert blk.attn.qkv.out_features == 3 * kept_h * kept_d == 3 * blk.attn.proj.in_features
        lowest = torch.sort(scores.heads[b], stable=True).indices[:H - kept_h].tolist()
        assert sorted(set(range(H)) - set(s.kept_heads[b])) == sorted(lowest)
    x = batch[0]
    torch.testing.assert_close(pruned(x), masked(model, s)(x), rtol=1e-4, atol=1e-5)
    blk = pruned.blocks[0]
    blk.attn.fused_attn = not blk.attn.fused_attn  # the explicit path agrees with the fused kernel
    try:
        torch.testing.assert_close(pruned(x), masked(model, s)(x), rtol=1e-4, atol=1e-5)
    finally:
        blk.attn.fused_attn = not blk.attn.fused_attn


def test_save_load_and_onnx_parity(model, batch, tmp_path):
    pytest.importorskip("onnxruntime")
    from jas_prune import load_pruned, save_pruned
    from jas_prune.deploy.onnx_export import export_onnx
    from jas_prune.deploy.verify import verify_onnx

    pruned = copy.deepcopy(model)
    prune_attention(pruned, head_scores("magnitude", ScoringInputs(model=pruned)), heads=0.5, head_dims=0.5)
    again = load_pruned(save_pruned(pruned, tmp_path / "p.safetensors"))
    x = batch[0]
    assert again.blocks[1].attn.num_heads == 2 and again.blocks[1].attn.head_dim == 2
    torch.testing.assert_close(again(x), pruned(x), rtol=0, atol=0)
    export_onnx(pruned, tmp_path / "p.onnx")
    res = verify_onnx(tmp_path / "p.onnx", pruned, x, providers=["cpu"], atol=1e-4)
    assert res["passed"] and res["parity_max_abs"] <= 1e-4


@pytest.mark.parametrize("name", ["jas", "magnitude", "taylor", "activation", "random", "hessian", "vit_slim", "obs",
                                  "obs_jas"])
def test_every_head_criterion_scores_heads_and_dims(model, batch, name):
    inputs = ScoringInputs(model=model, loader=[batch], seed=1, locate_settings=dict(steps=2, scope="all", formula="ig"))
    s = head_scores(name, inputs)
    assert set(s.heads) == set(s.dims) == {0, 1}
    assert all(v.shape == (H,) and torch.isfinite(v).all() for v in s.heads.values())
    assert all(v.shape == (D // H,) and torch.isfinite(v).all() for v in s.dims.values())
    assert "jas" in HEAD_CRITERIA.names()


def test_unscored_criterion_and_settings_refused(model, monkeypatch):
    monkeypatch.delitem(HEAD_CRITERIA._entries, "obs")  # a criterion without head scores
    with pytest.raises(PruneSettingError, match="criterion 'obs' cannot score attention heads"):
        head_scores("obs", ScoringInputs(model=model))
    with pytest.raises(ValueError, match="set heads and/or head_dims"):
        AttentionSettings()
    with pytest.raises(ValueError, match="extra"):
        AttentionSettings(heads=0.5, ffn=0.2)


def test_shared_relative_position_bias_refuses_heads_in_one_line():
    import timm

    m = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                          embed_dim=16, num_heads=2, num_classes=3, use_shared_rel_pos_bias=True,
                          use_rel_pos_bias=False)
    with pytest.raises(UnsupportedModelError, match=r"^prune.attention.heads: timm-beit: its relative position bias "
                                                    r"table is shared by every block"):
        prune_attention(m, HeadScores({0: torch.ones(2)}, {0: torch.ones(8)}), heads=0.5)
    s = prune_attention(m, HeadScores({0: torch.ones(2)}, {0: torch.arange(8.0)}), head_dims=0.5)
    assert s.kept_dims[0] == [4, 5, 6, 7] and m(torch.randn(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize("target", ["local", "global", "residual"])
def test_projection_refit_lowers_calibration_error(model, batch, target):
    from jas_prune.pruning.reconstruct import reconstruct

    pruned = copy.deepcopy(model)
    prune_attention(pruned, head_scores("random", ScoringInputs(model=pruned, seed=3)), heads=0.5, head_dims=0.5)
    before = copy.deepcopy(pruned)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    rep = reconstruct(pruned, model, [x], method="lsq", target=target, damping=1e-3)
    assert [r.block for r in rep.attention] == [0, 1] and [r.block for r in rep.blocks] == [0, 1]
    assert all(r.error_after <= r.error_before for r in rep.attention + rep.blocks)
    assert any(r.refit for r in rep.attention)
    assert all(r.width == 4 and r.dense_width == D for r in rep.attention)
    # block 0's attention refit is a plain least-squares fit: its error drops vs. the pruned projection
    if target == "global":
        dense_out = (model(x) - before(x)).pow(2).mean()
        assert (model(x) - pruned(x)).pow(2).mean() < dense_out
    assert "attention" in rep.to_dict()


def test_jas_importance_ranks_heads_by_head_scores_in_metapruner(model):
    import torch_pruning as tp

    from jas_prune.pruning.graph import update_attention_geometry
    from jas_prune.pruning.plugin import JASImportance

    pruned = copy.deepcopy(model)
    heads = {0: torch.tensor([4.0, 1.0, 3.0, 2.0]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0])}
    ffn = {b: torch.rand(blk.mlp.fc1.out_features) for b, blk in enumerate(pruned.blocks)}
    imp = JASImportance(ffn, head_scores=heads)
    qkv = {blk.attn.qkv: blk.attn.num_heads for blk in pruned.blocks}
    pruner = tp.pruner.MetaPruner(pruned, torch.randn(1, 3, 16, 16), importance=imp, pruning_ratio=0.25,
                                  num_heads=qkv, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5,
                                  ignored_layers=[pruned.head])
    w0 = {b: blk.attn.proj.weight.detach().clone() for b, blk in enumerate(model.blocks)}
    pruner.step()
    update_attention_geometry(pruned, pruner.num_heads)
    d = D // H
    for b, keep in ((0, [0, 2]), (1, [2, 3])):  # the two best heads of each block stay
        assert pruned.blocks[b].attn.num_heads == 2
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        torch.testing.assert_close(pruned.blocks[b].attn.proj.weight, w0[b][:, cols])
    pruned(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("prune,expect", [
    ("{methods: [magnitude, obs], attention: {heads: 0.5}}", "prune.attention: criterion 'obs' cannot score"),
    ("{methods: [magnitude], attention: {heads: 1.0}}", "prune.attention.heads"),
    ("{methods: [magnitude], attention: {heads: 0.5, ffn: 0.1}}", "prune.attention"),
])
def test_recipe_refuses_bad_attention_settings(refused_recipe, monkeypatch, prune, expect):
    monkeypatch.delitem(HEAD_CRITERIA._entries, "obs")  # a criterion without head scores
    line = refused_recipe(f"version: 1\nmodel: {{name: builtin:shapes-vit}}\ndata: {{kind: shapes}}\nprune: {prune}\n")
    assert expect in line


def test_head_paths_and_masks_round_trip(tmp_path, model):
    from jas_prune.aggregate import MaskAccumulator, load_masks, save_masks
    from jas_prune.attribution import locate
    from jas_prune.pathstore import PathStore

    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 2])
    r = locate(model, x, y, steps=2, units=["ffn", "heads"], scope="all", formula="ig")
    store = PathStore(tmp_path / "paths", chunk_size=4)
    store.write_chunk(0, store.chunk_tensors(range(4), y, {"jas": r}), {"ids": list("abcd"), "layers": r.layers})
    got = store.read(4)
    assert torch.equal(got.head_paths["jas"], r.head_paths) and torch.equal(got.paths["jas"], r.paths)
    torch.testing.assert_close(got.head_scores["jas"], torch.stack(r.head_scores, 1), rtol=1e-3, atol=1e-6)
    masks = MaskAccumulator(3, 2, 32)
    masks.add(got.paths["jas"], got.scores["jas"], y)
    m = masks.finish(topk=2, layers=[0, 1], class_names=["a", "b", "c"])
    heads = MaskAccumulator(3, 2, H)
    heads.add(got.head_paths["jas"], got.head_scores["jas"], y)
    m.heads = heads.finish(topk=1, layers=[0, 1], class_names=["a", "b", "c"])
    back = load_masks(save_masks(m, tmp_path / "masks.safetensors"))
    assert torch.equal(back.heads.topk, m.heads.topk) and torch.equal(back.topk, m.topk)
    assert back.heads.topk.shape == (3, 2, H) and int(back.heads.topk[1].sum()) == 2


def test_protected_heads_stay_and_too_many_are_refused(model):
    from jas_prune.errors import BudgetError

    scores = HeadScores({0: torch.tensor([1.0, 2.0, 3.0, 4.0])}, {0: torch.ones(D // H)}, protect={0: [0]})
    pruned = copy.deepcopy(model)
    s = prune_attention(pruned, scores, heads=0.5)
    assert s.kept_heads[0] == [0, 3] and pruned.blocks[0].attn.num_heads == 2 and pruned.blocks[1].attn.num_heads == H
    scores.protect = {0: [0, 1, 2]}
    with pytest.raises(BudgetError, match="block 0 keeps 2 of 4 heads but the class head masks protect 3"):
        prune_attention(copy.deepcopy(model), scores, heads=0.5)


def test_hessian_head_scores_equal_per_image_brute_force(model, batch):
    """½·E[(∂L_b/∂α)²] with α scaling one head (or one dimension of every head), each image's
    derivative by its own backward pass through an explicit scale."""
    x, y = batch
    s = head_scores("hessian", ScoringInputs(model=model, loader=[batch]))
    d = D // H
    for b in (0, 1):
        proj = model.blocks[b].attn.proj
        ref_h, ref_d = torch.zeros(H), torch.zeros(d)
        for n in range(len(y)):
            for unit, ref in [(("h", i), ref_h) for i in range(H)] + [(("d", j), ref_d) for j in range(d)]:
                alpha = torch.ones((), requires_grad=True)
                mask = torch.zeros(H, d)
                if unit[0] == "h":
                    mask[unit[1]] = 1
                else:
                    mask[:, unit[1]] = 1
                hk = proj.register_forward_pre_hook(
                    lambda _m, a: (a[0] * (1 + (alpha - 1) * mask.flatten()),))
                try:
                    loss = torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
                    (g,) = torch.autograd.grad(loss, alpha)
                finally:
                    hk.remove()
                ref[unit[1]] += 0.5 * g.detach() ** 2 / len(y)
        torch.testing.assert_close(s.heads[b], ref_h, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(s.dims[b], ref_d, rtol=1e-4, atol=1e-8)


def test_vit_slim_head_masks_follow_the_l1_penalty(model, batch):
    """With λ = 0 and lr tiny the masks stay ≈ 1; a strong L1 penalty shrinks every mask, and the
    masks learned are the criterion's scores (one per head, one per dimension)."""
    loose = head_scores("vit_slim", ScoringInputs(model=model, loader=[batch],
                                                 options={"lambda": 0.0, "epochs": 2, "lr": 1e-6}))
    tight = head_scores("vit_slim", ScoringInputs(model=model, loader=[batch],
                                                 options={"lambda": 100.0, "epochs": 5, "lr": 0.05}))
    for b in (0, 1):
        torch.testing.assert_close(loose.heads[b], torch.ones(H), rtol=0, atol=1e-4)
        assert (tight.heads[b] < 0.9).all() and (tight.dims[b] < 0.9).all()
        assert tight.heads[b].shape == (H,) and tight.dims[b].shape == (D // H,)


def test_settings_resolve_refuses_attention_the_model_cannot_take():
    """Checked with the other settings, before any work: qk_norm with head_dims (one line)."""
    from types import SimpleNamespace

    from jas_prune.pruning.settings import PruneSettings

    m = random_vit(depth=1, embed_dim=16, num_heads=2, img_size=16, patch_size=8, num_classes=3)
    settings = PruneSettings(methods=["magnitude"], ratios=[0.5], attention={"head_dims": 0.5})
    source = SimpleNamespace(class_names=["a", "b", "c"], num_classes=3)
    assert settings.resolve(m, source, seed=0).settings.attention.head_dims == 0.5
    qk = random_vit(depth=1, embed_dim=16, num_heads=2, img_size=16, patch_size=8, num_classes=3)
    qk.blocks[0].attn.q_norm = torch.nn.LayerNorm(8)
    with pytest.raises(UnsupportedModelError, match=r"^prune.attention.head_dims: block 0 normalises queries and keys"):
        settings.resolve(qk, source, seed=0)
