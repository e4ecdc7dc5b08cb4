"""timm ``Eva``: EVA and EVA-02 (RoPE, SwiGLU FFNs with or without the hidden norm of
``scale_mlp``, layer scale ``gamma_2``, post-norm blocks), and the models built on it."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .families import FAMILIES, Family
from .ffn import FFNInfo, timm_mlp_ffn
from .heads import AttentionLayout, Slot, fused_qkv_slots
from .timm_common import factory_args, patch_kwargs, timm_image_size, timm_info, tiny_timm, tuples

__all__ = ["arch_kwargs", "decode_arch"]


def _is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(model, Eva)


def _discover(model: nn.Module, label: str) -> FFNInfo:
    from timm.models.eva import EvaBlockPostNorm

    return timm_info(model, label, "timm-eva", lambda i, blk: timm_mlp_ffn(
        i, blk, label, layer_scale=getattr(blk, "gamma_2", None), post_norm=isinstance(blk, EvaBlockPostNorm)))


def _channels(attn: nn.Module) -> list[Slot]:
    """A fused ``qkv`` (biases as separate ``q_bias``/``k_bias``/``v_bias``) or ``q/k/v_proj``."""
    if attn.qkv is not None:
        return fused_qkv_slots(attn)
    return [Slot(getattr(attn, f"{r}_proj"), n, 0, r) for r in "qkv" for n in ("weight", "bias")
            if getattr(getattr(attn, f"{r}_proj"), n, None) is not None]


def _rope(model: nn.Module, attn: nn.Module) -> str | None:
    if getattr(model, "rope", None) is None:
        return None
    return "half" if getattr(attn, "rotate_half", False) else "interleaved"


def _elastic(model: nn.Module, attn: nn.Module) -> None:
    from .elastic import make_elastic

    make_elastic(attn, rope=getattr(model, "rope", None) is not None)


#: the rotary table is shared by every block: a block's kept query/key dimensions select its
#: columns (``jas_rope_keep``), two by two (each rotary pair together)
ATTENTION = AttentionLayout(channels=_channels, rope=_rope, gamma=lambda blk: getattr(blk, "gamma_1", None),
                            elastic=_elastic)


def _not_identity(module: Any) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``Eva`` keyword arguments read off a built model (sizes come from the weights)."""
    from timm.layers import GluMlp, SwiGLU
    from timm.models.eva import EvaBlockPostNorm

    blk = model.blocks[0]
    mlp, attn = blk.mlp, blk.attn
    kw = factory_args(model)
    kw.update(patch_kwargs(model))
    kw.update({
        "num_heads": int(attn.num_heads),
        "qkv_fused": getattr(attn, "qkv", None) is not None,
        "class_token": getattr(model, "cls_token", None) is not None,
        "num_reg_tokens": int(getattr(model, "num_reg_tokens", 0) or 0),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "global_pool": str(model.global_pool),
        "swiglu_mlp": isinstance(mlp, (SwiGLU, GluMlp)),
        "scale_mlp": _not_identity(getattr(mlp, "norm", None)),
        "init_values": 1.0 if getattr(blk, "gamma_1", None) is not None else None,
        "use_abs_pos_emb": getattr(model, "pos_embed", None) is not None,
        "use_rot_pos_emb": getattr(model, "rope", None) is not None,
        "use_post_norm": isinstance(blk, EvaBlockPostNorm),
        "use_fc_norm": _not_identity(getattr(model, "fc_norm", None)),
        "use_pre_transformer_norm": _not_identity(getattr(model, "norm_pre", None)),
        "use_post_transformer_norm": _not_identity(getattr(model, "norm", None)),
    })
    if isinstance(mlp, SwiGLU) and getattr(mlp, "jas_fused_gate_last", None) is None and not kw["scale_mlp"]:
        kw["swiglu_align_to"] = 1  # a split SwiGLU without norm (timm builds it only for an alignment)
    return kw


def decode_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    kw = tuples(dict(arch))
    return kw


@FAMILIES.register
def _timm_eva_family() -> Family:
    return Family(
        name="timm-eva",
        label="timm Eva",
        matches=_is_eva,
        discover=_discover,
        image_size=timm_image_size,
        arch_kwargs=arch_kwargs,
        decode_arch=decode_arch,
        example=lambda: tiny_timm("eva02_tiny_patch14_224", img_size=28, patch_size=14, ref_feat_shape=(2, 2)),
        attention=ATTENTION,
    )
