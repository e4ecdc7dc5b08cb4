"""timm ``VisionTransformerRelPos``: vit_relpos_* (relative position MLP/bias, per block or
shared; no class token by default, so only scope ``all`` unless the model has one;
residual post-norm blocks)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..errors import UnsupportedModelError
from .families import FAMILIES, Family
from .ffn import FFNInfo, timm_mlp_ffn
from .elastic import elastic_timm
from .heads import AttentionLayout, Slot, fused_qkv_slots
from .timm_common import factory_args, patch_kwargs, timm_image_size, timm_info, tiny_timm, tuples

__all__ = ["arch_kwargs", "decode_arch"]

_BLOCKS = ("RelPosBlock", "ResPostRelPosBlock")


def _is_relpos(model: nn.Module) -> bool:
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return isinstance(model, VisionTransformerRelPos)


def _discover(model: nn.Module, label: str) -> FFNInfo:
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock

    return timm_info(model, label, "timm-relpos", lambda i, blk: timm_mlp_ffn(
        i, blk, label, layer_scale=getattr(blk, "ls2", None), post_norm=isinstance(blk, ResPostRelPosBlock)))


def _per_head(_model: nn.Module, attn: nn.Module) -> list[Slot]:
    """The block's relative position module: a bias table with one column per head
    (``RelPosBias``) or an MLP with one output per head (``RelPosMlp``)."""
    rel = getattr(attn, "rel_pos", None)
    if rel is None:
        return []
    if getattr(rel, "relative_position_bias_table", None) is not None:
        return [Slot(rel, "relative_position_bias_table", rel.relative_position_bias_table.ndim - 1, "h")]
    fc2 = rel.mlp.fc2
    return [Slot(fc2, n, 0, "h") for n in ("weight", "bias") if getattr(fc2, n, None) is not None]


def _shared(model: nn.Module) -> str | None:
    if getattr(model, "shared_rel_pos", None) is not None:
        return "its relative position module is shared by every block (shared_rel_pos)"
    return None


ATTENTION = AttentionLayout(channels=fused_qkv_slots, per_head=_per_head, shared=_shared, elastic=elastic_timm)


def arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``VisionTransformerRelPos`` keyword arguments read off a built model."""
    blk = model.blocks[0]
    ls1 = getattr(blk, "ls1", None)
    kw = factory_args(model)
    kw.update(patch_kwargs(model))
    kw.update({
        "num_heads": int(blk.attn.num_heads),
        "qkv_bias": blk.attn.qkv.bias is not None,
        "qk_norm": not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity),
        "class_token": getattr(model, "cls_token", None) is not None,
        "global_pool": str(model.global_pool),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "shared_rel_pos": getattr(model, "shared_rel_pos", None) is not None,
        "block_fn": type(blk).__name__,
    })
    if type(blk).__name__ == "RelPosBlock":
        kw["init_values"] = 1.0 if ls1 is not None and not isinstance(ls1, nn.Identity) else None
    return kw


def decode_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock

    kw = tuples(dict(arch))
    block = kw.pop("block_fn", None)
    if block is not None:
        if block not in _BLOCKS:
            raise UnsupportedModelError(f"arch.block_fn: unknown block class {block!r}")
        kw["block_fn"] = {"RelPosBlock": RelPosBlock, "ResPostRelPosBlock": ResPostRelPosBlock}[block]
    return kw


@FAMILIES.register
def _timm_relpos_family() -> Family:
    return Family(
        name="timm-relpos",
        label="timm VisionTransformerRelPos",
        matches=_is_relpos,
        discover=_discover,
        image_size=timm_image_size,
        arch_kwargs=arch_kwargs,
        decode_arch=decode_arch,
        example=lambda: tiny_timm("vit_relpos_small_patch16_224", init_values=0.5),
        attention=ATTENTION,
    )
