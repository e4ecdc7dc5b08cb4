"""timm ``Beit``: BEiT / BEiT-v2 (relative position bias per block or shared, layer scale
``gamma_2``, optional SwiGLU FFNs)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .eva import decode_arch
from .families import FAMILIES, Family
from .ffn import FFNInfo, timm_mlp_ffn
from .elastic import elastic_timm
from .heads import AttentionLayout, Slot, fused_qkv_slots
from .timm_common import factory_args, patch_kwargs, timm_image_size, timm_info, tiny_timm, tuples

__all__ = ["arch_kwargs"]


def _is_beit(model: nn.Module) -> bool:
    from timm.models.beit import Beit

    return isinstance(model, Beit)


def _discover(model: nn.Module, label: str) -> FFNInfo:
    return timm_info(model, label, "timm-beit",
                     lambda i, blk: timm_mlp_ffn(i, blk, label, layer_scale=getattr(blk, "gamma_2", None)))


def _per_head(_model: nn.Module, attn: nn.Module) -> list[Slot]:
    """The relative position bias table: one column per head."""
    if getattr(attn, "relative_position_bias_table", None) is None:
        return []
    return [Slot(attn, "relative_position_bias_table", 1, "h")]


def _shared(model: nn.Module) -> str | None:
    if getattr(model, "rel_pos_bias", None) is not None:
        return "its relative position bias table is shared by every block (use_shared_rel_pos_bias)"
    return None


ATTENTION = AttentionLayout(channels=fused_qkv_slots, per_head=_per_head, shared=_shared,
                            gamma=lambda blk: getattr(blk, "gamma_1", None), elastic=elastic_timm)


def arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``Beit`` keyword arguments read off a built model (sizes come from the weights)."""
    from timm.layers import SwiGLU

    blk = model.blocks[0]
    kw = factory_args(model)
    kw.update(patch_kwargs(model))
    kw.update({
        "num_heads": int(blk.attn.num_heads),
        "qkv_bias": getattr(blk.attn, "q_bias", None) is not None,
        "global_pool": str(model.global_pool),
        "swiglu_mlp": isinstance(blk.mlp, SwiGLU),
        "scale_mlp": not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity),
        "init_values": 1.0 if getattr(blk, "gamma_1", None) is not None else None,
        "use_abs_pos_emb": getattr(model, "pos_embed", None) is not None,
        "use_rel_pos_bias": getattr(blk.attn, "relative_position_bias_table", None) is not None,
        "use_shared_rel_pos_bias": getattr(model, "rel_pos_bias", None) is not None,
        "use_fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
    })
    return kw


@FAMILIES.register
def _timm_beit_family() -> Family:
    return Family(
        name="timm-beit",
        label="timm Beit",
        matches=_is_beit,
        discover=_discover,
        image_size=timm_image_size,
        arch_kwargs=arch_kwargs,
        decode_arch=decode_arch,
        example=lambda: tiny_timm("beit_base_patch16_224", init_values=0.5),
        attention=ATTENTION,
    )
