"""Closed-form FFN reconstruction (jas_prune.pruning.reconstruct) against brute-force references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch_pruning as tp

from jas_prune import JASImportance, load_pruned, save_pruned
from jas_prune.errors import InvalidArgumentError
from jas_prune.models import discover_ffn
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.reconstruct import LinearFit, SequentialReconstructor, reconstruct
from jas_prune.pruning.stats import ffn_activation_stats

EX = torch.zeros(1, 3, 32, 32)


@pytest.fixture
def dense(tiny_vit):
    return tiny_vit(num_classes=6, depth=3)


@pytest.fixture
def images():
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _loader(x, bs=8):
    return [(x[i:i + bs], torch.zeros(len(x[i:i + bs]), dtype=torch.long)) for i in range(0, len(x), bs)]


def _pruned(dense, ratio=0.5, seed=0):
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed)
    prune_ffn(model, {l.index: torch.rand(l.hidden, generator=gen) for l in discover_ffn(model).layers},
              ratio=ratio, example_inputs=EX)
    return model


@torch.no_grad()
def _tokens(pruned, dense, x, block, target):
    """All calibration tokens of one block at once: pruned hidden h and the target y."""
    lp, ld = discover_ffn(pruned).layers[block], discover_ffn(dense).layers[block]
    got = {}
    hs = [lp.fc2.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0])),
          lp.block.mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("u", a[0])),
          lp.block.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("mlp", o)),
          lp.block.register_forward_hook(lambda m, a, o: got.__setitem__("out", o)),
          ld.fc2.register_forward_hook(lambda m, a, o: got.__setitem__("yd", o)),
          ld.block.register_forward_hook(lambda m, a, o: got.__setitem__("out_d", o))]
    pruned(x)
    dense(x)
    for h in hs:
        h.remove()
    if target == "local":
        y = ld.block.mlp(got["u"])
    elif target == "global":
        y = got["yd"]
    else:  # the dense block output minus the pruned block's stream after attention, per LayerScale
        gamma = getattr(lp.block.ls2, "gamma", torch.ones(()))
        y = (got["out_d"] - (got["out"] - lp.block.ls2(got["mlp"]))) / gamma
    return got["h"].reshape(-1, lp.hidden).double(), y.reshape(-1, y.shape[-1]).double()


def _brute_ridge(h, y, damping):
    """lstsq on [h, 1] with sqrt(n·λ·mean var) · I rows appended (intercept not damped)."""
    n, k = h.shape
    scale = h.var(0, unbiased=False).mean()
    a = torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1)
    b = y
    if damping > 0:
        reg = torch.cat([torch.eye(k, dtype=h.dtype) * (n * damping * scale).sqrt(),
                         torch.zeros(k, 1, dtype=h.dtype)], 1)
        a, b = torch.cat([a, reg]), torch.cat([y, torch.zeros(k, y.shape[1], dtype=h.dtype)])
    sol = torch.linalg.lstsq(a, b).solution
    return sol[:k].T, sol[k]


@pytest.mark.parametrize("target", ["local", "global", "residual"])
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_lsq_equals_brute_force_solve_in_every_block(tiny_vit, images, target, damping):
    # residual runs on a model with LayerScale, whose scale the target divides out
    dense = tiny_vit(num_classes=6, depth=3, **({"init_values": 0.3} if target == "residual" else {}))
    pruned = _pruned(dense)
    rep = reconstruct(pruned, dense, _loader(images), target=target, damping=damping)
    assert [b.block for b in rep.blocks] == [0, 1, 2] and all(b.refit for b in rep.blocks)
    for block in range(3):
        # the inputs of block l come from the network pruned and reconstructed so far; the hidden
        # of block l does not depend on its own fc2, so the final model gives them
        h, y = _tokens(pruned, dense, images, block, target)
        weight, bias = _brute_ridge(h, y, damping)
        fc2 = discover_ffn(pruned).layers[block].fc2
        torch.testing.assert_close(fc2.weight.double(), weight, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fc2.bias.double(), bias, atol=2e-5, rtol=1e-4)
        assert rep.blocks[block].tokens == len(images) * 17


def test_streaming_statistics_equal_all_at_once():
    gen = torch.Generator().manual_seed(0)
    h, y = torch.randn(300, 12, generator=gen).abs(), torch.randn(300, 5, generator=gen)
    whole, parts = LinearFit(12, 5), LinearFit(12, 5)
    whole.add(h, y)
    for i in range(0, 300, 37):
        parts.add(h[i:i + 37].reshape(-1, 1, 12), y[i:i + 37].reshape(-1, 1, 5))
    assert parts.count == whole.count == 300
    for a, b in zip(whole.solve(0.01), parts.solve(0.01)):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    w, b = torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    direct = ((h.double() @ w.double().T + b.double() - y.double()) ** 2).sum(1).mean()
    assert whole.error(w, b) == pytest.approx(float(direct), rel=1e-10)
    assert parts.error(w, b) == pytest.approx(float(direct), rel=1e-10)


@pytest.mark.parametrize("target", ["local", "residual"])
def test_batch_size_and_replay_do_not_change_the_result(dense, images, target):
    ref = _pruned(dense)
    reconstruct(ref, dense, _loader(images, 24), target=target)
    for bs, cache in ((5, None), (8, 0)):
        other = _pruned(dense)
        kw = {} if cache is None else {"cache_bytes": cache}
        rep = reconstruct(other, dense, _loader(images, bs), target=target, **kw)
        assert rep.cache == ("replay" if cache == 0 else "memory") and rep.images == 24
        for a, b in zip(ref.state_dict().values(), other.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["local", "residual"])
@pytest.mark.parametrize("method", ["bias", "lsq"])
def test_reconstruction_never_increases_a_blocks_calibration_error(dense, images, method, target):
    pruned = _pruned(dense, ratio=0.75)
    rep = reconstruct(pruned, dense, _loader(images), method=method, target=target)
    for row in rep.blocks:
        assert row.error_after < row.error_before
    # the reported errors are the real ones: recompute the last block's from all tokens
    h, y = _tokens(pruned, dense, images, 2, target)
    fc2 = discover_ffn(pruned).layers[2].fc2
    direct = ((h @ fc2.weight.detach().double().T + fc2.bias.detach().double() - y) ** 2).sum(1).mean()
    assert rep.blocks[2].error_after == pytest.approx(float(direct), rel=1e-6)
    # a damping so large that the refit would be worse: the block is left as it was
    kept = _pruned(dense, ratio=0.75)
    before = copy.deepcopy(kept.state_dict())
    rep = reconstruct(kept, dense, _loader(images), damping=1e9, blocks=[0])
    assert not rep.blocks[0].refit and rep.blocks[0].error_after == rep.blocks[0].error_before
    for k, v in kept.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bias_refit_of_the_first_block_is_todays_bias_compensation(dense, images):
    # block 0 sees the same input in both networks, so the mean shift is prune_ffn's compensation
    gen = torch.Generator().manual_seed(0)
    scores = {l.index: torch.rand(l.hidden, generator=gen) for l in discover_ffn(dense).layers}
    stats = ffn_activation_stats(dense, _loader(images))
    compensated = copy.deepcopy(dense)
    prune_ffn(compensated, scores, ratio=0.5, example_inputs=EX, bias_compensation=stats)
    refit = copy.deepcopy(dense)
    prune_ffn(refit, scores, ratio=0.5, example_inputs=EX)
    reconstruct(refit, dense, _loader(images), method="bias", blocks=[0])
    a, b = discover_ffn(compensated).layers[0].fc2, discover_ffn(refit).layers[0].fc2
    torch.testing.assert_close(a.bias, b.bias, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.weight, b.weight)


def test_none_changes_nothing_and_max_images_caps_the_calibration(dense, images):
    pruned = _pruned(dense)
    before = copy.deepcopy(pruned.state_dict())
    rep = reconstruct(pruned, dense, _loader(images), method="none")
    assert rep.blocks == [] and all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())
    rep = reconstruct(pruned, dense, _loader(images), max_images=11)
    assert rep.images == 11 and rep.tokens_per_image == 17
    assert all(b.tokens == 11 * 17 for b in rep.blocks)


def test_reconstructed_model_keeps_pruned_shapes_and_reloads(dense, images, tmp_path):
    pruned = _pruned(dense, ratio=0.75)
    widths = [l.hidden for l in discover_ffn(pruned).layers]
    reconstruct(pruned, dense, _loader(images))
    assert [l.hidden for l in discover_ffn(pruned).layers] == widths == [16, 16, 16]
    with torch.no_grad():
        out = pruned(images)
    for suffix in (".safetensors", ".pt"):
        path = save_pruned(pruned, tmp_path / f"rec{suffix}")
        back = load_pruned(path)
        assert [l.hidden for l in discover_ffn(back).layers] == widths
        with torch.no_grad():
            assert torch.equal(back(images), out)


def test_reconstructs_a_metapruner_model_without_kept_indices(dense, images):
    gen = torch.Generator().manual_seed(3)
    imp = JASImportance({l.index: torch.rand(l.hidden, generator=gen) for l in discover_ffn(dense).layers})
    pruned = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(pruned, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5).step()
    widths = [l.hidden for l in discover_ffn(pruned).layers]
    assert widths == [32, 32, 32]
    with torch.no_grad():
        err_before = (pruned(images) - dense(images)).pow(2).mean()
    rep = reconstruct(pruned, dense, _loader(images))
    with torch.no_grad():
        err_after = (pruned(images) - dense(images)).pow(2).mean()
    assert [b.block for b in rep.blocks] == [0, 1, 2]
    assert all(b.relative_after < 0.5 * b.relative_before for b in rep.blocks)
    assert err_after < 0.5 * err_before
    assert [l.hidden for l in discover_ffn(pruned).layers] == widths


def test_step_wise_pruning_between_steps(dense, images):
    # layer-progressive use: prune block l only after block l-1 is reconstructed
    model = copy.deepcopy(dense)
    engine = SequentialReconstructor(model, dense, _loader(images))
    gen = torch.Generator().manual_seed(0)
    for block in range(3):
        prune_ffn(model, {block: torch.rand(64, generator=gen)}, ratio=0.5, example_inputs=EX)
        row = engine.step(block)
        assert row.block == block and row.width == 32 and row.error_after < row.error_before
    with pytest.raises(InvalidArgumentError, match="^blocks: block 1 after block 2"):
        engine.step(1)


def test_bad_arguments_name_the_argument(dense, images, tiny_vit):
    pruned = _pruned(dense)
    loader = _loader(images)
    cases = [
        (dict(method="ridge"), "^method: 'ridge' is not one of none, bias, lsq"),
        (dict(target="dense"), "^target: 'dense' is not one of local, global, residual"),
        (dict(damping=-1.0), "^damping: expected a finite number >= 0"),
        (dict(damping=float("nan")), "^damping: "),
        (dict(damping=True), "^damping: "),
        (dict(max_images=0), "^max_images: expected an integer >= 1"),
        (dict(cache_bytes=-1), "^cache_bytes: expected an integer >= 0"),
        (dict(blocks=[3]), r"^blocks: 3 is not a block index 0\.\.2"),
        (dict(blocks="0"), "^blocks: expected a list of block indices"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            reconstruct(pruned, dense, loader, **kwargs)
    with pytest.raises(InvalidArgumentError, match="^dense: is the pruned model itself"):
        reconstruct(pruned, pruned, loader)
    with pytest.raises(InvalidArgumentError, match="^dense: has 2 blocks but the pruned model has 3"):
        reconstruct(pruned, tiny_vit(num_classes=6, depth=2), loader)
    with pytest.raises(InvalidArgumentError, match="^dense: block 0 has 32 FFN neurons, fewer than"):
        reconstruct(dense, pruned, loader)
    with pytest.raises(InvalidArgumentError, match="^loader: yielded no calibration images"):
        reconstruct(pruned, dense, [])
    with pytest.raises(InvalidArgumentError, match="^loader: expected an iterable"):
        reconstruct(pruned, dense, None)
    with pytest.raises(InvalidArgumentError, match="^pruned: expected a torch.nn.Module"):
        reconstruct("model", dense, loader)
    assert issubclass(InvalidArgumentError, ValueError)


# -- every supported family (the tiny models of tests/test_models_families.py) ---------------------------

from families import FAMILIES, IDS, family_halves, family_images  # noqa: E402

from jas_prune.errors import PruneSettingError  # noqa: E402

TARGETS = ("local", "global", "residual")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """One tiny dense model per family, built once; each call returns a copy."""
    cache: dict[str, torch.nn.Module] = {}
    tmp = tmp_path_factory.mktemp("hf-rec")

    def get(fam) -> torch.nn.Module:
        if fam.key not in cache:
            cache[fam.key] = fam.build(tmp=tmp)
        return copy.deepcopy(cache[fam.key])

    return get


def _pruned_half(dense, seed=0):
    model = copy.deepcopy(dense)
    prune_ffn(model, family_halves(model, seed)[0], ratio=0.5)
    return model


@torch.no_grad()
def _out_err(model, dense, x):
    return float((model(x) - dense(x)).pow(2).mean())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_every_family_and_target_lowers_block_and_output_errors(fam, target, family_models):
    dense = family_models(fam)
    x = family_images(dense, n=16, seed=2)
    model = _pruned_half(dense)
    before = _out_err(model, dense, x)
    rep = reconstruct(model, dense, [x], method="lsq", target=target)
    assert [b.block for b in rep.blocks] == [0, 1]
    for row in rep.blocks:
        assert row.error_after <= row.error_before
        assert row.refit and row.error_after < row.error_before, (row.block, row.error_before, row.error_after)
    assert _out_err(model, dense, x) < before
    if target == "residual":  # block 0 sees the dense input: its target is the dense FFN output
        local = reconstruct(_pruned_half(dense), dense, [x], target="local", blocks=[0]).blocks[0]
        assert rep.blocks[0].error_before == pytest.approx(local.error_before, rel=1e-6)


@torch.no_grad()
def _family_tokens(pruned, dense, x, block, target):
    """Hidden h and target y of one block, all calibration tokens at once, read with the test's own
    hooks. The residual target is found black-box for pre-norm blocks: the block output is affine
    in the FFN output f, ``out(f) = mid + γ ⊙ f``, so running the block with f replaced by 0 and by
    1 gives ``mid`` and ``γ`` (whatever the family calls its layer scale), and
    ``y = (out_d − mid) / γ``. Post-norm blocks (``out = u + LN(f)``): the block output pulled back
    through norm2 at the dense FFN output's per-token mean and scale."""
    lp, ld = discover_ffn(pruned).layers[block], discover_ffn(dense).layers[block]
    got = {}
    hooks = [lp.block.register_forward_pre_hook(lambda m, a, k: got.__setitem__("call", (a, k)), with_kwargs=True),
             lp.fc1.register_forward_pre_hook(lambda m, a: got.__setitem__("u", a[0])),
             lp.fc2.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0])),
             ld.fc2.register_forward_hook(lambda m, a, o: got.__setitem__("f_d", o.clone())),
             ld.block.register_forward_hook(lambda m, a, o: got.__setitem__("out_d", o))]
    try:
        pruned(x)
        dense(x)
    finally:
        for h in hooks:
            h.remove()
    u, f_d, out_d = got["u"], got["f_d"], got["out_d"]
    if target == "local":
        y = ld.ffn(u)
    elif target == "global":
        y = f_d
    elif lp.post_norm:
        norm = lp.block.norm2
        sigma = (f_d.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        y = sigma * (out_d - u - norm.bias) / norm.weight + f_d.mean(-1, keepdim=True)
    else:
        args, kwargs = got["call"]

        def out_with(value: float):
            h = lp.fc2.register_forward_hook(lambda m, a, o: torch.full_like(o, value))
            try:
                return lp.block(*args, **kwargs)
            finally:
                h.remove()

        mid = out_with(0.0)
        y = (out_d - mid) / (out_with(1.0) - mid)
    return got["h"].reshape(-1, lp.hidden).double(), y.reshape(-1, y.shape[-1]).double()


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_every_family_fits_the_brute_force_target(fam, family_models):
    """lsq on each family (float64) equals a ridge solve on targets read by the test's own hooks;
    for the residual target this checks Eva/BEiT γ₂, timm ls2 and the post-norm pull-back."""
    dense = family_models(fam).double()
    x = family_images(dense, n=8, dtype=torch.float64, seed=4)
    for target in TARGETS:
        pruned = _pruned_half(dense)
        rep = reconstruct(pruned, dense, [x], target=target, damping=1e-3)
        assert all(b.refit for b in rep.blocks), target
        for block in range(2):
            h, y = _family_tokens(pruned, dense, x, block, target)
            weight, bias = _brute_ridge(h, y, 1e-3)
            fc2 = discover_ffn(pruned).layers[block].fc2
            torch.testing.assert_close(fc2.weight, weight, atol=1e-8, rtol=1e-6, msg=f"{target} block {block}")
            torch.testing.assert_close(fc2.bias, bias, atol=1e-8, rtol=1e-6, msg=f"{target} block {block}")


def test_post_norm_that_cannot_be_inverted_is_refused_for_target_residual(family_models):
    fam = next(f for f in FAMILIES if f.key == "relpos-post")
    dense = family_models(fam)
    for blk in dense.blocks:  # an RMSNorm after the FFN: its output loses the scale, not the mean
        blk.norm2 = torch.nn.RMSNorm(blk.norm2.normalized_shape, eps=1e-6)
    x = family_images(dense, n=8, seed=2)
    pruned = _pruned_half(dense)
    before = copy.deepcopy(pruned.state_dict())
    with pytest.raises(PruneSettingError) as info:
        reconstruct(pruned, dense, [x], target="residual")
    assert str(info.value) == ("target: 'residual' cannot invert the post-norm of block 0 (x + norm(ffn(x))): "
                               "its norm2 is a RMSNorm, not a LayerNorm over the embedding; use target 'local' "
                               "or 'global'")
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # refused before any change
    for target in ("local", "global"):  # the FFN output itself is still a fine target
        rep = reconstruct(copy.deepcopy(pruned), dense, [x], target=target)
        assert all(b.refit and b.error_after < b.error_before for b in rep.blocks)


class _V4Intermediate(torch.nn.Module):
    def __init__(self, dense, act):
        super().__init__()
        self.dense, self.intermediate_act_fn = dense, act

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class _V4Output(torch.nn.Module):
    def __init__(self, dense):
        super().__init__()
        self.dense, self.dropout = dense, torch.nn.Dropout(0.0)

    def forward(self, x, input_tensor):
        return self.dropout(self.dense(x)) + input_tensor


class _V4Layer(torch.nn.Module):
    """transformers 4.56-4.57's ViTLayer layout (``intermediate``/``output``, the residual added
    inside ``ViTOutput``, no FFN module), on the modules of a transformers 5 layer."""

    def __init__(self, layer):
        super().__init__()
        self.attention, self.layernorm_before = layer.attention, layer.layernorm_before
        self.layernorm_after = layer.layernorm_after
        self.intermediate = _V4Intermediate(layer.mlp.fc1, layer.mlp.activation_fn)
        self.output = _V4Output(layer.mlp.fc2)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        mid = attn + hidden_states
        return self.output(self.intermediate(self.layernorm_after(mid)), mid)


def test_hf_layers_without_an_ffn_module_reconstruct_the_same(family_models):
    """transformers 4.56-4.57 layers reach the FFN only through FFNLayer.ffn (no ``mlp``): the
    refit equals the one on the transformers 5 layout of the same weights, for every target."""
    fam = next(f for f in FAMILIES if f.key == "hf-vit")
    dense = family_models(fam)
    layers = dense.model.vit.layers if hasattr(dense.model.vit, "layers") else None
    if layers is None or not hasattr(layers[0], "mlp"):
        pytest.skip("needs the transformers 5 layout to build the 4.x one from")
    x = family_images(dense, n=8, seed=2)

    def as_v4(model):
        model = copy.deepcopy(model)
        for i, layer in enumerate(model.model.vit.layers):
            model.model.vit.layers[i] = _V4Layer(layer)
        return model

    dense4 = as_v4(dense)
    assert all(l.mlp is None for l in discover_ffn(dense4).layers)
    with torch.no_grad():
        torch.testing.assert_close(dense4(x), dense(x), atol=0, rtol=0)
    for target in TARGETS:
        v5 = _pruned_half(dense)
        v4 = as_v4(v5)
        reconstruct(v5, dense, [x], target=target)
        rep = reconstruct(v4, dense4, [x], target=target)
        assert all(b.refit for b in rep.blocks)
        for a, b in zip(discover_ffn(v5).layers, discover_ffn(v4).layers):
            torch.testing.assert_close(b.fc2.weight, a.fc2.weight, atol=1e-6, rtol=1e-5, msg=target)
            torch.testing.assert_close(b.fc2.bias, a.fc2.bias, atol=1e-6, rtol=1e-5, msg=target)
