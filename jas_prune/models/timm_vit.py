"""timm ``VisionTransformer``: vit_*, deit_* (no distillation token), DeiT-3, DINOv2 (also with
registers and SwiGLU FFNs), MAE-finetuned ViTs, CLIP/SigLIP towers, FlexiViT, GAP models."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..errors import UnsupportedModelError
from .families import FAMILIES, Family
from .ffn import FFNInfo, timm_mlp_ffn
from .heads import GRAPH_LAYOUT
from .timm_common import act_name, factory_args, patch_kwargs, timm_image_size, timm_info, tiny_timm, tuples

__all__ = ["arch_kwargs", "decode_arch"]

#: names under which the FFN and block classes are stored in a checkpoint's ``arch``
_MLP_LAYERS = ("Mlp", "SwiGLU", "GluMlp", "SwiGLUPacked")
_BLOCKS = ("Block", "ResPostBlock")


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _discover(model: nn.Module, label: str) -> FFNInfo:
    from timm.models.vision_transformer import ResPostBlock

    if getattr(model, "dist_token", None) is not None or getattr(model, "head_dist", None) is not None:
        raise UnsupportedModelError(
            f"model '{label}' has a distillation token and two heads; use the non-distilled variant")

    def layer(i: int, blk: nn.Module):
        if not hasattr(blk, "mlp"):
            raise UnsupportedModelError(
                f"model '{label}': block {i} is a {type(blk).__name__} without an mlp (parallel or fused "
                "attention/FFN blocks are not supported)")
        return timm_mlp_ffn(i, blk, label, layer_scale=getattr(blk, "ls2", None),
                            post_norm=isinstance(blk, ResPostBlock))

    return timm_info(model, label, "timm-vit", layer)


def _mlp_layer_name(mlp: nn.Module) -> str:
    name = type(mlp).__name__
    fused = getattr(mlp, "jas_fused_gate_last", None)  # a SwiGLU split from a GluMlp
    if fused is not None:
        name = "GluMlp" if fused else "SwiGLUPacked"
    elif name == "GluMlp" and not mlp.gate_last:
        name = "SwiGLUPacked"
    return name


def arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments read off a built model (the FFN widths and
    any other pruned size come from the weights)."""
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    kw = factory_args(model)
    kw.update(patch_kwargs(model))
    kw.update({
        "num_heads": int(attn.num_heads),
        "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        "class_token": getattr(model, "cls_token", None) is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "global_pool": str(getattr(model, "global_pool", "token")),
        "pre_norm": not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
        "final_norm": not (isinstance(getattr(model, "norm", nn.Identity()), nn.Identity)
                           and isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "init_values": 1.0 if not isinstance(getattr(blk, "ls1", nn.Identity()), nn.Identity) else None,
        "scale_mlp_norm": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        "mlp_layer": _mlp_layer_name(mlp),
        "block_fn": type(blk).__name__,
    })
    act = getattr(mlp, "act", None)
    if act is not None and act_name(act) is not None:
        kw["act_layer"] = act_name(act)
    return kw


def decode_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Stored ``arch`` -> ``timm.create_model`` keyword arguments (class names back to classes)."""
    from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked
    from timm.models.vision_transformer import Block, ResPostBlock

    kw = tuples(dict(arch))
    mlp = kw.pop("mlp_layer", None)
    if mlp is not None:
        if mlp not in _MLP_LAYERS:
            raise UnsupportedModelError(f"arch.mlp_layer: unknown FFN class {mlp!r}")
        kw["mlp_layer"] = {"Mlp": Mlp, "SwiGLU": SwiGLU, "GluMlp": GluMlp, "SwiGLUPacked": SwiGLUPacked}[mlp]
    block = kw.pop("block_fn", None)
    if block is not None:
        if block not in _BLOCKS:
            raise UnsupportedModelError(f"arch.block_fn: unknown block class {block!r}")
        kw["block_fn"] = {"Block": Block, "ResPostBlock": ResPostBlock}[block]
    return kw


@FAMILIES.register
def _timm_vit_family() -> Family:
    return Family(
        name="timm-vit",
        label="timm VisionTransformer",
        matches=_is_vit,
        discover=_discover,
        image_size=timm_image_size,
        arch_kwargs=arch_kwargs,
        decode_arch=decode_arch,
        example=lambda: tiny_timm("vit_tiny_patch16_224"),
        attention=GRAPH_LAYOUT,
    )

