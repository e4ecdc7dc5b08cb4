"""The tiny random-init models of every supported family that several test modules share
(locating, pruning, heads, reconstruction), with their input images and test scores."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from jas_prune.models import discover_ffn, split_fused_glu

__all__ = ["Fam", "FAMILIES", "IDS", "models", "family_images", "family_halves"]


@dataclass(frozen=True)
class Fam:
    key: str
    label: str  # the docs/models.md row
    build: Callable[..., torch.nn.Module]
    kind: str  # FFN kind of its blocks
    has_cls: bool
    hf: bool = False


def _timm(name: str, **kw) -> Callable[..., torch.nn.Module]:
    def build(seed: int = 0, tmp=None) -> torch.nn.Module:
        from jas_prune.models import create_model

        torch.manual_seed(seed)
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        args.update(kw)
        model = create_model(name, num_classes=5, **args).eval()
        split_fused_glu(model)
        torch.nn.init.normal_(model.head.weight, std=0.5)  # EVA/BEiT heads start ~0: parity would say nothing
        return model

    return build


def _hf(kind: str) -> Callable[..., torch.nn.Module]:
    def build(seed: int = 0, tmp=None) -> torch.nn.Module:
        transformers = pytest.importorskip("transformers")
        from jas_prune.models import load_model

        torch.manual_seed(seed)
        cfg = getattr(transformers, f"{kind}Config")(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=5)
        hf = getattr(transformers, f"{kind}ForImageClassification")(cfg).eval()
        torch.nn.init.normal_(hf.classifier.weight, std=0.5)
        path = tmp / f"hf-{kind}-{seed}"
        hf.save_pretrained(path)
        return load_model(f"hf:{path}")

    return build


FAMILIES = [
    Fam("vit", "timm VisionTransformer (vit_*, deit_*, DeiT-3, CLIP/SigLIP towers)", _timm("vit_tiny_patch16_224"),
        "mlp", True),
    Fam("vit-swiglu", "timm VisionTransformer, SwiGLUPacked FFN + layer scale (DINOv2-giant-like)",
        _timm("vit_tiny_patch16_224", mlp_layer=__import__("timm").layers.SwiGLUPacked, act_layer="silu",
              init_values=0.5), "gated", True),
    Fam("eva02", "timm Eva, fused SwiGLU + RoPE (eva02_tiny/small-like)",
        _timm("eva02_tiny_patch14_224", img_size=28, patch_size=14, ref_feat_shape=(2, 2)), "gated", True),
    Fam("eva02-scale", "timm Eva, SwiGLU + hidden norm + RoPE + layer scale (eva02_base/large-like)",
        _timm("eva02_base_patch14_224", img_size=28, patch_size=14, ref_feat_shape=(2, 2), init_values=0.5),
        "gated", True),
    Fam("beit", "timm Beit (relative position bias, layer scale γ₂)",
        _timm("beit_base_patch16_224", init_values=0.5), "mlp", True),
    Fam("relpos", "timm VisionTransformerRelPos, no class token (vit_relpos_small)",
        _timm("vit_relpos_small_patch16_224", init_values=0.5), "mlp", False),
    Fam("relpos-cls", "timm VisionTransformerRelPos with class token (vit_relpos_medium_cls)",
        _timm("vit_relpos_medium_patch16_cls_224", init_values=0.5), "mlp", True),
    Fam("relpos-post", "timm VisionTransformerRelPos, residual post-norm blocks (vit_relpos_*_rpn)",
        _timm("vit_relpos_base_patch32_plus_rpn_256"), "mlp", False),
    Fam("hf-vit", "Hugging Face ViTForImageClassification (hf:DIR)", _hf("ViT"), "mlp", True, hf=True),
    Fam("hf-deit", "Hugging Face DeiTForImageClassification (hf:DIR)", _hf("DeiT"), "mlp", True, hf=True),
]
IDS = [f.key for f in FAMILIES]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Built once per family (float32), copied by the tests that change them."""
    cache: dict[str, torch.nn.Module] = {}
    tmp = tmp_path_factory.mktemp("hf")

    def get(fam: Fam) -> torch.nn.Module:
        if fam.key not in cache:
            cache[fam.key] = fam.build(tmp=tmp)
        return copy.deepcopy(cache[fam.key])

    return get


def family_images(model, n: int = 4, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    from jas_prune.models import input_size

    return torch.randn(n, *input_size(model), generator=torch.Generator().manual_seed(seed)).to(dtype)


def family_halves(model, seed: int = 0) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per block: scores that keep n - round(n/2) neurons under ratio 0.5, and the 0/1 keep mask."""
    g = torch.Generator().manual_seed(seed)
    scores, masks = {}, {}
    for layer in discover_ffn(model).layers:
        n = layer.hidden
        mask = torch.ones(n)
        mask[torch.randperm(n, generator=g)[:round(n * 0.5)]] = 0.0
        masks[layer.index], scores[layer.index] = mask, mask + 0.01 * torch.rand(n, generator=g)
    return scores, masks
