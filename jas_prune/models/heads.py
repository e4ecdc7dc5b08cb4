"""The attention head as a unit, independent of the model family.

A **head** ``(l, h)`` of block ``l`` is the slice ``h·d : (h+1)·d`` of the vector that enters the
attention output projection (``d`` value channels per head, heads concatenated head-major, as
every supported family lays them out). Attributing a head scales that slice; pruning it removes
those input columns of the projection and the matching query/key/value rows.

:class:`HeadLayer` names the modules: ``proj`` is the *site* (its forward *input* is the
concatenated head outputs, read and replaced by a forward pre-hook), ``attn`` the module whose
``num_heads``/``head_dim`` describe the geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .ffn import FFNInfo

__all__ = ["HeadLayer", "discover_heads", "attention_of"]


@dataclass(frozen=True)
class HeadLayer:
    """One block's multi-head attention.

    Attributes:
        index: block index.
        block: the transformer block.
        attn: the attention module (its ``num_heads``/``num_attention_heads`` is the head count).
        proj: the output projection; its input is the concatenated head outputs ``[..., H·d]``.
    """

    index: int
    block: nn.Module
    attn: nn.Module
    proj: nn.Linear

    @property
    def heads(self) -> int:
        """Number of heads (the units of this block)."""
        return int(getattr(self.attn, "num_heads", None) or self.attn.num_attention_heads)

    @property
    def head_dim(self) -> int:
        """Value channels per head (columns of ``proj`` per head)."""
        return int(self.proj.in_features) // self.heads


def attention_of(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(attention module with the head count, output projection)`` of a block, or None.

    timm blocks (ViT, Eva, BEiT, RelPos): ``block.attn`` with ``num_heads`` and ``proj``;
    Hugging Face ViT/DeiT layers: ``attention`` with ``num_attention_heads`` and ``o_proj``
    (transformers 5), or ``attention.attention`` and ``attention.output.dense`` (transformers 4).
    """
    attn = getattr(block, "attn", None)
    if attn is not None and isinstance(getattr(attn, "num_heads", None), int) and hasattr(attn, "proj"):
        return attn, attn.proj
    hf = getattr(block, "attention", None)
    if isinstance(getattr(hf, "num_attention_heads", None), int) and isinstance(getattr(hf, "o_proj", None), nn.Module):
        return hf, hf.o_proj  # transformers 5: one ViTAttention with q/k/v/o_proj
    inner, out = getattr(hf, "attention", None), getattr(getattr(hf, "output", None), "dense", None)
    if inner is not None and isinstance(getattr(inner, "num_attention_heads", None), int) and out is not None:
        return inner, out
    return None


def _identity(mod: Any) -> bool:
    return mod is None or isinstance(mod, nn.Identity)


def discover_heads(info: FFNInfo, label: str = "model") -> tuple[HeadLayer, ...]:
    """The attention of every block of a model whose FFNs are ``info``.

    Raises:
        UnsupportedModelError: a block whose attention is not found, whose output projection is
            not an ``nn.Linear``, or that mixes heads before the projection (timm ``scale_norm``,
            a gated output): a head's output would then not be its own slice.
    """
    out = []
    for layer in info.layers:
        found = attention_of(layer.block)
        where = f"model '{label}' ({info.family}): block {layer.index}"
        if found is None:
            raise UnsupportedModelError(f"{where}: no multi-head attention with num_heads and an output "
                                        "projection; attention units are not supported for this family")
        attn, proj = found
        if not isinstance(proj, nn.Linear):
            raise UnsupportedModelError(f"{where}: attention output projection is {type(proj).__name__}, "
                                        "not nn.Linear")
        if not _identity(getattr(attn, "norm", None)) or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{where}: the attention normalises or gates the concatenated heads "
                                        "before its projection (scale_norm/gated); heads are not separable")
        hl = HeadLayer(layer.index, layer.block, attn, proj)
        if hl.heads < 1 or proj.in_features % hl.heads:
            raise UnsupportedModelError(f"{where}: projection input {proj.in_features} is not a multiple of "
                                        f"{hl.heads} heads")
        out.append(hl)
    return tuple(out)
