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

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .ffn import FFNInfo

__all__ = ["HeadLayer", "discover_heads", "attention_of", "Slot", "AttentionLayout", "GRAPH_LAYOUT", "fused_qkv_slots"]


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


@dataclass(frozen=True)
class Slot:
    """A tensor that holds attention channels: ``getattr(owner, name)`` along ``dim``, laid out
    as ``len(roles)`` chunks of ``H·d`` channels (head-major), one chunk per role: ``"qkv"`` for
    a fused projection, ``"q"`` for a query bias; or, with ``roles == "h"``, one entry per head
    (a relative-position bias table)."""

    owner: nn.Module
    name: str
    dim: int
    roles: str

    @property
    def tensor(self) -> Tensor:
        return getattr(self.owner, self.name)


def _no_slots(*_: Any) -> list[Slot]:
    return []


def _none(*_: Any) -> str | None:
    return None


@dataclass(frozen=True)
class AttentionLayout:
    """Where a family keeps each head's parameters: what removing heads and head dimensions
    changes (:func:`jas_prune.pruning.attention.prune_attention`). Registered with the family
    (:attr:`jas_prune.models.Family.attention`).

    Attributes:
        channels: ``attn -> slots`` of the query/key/value channels (weights and biases; the
            output projection's columns are always removed with them).
        graph: Torch-Pruning's dependency graph removes the channels (it maps the projection's
            input to every q/k/v row); otherwise they are sliced here, slot by slot, with a
            shape check, because the graph cannot see them (biases concatenated outside the
            projection, per-head tables, rotary pairs).
        per_head: ``(model, attn) -> slots`` with one entry per head (bias tables); a slot
            owner with a ``num_heads`` attribute gets the new count.
        shared: ``model -> reason`` heads cannot be removed per block (a table shared by all
            blocks), None when they can.
        rope: ``(model, attn) -> "interleaved" | "half" | None``: how rotary embeddings pair
            the query/key dimensions (removed two by two), None without RoPE.
        heads_attr / scale_attr: the attention attributes holding the head count and the
            logit scale.
        gamma: ``block -> layer scale of the attention branch`` (None: no scale).
        elastic: ``(model, attn) -> None`` makes the attention's forward accept a width other than the
            embedding (timm's Eva/BEiT/RelPos reshape the heads back to the input width);
            recorded as the model transform ``elastic_attention``.
    """

    channels: Callable[[nn.Module], list[Slot]]
    graph: bool = False
    per_head: Callable[[nn.Module, nn.Module], list[Slot]] = _no_slots
    shared: Callable[[nn.Module], str | None] = _none
    rope: Callable[[nn.Module, nn.Module], str | None] = _none
    heads_attr: str = "num_heads"
    scale_attr: str = "scale"
    gamma: Callable[[nn.Module], Tensor | None] = field(default=lambda blk: getattr(getattr(blk, "ls1", None),
                                                                                       "gamma", None))
    elastic: Callable[[nn.Module, nn.Module], None] | None = None


def fused_qkv_slots(attn: nn.Module) -> list[Slot]:
    """timm's fused ``qkv`` projection, with its bias, or with the ``q_bias``/``k_bias``/``v_bias``
    that Eva and BEiT keep beside it."""
    slots = [Slot(attn.qkv, n, 0, "qkv") for n in ("weight", "bias") if getattr(attn.qkv, n, None) is not None]
    return slots + [Slot(attn, f"{r}_bias", 0, r) for r in "qkv" if getattr(attn, f"{r}_bias", None) is not None]


#: timm ``VisionTransformer``: a fused ``qkv`` removed by the dependency graph
GRAPH_LAYOUT = AttentionLayout(channels=fused_qkv_slots, graph=True)


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
