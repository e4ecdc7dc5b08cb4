"""Tests of the FFN-hidden hook primitives (capture, activation_stats, edit)."""

from __future__ import annotations

import pytest
import torch

from jas_prune.testing import random_vit
from jas_prune.errors import JasPruneError
from jas_prune.neurons import activation_stats, capture, edit, hook_hidden, resolve_layers
from jas_prune.models import discover_ffn


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=3, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=2, dtype=torch.float64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _manual_hiddens(model, x):
    """FFN hiddens recomputed by hand, block by block (no hooks)."""
    out = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            hid = blk.mlp.act(blk.mlp.fc1(blk.norm2(h)))
            out.append(hid)
            h = h + blk.ls2(blk.mlp.fc2(hid))
    return out


def test_capture_matches_manual_forward(model, images):
    hiddens, logits = capture(model, images)
    manual = _manual_hiddens(model, images)
    assert len(hiddens) == 3
    for h, m in zip(hiddens, manual):
        assert h.shape == (5, 5, 32)
        torch.testing.assert_close(h, m)
    torch.testing.assert_close(logits, model(images).detach())
    sub, _ = capture(model, images, layers=[2, 0])
    torch.testing.assert_close(sub[0], manual[0])
    torch.testing.assert_close(sub[1], manual[2])
    assert len(capture(model, images, layers=2)[0]) == 2
    assert _hooks(model) == 0


@pytest.mark.parametrize("scope", ["all", "cls"])
def test_activation_stats_streaming_equals_full(model, images, scope):
    loader = [(images[:2], torch.zeros(2)), (images[2:3], torch.zeros(1), "extra"), (images[3:], torch.zeros(2))]
    stats = activation_stats(model, loader, "cpu", scope=scope)
    hiddens, _ = capture(model, images)
    assert sorted(stats) == [0, 1, 2]
    for l, h in enumerate(hiddens):
        flat = (h[:, 0] if scope == "cls" else h).reshape(-1, h.shape[-1])
        torch.testing.assert_close(stats[l]["mean"], flat.mean(0).float())
        torch.testing.assert_close(stats[l]["mean_abs"], flat.abs().mean(0).float())
        torch.testing.assert_close(stats[l]["var"], flat.var(0, unbiased=False).float())
        assert stats[l]["count"] == flat.shape[0]
    assert _hooks(model) == 0


def test_activation_stats_empty_loader(model):
    with pytest.raises(ValueError, match="no images"):
        activation_stats(model, [], "cpu")


def test_edit_cls_only_touches_class_token(model, images):
    n = 32
    mult = torch.ones(5, n, dtype=torch.float64)
    mult[0, 3] = 0.0
    mult[1, :5] = 2.0
    clean, logits = capture(model, images)
    with edit(model, {0: mult}, scope="cls"):
        edited, logits_e = capture(model, images)
    want = clean[0].clone()
    want[:, 0] *= mult
    torch.testing.assert_close(edited[0], want)
    # images with multiplier 1 everywhere are unchanged downstream
    torch.testing.assert_close(logits_e[2:], logits[2:])
    assert not torch.allclose(logits_e[:2], logits[:2])
    assert _hooks(model) == 0


def test_edit_all_scope_and_broadcasting(model, images):
    clean, logits = capture(model, images)
    with edit(model, {1: torch.zeros(32, dtype=torch.float64), 2: 2.0}, scope="all"):
        edited, _ = capture(model, images)
    assert edited[1].abs().max() == 0
    with edit(model, {2: 1.0}, scope="all"):
        _, same = capture(model, images)
    torch.testing.assert_close(same, logits)
    with pytest.raises(ValueError, match="does not broadcast"):
        with edit(model, {0: torch.ones(3, 32)}, scope="all"):
            capture(model, images)
    assert _hooks(model) == 0


def test_edit_removes_hooks_on_exception(model, images):
    with pytest.raises(RuntimeError, match="inside"):
        with edit(model, {0: 0.0}, scope="cls"):
            raise RuntimeError("inside")
    assert _hooks(model) == 0


def test_hook_hidden_replacement_and_scope_errors(model, images):
    with hook_hidden(model, {1: lambda h: torch.zeros_like(h)}):
        hid, _ = capture(model, images, layers=[1])
    assert hid[0].abs().max() == 0
    import timm

    no_cls = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2,
                               num_heads=2, num_classes=3, class_token=False, global_pool="avg").eval()
    with pytest.raises(JasPruneError, match="class token"):
        with edit(no_cls, {0: 0.0}, scope="cls"):
            pass
    info = discover_ffn(model)
    with pytest.raises(JasPruneError, match="out of range"):
        resolve_layers(info, [7])


# -- write_scope: in place only where autograd allows it -------------------------------------------


def _site(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A site output of each kind whose grad_fn jas-prune may meet."""
    w = torch.linspace(-1, 1, x.shape[-1] * x.shape[-1], dtype=x.dtype).reshape(x.shape[-1], -1)
    if kind == "gelu":
        return torch.nn.functional.gelu(x @ w)
    if kind == "silu":
        return torch.nn.functional.silu(x @ w)
    if kind == "gated":  # act(fc1_g x) * fc1_x x, then an eval-mode dropout (returns its input)
        return torch.nn.Dropout(0.1).eval()(torch.nn.functional.silu(x @ w) * (x @ w.T))
    if kind == "layernorm":
        return torch.nn.functional.layer_norm(torch.nn.functional.silu(x @ w), (x.shape[-1],))
    return torch.relu(x @ w)


@pytest.mark.parametrize("kind,inplace", [("gelu", True), ("silu", True), ("gated", True), ("layernorm", True),
                                          ("relu", False)])
def test_write_scope_cls_in_place_only_where_gradients_stay_right(kind, inplace):
    from jas_prune.neurons import write_scope

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)

    def run(copy_first: bool):
        x = x0.clone().requires_grad_(True)
        alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        h = _site(kind, x)
        if copy_first:
            h = h.clone()  # a fresh node: the in-place write can never touch a saved tensor
        out = write_scope(h, alpha * h[:, 0].detach().clone() * 2.0, "cls")
        loss = (out.tanh() * torch.arange(6, dtype=x.dtype)).sum()
        return out is h, torch.autograd.grad(loss, (x, alpha))

    same, grads = run(False)
    _, ref = run(True)
    assert same is inplace
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
