"""What a block costs at a given width: the per-block cost table a budget split spends over.

A block's **geometry** is ``(ffn, heads, head_dim)``: kept FFN neurons, kept heads and kept
dimensions per head. :class:`CostTable` gives, for every block of a timm ViT, its multiply-
accumulates and parameters at any geometry, computed analytically, and the rest of the model
(patch embedding, norms, the classifier — what no width changes) once from the dense model, so
``table.total(geometry)`` is exactly what :func:`jas_prune.evaluate.count_params_macs`
(Torch-Pruning's counter, the count ``metrics.json`` records) gives for the pruned model,
without pruning one. That counter charges a timm ``Attention`` as one unit: ``T·A`` (query
scaling), ``3·T·E·A`` (+ ``3·T·A`` with a ``qkv`` bias), ``H·(2·T²·d + T²)`` (``q·kᵀ``,
softmax, ``attn·v``) and ``T·A·(A+1)`` for the output projection, with ``A = H·d`` — it
assumes the projection is ``A→A``, so once the attention width is below the embedding it
counts less than the true ``T·A·E`` (see docs/attention.md). A block whose attention type the
counter does not know is charged its two linear layers only, as the counter does.

A latency table (ONNX Runtime, measured) has the same interface, :class:`BlockCosts`; it lives
in :mod:`jas_prune.deploy.block_latency` (measuring needs the exporter, a floor above pruning).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from torch import nn

from ..models.heads import discover_heads
from .graph import find_vit

__all__ = ["COST_FAMILIES", "Geometry", "BlockShape", "BlockCosts", "CostTable", "dense_geometry"]

#: the model families whose block costs :class:`CostTable` computes (timm ``VisionTransformer``)
COST_FAMILIES = ("timm-vit",)

#: (kept FFN neurons, kept heads, kept dimensions per head) of one block
Geometry = tuple[int, int, int]


class BlockCosts(Protocol):
    """A cost model: per block, the cost at a geometry, and the cost of everything else."""

    def block(self, index: int, geometry: Geometry) -> float: ...

    def total(self, geometry: Mapping[int, Geometry]) -> float: ...


@dataclass(frozen=True)
class BlockShape:
    """The dense shape of one block and which of its parts carry a bias / are counted."""

    index: int
    embed: int
    ffn: int
    heads: int
    head_dim: int
    tokens: int
    fc1_bias: bool
    qkv_bias: bool
    #: Torch-Pruning's counter counts the activation (GELU, ReLU: one per element)
    act_counted: bool
    #: Torch-Pruning's counter knows the attention type (timm ``Attention``), else only its linears
    attn_counted: bool
    proj_bias: bool
    #: parameters per head dimension of the query and key norms (``qk_norm``; 0 without)
    qk_norm_params: int = 0

    @property
    def geometry(self) -> Geometry:
        return self.ffn, self.heads, self.head_dim

    def macs(self, g: Geometry) -> int:
        """The width-dependent multiply-accumulates of the block at geometry ``g`` (one image)."""
        f, h, d = g
        T, E, A = self.tokens, self.embed, h * d
        out = T * E * f + (f if self.fc1_bias else 0) + T * f * E  # fc1, fc2 (fc2's bias is constant)
        if self.act_counted:
            out += T * f
        if self.attn_counted:
            out += T * A + 3 * T * E * A + (3 * T * A if self.qkv_bias else 0)
            out += h * (2 * T * T * d + T * T) + T * A * (A + 1)
        else:
            out += 3 * T * E * A + (3 * A if self.qkv_bias else 0) + T * A * E
        return out

    def params(self, g: Geometry) -> int:
        """The width-dependent parameters of the block at geometry ``g``."""
        f, h, d = g
        E, A = self.embed, h * d
        out = 2 * E * f + (f if self.fc1_bias else 0)
        out += 4 * E * A + (3 * A if self.qkv_bias else 0) + 2 * self.qk_norm_params * d
        return out


def _shape(model: nn.Module, layer, head, tokens: int) -> BlockShape:
    import torch_pruning.utils.op_counter as oc

    attn = head.attn
    qk = getattr(attn, "q_norm", None)
    qk_params = 0 if qk is None or isinstance(qk, nn.Identity) else sum(p.numel() for p in qk.parameters()) // max(
        1, head.head_dim)
    return BlockShape(index=layer.index, embed=layer.fc1.in_features, ffn=layer.hidden, heads=head.heads,
                      head_dim=head.head_dim, tokens=tokens, fc1_bias=layer.fc1.bias is not None,
                      qkv_bias=getattr(attn, "qkv", None) is not None and attn.qkv.bias is not None,
                      act_counted=type(getattr(layer.block.mlp, "act", None)) in oc.MODULES_MAPPING,
                      attn_counted=type(attn) in oc.MODULES_MAPPING, proj_bias=head.proj.bias is not None,
                      qk_norm_params=qk_params)


def _tokens(vit: nn.Module) -> int:
    pe = vit.patch_embed
    return int(pe.num_patches) + int(getattr(vit, "num_prefix_tokens", 1))


def dense_geometry(model: nn.Module) -> dict[int, Geometry]:
    """Block -> (FFN width, heads, head dim) of ``model`` as it is."""
    return {b: s.geometry for b, s in CostTable.block_shapes(model).items()}


@dataclass
class CostTable:
    """MACs or parameters of a timm ViT as a function of every block's geometry (exact against
    Torch-Pruning's counter). ``target`` is ``macs`` or ``params``; ``rest`` the cost no width
    changes (measured once: the model's count minus its blocks' width-dependent parts)."""

    target: str
    shapes: dict[int, BlockShape]
    rest: float
    #: the count of the dense model given (the denominator of a MACs / params fraction)
    dense: float

    def block(self, index: int, geometry: Geometry) -> float:
        s = self.shapes[index]
        return float(s.macs(geometry) if self.target == "macs" else s.params(geometry))

    def total(self, geometry: Mapping[int, Geometry]) -> float:
        """The model's count with block ``b`` at ``geometry[b]`` (blocks not listed: dense)."""
        return self.rest + sum(self.block(b, geometry.get(b, s.geometry)) for b, s in self.shapes.items())

    @staticmethod
    def block_shapes(model: nn.Module) -> dict[int, BlockShape]:
        """Every block's :class:`BlockShape` (timm ViT with a fused ``qkv``)."""
        vit, info = find_vit(model)
        heads = {h.index: h for h in discover_heads(info)}
        tokens = _tokens(vit)
        return {l.index: _shape(vit, l, heads[l.index], tokens) for l in info.layers}

    @classmethod
    def from_model(cls, model: nn.Module, target: str = "macs", *, head_classes: Sequence[int | str] | None = None,
                   class_names: Sequence[str] | None = None) -> "CostTable":
        """The table of ``model`` (dense or already pruned: its widths are the geometry it starts
        from). ``head_classes``: the classifier the pruned models will have cut to these classes
        (its cost is part of ``rest``); ``dense`` stays the count of ``model`` as given.

        Raises:
            InvalidArgumentError: a ``target`` other than macs or params.
        """
        from ..errors import InvalidArgumentError
        from ..evaluate import count_params_macs
        from ..models import input_size

        if target not in ("macs", "params"):
            raise InvalidArgumentError(f"cost table: target {target!r} is counted only for macs or params")
        size = input_size(model)
        dense = float(count_params_macs(model, size)[target])
        counted = model
        if head_classes is not None:
            from .prune import cut_head

            counted = copy.deepcopy(model)
            cut_head(counted, head_classes, class_names=class_names)
        shapes = cls.block_shapes(counted)
        whole = float(count_params_macs(counted, size)[target]) if counted is not model else dense
        table = cls(target, shapes, 0.0, dense)
        table.rest = whole - sum(table.block(b, s.geometry) for b, s in shapes.items())
        return table
