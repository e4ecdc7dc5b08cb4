"""Attention modules whose width may differ from the embedding (after heads are pruned).

timm's ``EvaAttention``, BEiT ``Attention`` and ``RelPosAttention`` end with
``x.transpose(1, 2).reshape(B, N, C)``, ``C`` being the *input* width: with fewer heads (or
head dimensions) the concatenated heads no longer have ``C`` channels. :func:`make_elastic`
gives such a module a subclass whose forward is timm's, with the heads reshaped to their own
width (``-1``), and for Eva the rotary table restricted to the kept query/key dimensions
(``jas_rope_keep``, a persistent buffer: an ``arange`` until head dimensions are removed). A
dense block computes exactly what timm's forward does. The model records the transform
(``model.jas_transforms``: ``elastic_attention``) so that :func:`jas_prune.load_pruned` redoes it
(:func:`make_attention_elastic`) before loading the weights.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_elastic", "elastic_timm", "make_attention_elastic", "heads_bias_shape", "TRANSFORM"]

#: the name of the transform in ``model.jas_transforms`` and in pruned checkpoints
TRANSFORM = "elastic_attention"


def _fused_qkv(self: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, heads, N, d]`` of a fused ``qkv`` whose bias may live in ``q/k/v_bias``."""
    B, N, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _eva_forward(self: Any, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                 is_causal: bool = False) -> Tensor:
    from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        q, k, v = _fused_qkv(self, x)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        keep = getattr(self, "jas_rope_keep", None)
        if keep is not None:  # the kept query/key dimensions' sin and cos
            sin, cos = rope.chunk(2, -1)
            rope = torch.cat([sin.index_select(-1, keep), cos.index_select(-1, keep)], -1)
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _beit_forward(self: Any, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
    B, N, _ = x.shape
    q, k, v = _fused_qkv(self, x)
    table = self.relative_position_bias_table is not None
    if self.fused_attn:
        bias = self._get_rel_pos_bias() if table else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if table:
            attn = attn + self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _relpos_forward(self: Any, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos is not None:
            attn = self.rel_pos(attn, shared_rel_pos=shared_rel_pos)
        elif shared_rel_pos is not None:
            attn = attn + shared_rel_pos
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _bias_shape_get(self: Any) -> tuple[int, ...]:
    return tuple(self.__dict__["bias_shape"][:-1]) + (int(self.num_heads),)


def _bias_shape_set(self: Any, value: tuple[int, ...]) -> None:
    self.__dict__["bias_shape"] = tuple(value)


@functools.cache
def _forwards() -> dict[type, Any]:
    """The forward each timm attention class gets (imported when first needed)."""
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer_relpos import RelPosAttention

    return {EvaAttention: _eva_forward, BeitAttention: _beit_forward, RelPosAttention: _relpos_forward}


@functools.cache
def _subclass(base: type, forward: Any = None) -> type:
    body: dict[str, Any] = {"__module__": __name__, "jas_elastic": True}
    if forward is not None:
        body["forward"] = forward
    else:  # a relative-position module: its bias shape follows num_heads
        body["bias_shape"] = property(_bias_shape_get, _bias_shape_set)
    return type(f"Elastic{base.__name__}", (base,), body)


def _rel_pos_classes() -> tuple[type, ...]:
    from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp

    return RelPosBias, RelPosMlp


def __getattr__(name: str) -> type:
    """``ElasticEvaAttention``... by name, so that pickle finds the subclasses :func:`make_elastic`
    builds (``torch.save(model)`` of a pruned model)."""
    if name.startswith("Elastic"):
        for base, forward in _forwards().items():
            if name == f"Elastic{base.__name__}":
                return _subclass(base, forward)
        for base in _rel_pos_classes():
            if name == f"Elastic{base.__name__}":
                return _subclass(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def heads_bias_shape(module: nn.Module) -> None:
    """Make a timm relative-position module's ``bias_shape`` follow its ``num_heads`` (idempotent)."""
    if not getattr(type(module), "jas_elastic", False):
        module.__class__ = _subclass(type(module))


def make_elastic(attn: nn.Module, *, rope: bool = False) -> None:
    """Give a timm Eva/BEiT/RelPos attention module the width-agnostic forward (idempotent); with
    ``rope``, an identity ``jas_rope_keep`` buffer over its head dimensions."""
    if not getattr(type(attn), "jas_elastic", False):
        forward = next((f for c, f in _forwards().items() if isinstance(attn, c)), None)
        if forward is None:
            raise TypeError(f"{type(attn).__name__} has no width-agnostic forward")
        attn.__class__ = _subclass(type(attn), forward)
    rel = getattr(attn, "rel_pos", None)
    if isinstance(getattr(rel, "bias_shape", None), tuple) and isinstance(getattr(rel, "num_heads", None), int):
        heads_bias_shape(rel)
    if rope and getattr(attn, "jas_rope_keep", None) is None:
        dim = int(attn.proj.in_features) // int(attn.num_heads)
        attn.register_buffer("jas_rope_keep", torch.arange(dim, device=attn.proj.weight.device))


def elastic_timm(_model: nn.Module, attn: nn.Module) -> None:
    """A family layout's ``elastic`` for timm attention without rotary embeddings."""
    make_elastic(attn)


def make_attention_elastic(model: nn.Module) -> int:
    """Make every attention of ``model``'s family that needs it width-agnostic (the model
    transform ``elastic_attention``); returns how many modules. Records the transform."""
    from .families import FAMILIES, find_vit
    from .heads import discover_heads

    vit, info = find_vit(model)
    layout = FAMILIES.get(info.family).attention
    if layout is None or layout.elastic is None:
        return 0
    heads = discover_heads(info)
    for h in heads:
        layout.elastic(vit, h.attn)
    done = list(getattr(model, "jas_transforms", []) or [])
    if TRANSFORM not in done:
        model.jas_transforms = [*done, TRANSFORM]
    return len(heads)
