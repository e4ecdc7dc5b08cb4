import numpy as np
import pytest
import torch

from jas_prune import load_model
from jas_prune.errors import CheckpointError, PretrainedUnavailableError, UnsupportedModelError
from jas_prune.models import discover_ffn


def test_discover_ffn_on_tiny_vit(tiny_vit):
    m = tiny_vit(depth=3)
    info = discover_ffn(m)
    assert info.depth == 3
    assert info.widths == [64, 64, 64]
    assert info.has_cls_token and info.num_prefix_tokens == 1
    for i, layer in enumerate(info.layers):
        assert layer.fc1 is m.blocks[i].mlp.fc1 and layer.fc2 is m.blocks[i].mlp.fc2
        assert layer.act is m.blocks[i].mlp.act


def test_discover_ffn_without_class_token(tiny_vit):
    m = tiny_vit(class_token=False, global_pool="avg")
    info = discover_ffn(m)
    assert not info.has_cls_token and info.num_prefix_tokens == 0


@pytest.mark.parametrize("builder, needle", [
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)),
     r"model 'Sequential' \(Sequential\) is not a timm VisionTransformer; jas-prune supports timm VisionTransformer, "
     "timm Eva, timm Beit, timm VisionTransformerRelPos or Hugging Face ViT/DeiT models"),
    (lambda: __import__("timm").create_model("resnet18", pretrained=False, num_classes=4),
     r"model 'resnet18' \(ResNet\) is not a timm VisionTransformer"),
])
def test_discover_ffn_refuses_non_vit(builder, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        discover_ffn(builder())


def test_discover_ffn_gated_kinds_and_refusals():
    import timm

    def vit(**kw):
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw})

    packed = vit(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    layer = discover_ffn(packed).layers[0]
    assert layer.kind == "gated_fused" and layer.act is packed.blocks[0].mlp.drop1 and layer.hidden == 64
    split = vit(mlp_layer=timm.layers.SwiGLU)
    layer = discover_ffn(split).layers[0]
    mlp = split.blocks[0].mlp
    assert layer.kind == "gated" and layer.inputs == (mlp.fc1_g, mlp.fc1_x) and layer.gate is mlp.fc1_g
    assert layer.act is mlp.drop1 and layer.norm is None
    normed = vit(scale_mlp_norm=True)
    layer = discover_ffn(normed).layers[0]
    assert layer.kind == "mlp" and layer.act is normed.blocks[0].mlp.norm is layer.norm
    with pytest.raises(UnsupportedModelError, match="block 0 FFN is timm.layers.mlp.GatedMlp, not timm Mlp"):
        discover_ffn(vit(mlp_layer=timm.layers.GatedMlp))
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="distillation token"):
        discover_ffn(deit)
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(UnsupportedModelError, match="block 0 is a ParallelScalingBlock without an mlp"):
        discover_ffn(vit(block_fn=ParallelScalingBlock))
    shared = vit(depth=2)
    shared.blocks[1].mlp.act = shared.blocks[0].mlp.act
    with pytest.raises(UnsupportedModelError, match="blocks 0 and 1 share one FFN activation module"):
        discover_ffn(shared)


@pytest.mark.parametrize("gate_last", [False, True])
def test_split_fused_glu_keeps_the_outputs(gate_last):
    from functools import partial

    import timm

    from jas_prune.models import split_fused_glu

    torch.manual_seed(0)
    glu = partial(timm.layers.GluMlp, act_layer=torch.nn.SiLU, gate_last=gate_last)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          depth=2, num_heads=2, mlp_layer=glu, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        fused = m.blocks[0].mlp.fc1.weight.clone()
        assert split_fused_glu(m) == 2 and split_fused_glu(m) == 0
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)
    mlp = m.blocks[0].mlp
    n = fused.shape[0] // 2
    gate, value = (fused[n:], fused[:n]) if gate_last else (fused[:n], fused[n:])
    assert torch.equal(mlp.fc1_g.weight, gate) and torch.equal(mlp.fc1_x.weight, value)
    assert m.jas_transforms == ["split_fused_glu"] and mlp.jas_fused_gate_last is gate_last


def test_load_model_splits_fused_glu_and_reads_eva_weights(tmp_path):
    """eva02 tiny packs its SwiGLU into one fc1: loaded, it is split (same outputs), and its
    weights in timm layout load through the model module's own filter."""
    from safetensors.torch import save_file

    from jas_prune.models import create_model, load_model

    kw = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, ref_feat_shape=(2, 2), num_classes=3)
    torch.manual_seed(0)
    fused = create_model("eva02_tiny_patch14_224", **kw).eval()
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    import jas_prune.models.loading as loading

    orig = loading.create_model
    loading.create_model = lambda name, num_classes=None: orig(name, num_classes=num_classes,
                                                               **{k: v for k, v in kw.items() if k != "num_classes"})
    try:
        model = load_model("eva02_tiny_patch14_224", checkpoint=tmp_path / "eva.safetensors")
    finally:
        loading.create_model = orig
    assert discover_ffn(model).kinds == ["gated", "gated"]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x), rtol=1e-5, atol=1e-6)


def test_input_size_per_family():
    from jas_prune.models import create_model, input_size

    assert input_size(create_model("eva02_tiny_patch14_224", img_size=28, patch_size=14, embed_dim=32, depth=1,
                                   num_heads=2, ref_feat_shape=(2, 2))) == (3, 28, 28)
    assert input_size(create_model("beit_base_patch16_224", img_size=48, patch_size=16, embed_dim=32, depth=1,
                                   num_heads=2)) == (3, 48, 48)


def _roundtrip(tmp_path, tiny_builtin, suffix, wrap=None):
    from safetensors.torch import save_file

    model = tiny_builtin
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, str(path))
    loaded = load_model("builtin:shapes-vit", checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


@pytest.mark.parametrize("suffix, wrap", [(".safetensors", None), (".pth", None), (".pt", "state_dict"),
                                          (".pth", "model")])
def test_checkpoint_formats_roundtrip(tmp_path, tiny_builtin, suffix, wrap):
    _roundtrip(tmp_path, tiny_builtin, suffix, wrap)


def test_npz_big_vision_roundtrip(tmp_path, tiny_builtin):
    """Write the model in big_vision layout (as the paper's released code reads it) and load it."""
    m = tiny_builtin
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    z = {"cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    d, h = 32, 2
    for i in range(len(m.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        z[p + "LayerNorm_0/scale"], z[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        z[p + "LayerNorm_2/scale"], z[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w = qkv_w[j * d:(j + 1) * d]  # [out, in]
            z[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w.T.reshape(d, h, d // h)
            z[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        z[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        z[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            z[p + f"MlpBlock_3/Dense_{j}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            z[p + f"MlpBlock_3/Dense_{j}/bias"] = sd[b + f"mlp.{fc}.bias"]
    path = tmp_path / "vit.npz"
    np.savez(path, **z)
    loaded = load_model("builtin:shapes-vit", checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=1e-5, atol=1e-5)


def test_num_classes_inferred_from_checkpoint(tmp_path, tiny_builtin):
    from safetensors.torch import save_file

    from jas_prune.models import create_model

    m = create_model("builtin:shapes-vit", num_classes=7)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "c7.safetensors"))
    assert load_model("builtin:shapes-vit", checkpoint=tmp_path / "c7.safetensors").num_classes == 7


def test_bad_checkpoints(tmp_path, tiny_builtin):
    with pytest.raises(CheckpointError, match="file not found"):
        load_model("builtin:shapes-vit", checkpoint=tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model("builtin:shapes-vit", checkpoint=corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model("builtin:shapes-vit", checkpoint=wrong)


def test_pretrained_without_cache_says_how_to_pass_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(PretrainedUnavailableError, match="model.checkpoint"):
        load_model("vit_tiny_patch16_224", pretrained=True)


def test_unknown_names():
    with pytest.raises(UnsupportedModelError, match="unknown built-in"):
        load_model("builtin:nope")
    with pytest.raises(UnsupportedModelError, match="model.name"):
        load_model("not_a_timm_model_xyz")
