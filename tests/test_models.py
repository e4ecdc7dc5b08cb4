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
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), "not a timm VisionTransformer"),
    (lambda: __import__("timm").create_model("resnet18", pretrained=False, num_classes=4), "not a timm VisionTransformer"),
])
def test_discover_ffn_refuses_non_vit(builder, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        discover_ffn(builder())


def test_discover_ffn_refuses_swiglu_and_distilled():
    import timm

    swiglu = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                               depth=1, num_heads=2, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    with pytest.raises(UnsupportedModelError, match="block 0 FFN is"):
        discover_ffn(swiglu)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="distillation token"):
        discover_ffn(deit)


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
