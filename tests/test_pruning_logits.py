"""Query/key logit compensation (``prune.attention.logits``): exact when the pruned key channels
are affine in the kept ones, never raises what it minimises, the identity with nothing pruned,
ONNX parity, and settings/family refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from jas_prune.errors import UnsupportedModelError
from jas_prune.pruning.attention import AttentionSettings, HeadScores, prune_attention
from jas_prune.pruning.logits import fit_query_delta, qk_access
from jas_prune.pruning.reconstruct import reconstruct
from jas_prune.testing import random_vit

from families import FAMILIES, family_images, models  # noqa: F401 - the fixture

H, D = 4, 16
d = D // H


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=2, embed_dim=D, num_heads=H, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=2)


@pytest.fixture(scope="module")
def access(model):
    return qk_access(model)


def images(seed: int, n: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def attn_input(model, x) -> torch.Tensor:
    got = {}
    h = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0]))
    try:
        with torch.no_grad():
            model(x.to(model.blocks[0].attn.qkv.weight.dtype))
    finally:
        h.remove()
    return got["a"]


def probs(attn, a) -> torch.Tensor:
    """The attention map ``softmax(scale · q kᵀ)`` of every head, from the module's own weights."""
    B, T, _ = a.shape
    qkv = attn.qkv(a).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return torch.softmax(attn.scale * qkv[0] @ qkv[1].transpose(-2, -1), -1)


def dims_scores(model, keep) -> HeadScores:
    """Scores keeping dimensions ``keep`` of every head."""
    s = torch.zeros(d)
    s[keep] = 1.0
    return HeadScores({b: torch.ones(H) for b in range(len(model.blocks))}, {b: s for b in range(len(model.blocks))})


@pytest.mark.parametrize("candidate", ["affine", "centered"])
def test_exact_when_pruned_keys_are_affine_in_kept_ones(model, access, candidate):
    dense = copy.deepcopy(model).double()
    S, P = [0, 2], [1, 3]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # k_P = M k_S (+ c for 'affine': a per-query constant of the logits)
        w = dense.blocks[0].attn.qkv.weight.view(3, H, d, D)
        b = dense.blocks[0].attn.qkv.bias.view(3, H, d)
        for h in range(H):
            M = torch.randn(len(P), len(S), generator=g, dtype=torch.float64)
            w[1, h, P] = M @ w[1, h, S]
            b[1, h, P] = M @ b[1, h, S] + (torch.randn(len(P), generator=g, dtype=torch.float64)
                                           if candidate == "affine" else 0.0)
    pruned = copy.deepcopy(dense)
    prune_attention(pruned, dims_scores(dense, S), head_dims=0.5, example_inputs=images(0, 2).double())
    attn, attn_d = pruned.blocks[0].attn, dense.blocks[0].attn
    a_fit, a_new = attn_input(dense, images(0)), attn_input(dense, images(1))
    assert not torch.allclose(probs(attn, a_new), probs(attn_d, a_new), atol=1e-3)  # pruning changed them
    delta = fit_query_delta(access, attn, attn_d, [a_fit], candidate=candidate, damping=0.0)
    assert delta.residual <= 1e-10 * delta.energy and delta.energy > 1e-3
    delta.apply(attn)
    torch.testing.assert_close(probs(attn, a_new), probs(attn_d, a_new), rtol=1e-9, atol=1e-10)


def test_never_raises_its_objectives(model):
    pruned = copy.deepcopy(model)
    prune_attention(pruned, dims_scores(model, [0, 1]), heads=0.25, head_dims=0.5)
    x = images(2, 32)
    rep = reconstruct(pruned, model, [x], method="lsq", target="local", damping=1e-3, logits="affine")
    assert [r.block for r in rep.logits] == [0, 1] == [r.block for r in rep.attention]
    for lg, at in zip(rep.logits, rep.attention):
        assert lg.key_residual <= lg.key_energy  # the key regression (what it fits)
        assert at.error_after == pytest.approx(min(lg.error_with, lg.error_without), rel=1e-9)  # keep-if-better
        assert lg.kept == (lg.error_with < lg.error_without)
    none = copy.deepcopy(model)
    prune_attention(none, dims_scores(model, [0, 1]), heads=0.25, head_dims=0.5)
    rep0 = reconstruct(none, model, [x], method="lsq", target="local", damping=1e-3)
    assert rep.attention[0].error_after <= rep0.attention[0].error_after + 1e-12  # same block-0 inputs
    assert "logits" in rep.to_dict() and rep.to_dict()["logits"][0]["candidate"] == "affine"


def test_identity_without_pruned_channels(model, access):
    attn = model.blocks[0].attn
    assert fit_query_delta(access, attn, attn, [attn_input(model, images(3))], candidate="affine", damping=1e-3) is None
    heads_only = copy.deepcopy(model)
    prune_attention(heads_only, dims_scores(model, [0, 1]), heads=0.5)
    with_logits, without = copy.deepcopy(heads_only), copy.deepcopy(heads_only)
    rep = reconstruct(with_logits, model, [images(4)], method="lsq", logits="centered")
    reconstruct(without, model, [images(4)], method="lsq")
    assert rep.logits == []
    for p, q in zip(with_logits.state_dict().values(), without.state_dict().values()):
        assert torch.equal(p, q)


def test_onnx_parity_after_compensation(model, access, tmp_path):
    pytest.importorskip("onnxruntime")
    from jas_prune.deploy.onnx_export import export_onnx
    from jas_prune.deploy.verify import verify_onnx

    pruned = copy.deepcopy(model)
    prune_attention(pruned, dims_scores(model, [1, 2]), head_dims=0.5)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    rep = reconstruct(pruned, model, [images(6, 32)], method="lsq", logits="affine")
    if not any(r.kept for r in rep.logits):  # make sure the exported model carries a compensation
        delta = fit_query_delta(access, pruned.blocks[0].attn, model.blocks[0].attn, [attn_input(model, images(6))],
                                candidate="affine", damping=1e-3)
        delta.apply(pruned.blocks[0].attn)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], pruned.state_dict()["blocks.0.attn.qkv.weight"]) or \
        not torch.equal(before["blocks.1.attn.qkv.weight"], pruned.state_dict()["blocks.1.attn.qkv.weight"])
    export_onnx(pruned, tmp_path / "p.onnx")
    res = verify_onnx(tmp_path / "p.onnx", pruned, images(7, 4), providers=["cpu"], atol=1e-4)
    assert res["passed"] and res["parity_max_abs"] <= 1e-4


def test_settings_and_family_refused():
    with pytest.raises(ValueError, match="logits: 'affine' compensates removed query/key channels"):
        AttentionSettings(heads=0.5, logits="affine")
    with pytest.raises(ValueError, match="'none', 'affine' or 'centered'"):
        AttentionSettings(head_dims=0.5, logits="corp")
    assert AttentionSettings(head_dims=0.5).identity() == {"heads": 0.0, "head_dims": 0.5}


def test_recipe_refuses_logits_without_head_dims(refused_recipe):
    line = refused_recipe("version: 1\nmodel: {name: builtin:shapes-vit}\ndata: {kind: shapes}\n"
                          "prune: {methods: [magnitude], attention: {heads: 0.5, logits: affine}}\n")
    assert "prune.attention" in line and "head_dims" in line


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("fam", [f for f in FAMILIES if not f.key.startswith("eva")], ids=lambda f: f.key)
def test_every_family_recovers_affine_keys_exactly(models, fam):
    """Per family, through its attention layout: with the removed key channels affine in the kept
    ones, the pruned and compensated attention equals the dense attention with only the removed
    value channels zeroed (its logits are the dense ones)."""
    from jas_prune.models.heads import attention_of

    def attentions(model):
        return [attention_of(m)[0] for m in model.modules() if attention_of(m) is not None]

    dense = models(fam).double()
    access = qk_access(dense)
    attn_d = attentions(dense)[0]
    H, d = access.key(attn_d)[0].shape[:2]
    S, P = list(range(0, d, 2)), list(range(1, d, 2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for attn in attentions(dense):
            w, b = access._rows(attn, "k")
            for h in range(H):
                M = torch.randn(len(P), len(S), generator=g, dtype=torch.float64)
                w[h, P] = M @ w[h, S]
                if b is not None:
                    b[h, P] = M @ b[h, S]
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for attn in attentions(masked):
            w, b = access._rows(attn, "v")
            w[:, P] = 0
            if b is not None:
                b[:, P] = 0
    pruned = copy.deepcopy(dense)
    x = family_images(dense, 6, torch.float64)
    L = len(attentions(dense))
    prune_attention(pruned, HeadScores({i: torch.ones(H) for i in range(L)},
                                       {i: torch.tensor([1.0 if j in S else 0.0 for j in range(d)]) for i in range(L)}),
                    head_dims=0.5, example_inputs=x[:2])
    got = {}

    def capture(key):
        return lambda _m, a, k: got.__setitem__(key, (a, k))

    attn_p, attn_m = attentions(pruned)[0], attentions(masked)[0]
    hk = attn_p.register_forward_pre_hook(capture("p"), with_kwargs=True)
    try:
        with torch.no_grad():
            pruned(x)
    finally:
        hk.remove()
    a, k = got["p"]
    inp = a[0] if a else k["hidden_states"]
    delta = fit_query_delta(access, attn_p, attn_d, [inp], candidate="affine", damping=0.0)
    with torch.no_grad():
        before = _first(attn_p(*a, **k))
        delta.apply(attn_p)
        after, want = _first(attn_p(*a, **k)), _first(attn_m(*a, **k))
    assert (before - want).abs().max() > 1e-6
    torch.testing.assert_close(after, want, rtol=1e-8, atol=1e-9)


def test_rotary_attention_refused(models):
    eva = next(f for f in FAMILIES if f.key == "eva02")
    with pytest.raises(UnsupportedModelError, match=r"^prune.attention.logits: block 0 rotates queries and keys"):
        qk_access(models(eva))
