"""The FFN neuron, independent of the model family.

A **neuron** ``(l, i)`` is unit ``i`` of the vector that enters ``fc2`` of block ``l``:

- ``mlp`` FFNs (``fc1 -> act -> [norm] -> fc2``): unit i of ``act(fc1 x)`` (after the hidden
  norm when there is one);
- ``gated`` FFNs (SwiGLU, split projections): unit i of ``act(fc1_g x) * fc1_x x`` (after the
  hidden norm when there is one), removed as row i of both input projections and column i of
  ``fc2``;
- ``gated_fused`` (timm ``GluMlp``/``SwiGLUPacked``: one ``fc1`` whose two halves are the gate
  and the value): the same unit; it is located as is, but pruned only after
  :func:`split_fused_glu` (Torch-Pruning's dependency graph maps a removed unit to one half of
  the fused ``fc1`` only, which would leave the halves unequal).

:class:`FFNLayer` names the modules: ``act`` is the *site*, the module whose forward output is
the neuron vector (what every hook reads or replaces), ``inputs`` the projections that lose a row
with a neuron, ``fc2`` the projection that loses a column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

__all__ = ["FFN_KINDS", "FFNLayer", "FFNInfo", "timm_mlp_ffn", "split_fused_glu", "check_distinct_sites"]

#: ``mlp``: fc1 -> act -> fc2; ``gated``: act(fc1_g x) * fc1_x x -> fc2; ``gated_fused``: the
#: same with one fused fc1 split by ``chunk``.
FFN_KINDS = ("mlp", "gated", "gated_fused")


@dataclass(frozen=True)
class FFNLayer:
    """One block's FFN.

    Attributes:
        index: block index.
        block: the transformer block (its input is the residual stream).
        fc1: the projection a Torch-Pruning group for the block's neurons is rooted at (``mlp``:
            ``fc1``; ``gated``: the value projection ``fc1_x``; ``gated_fused``: the fused ``fc1``).
        act: the *site*: the module whose forward output is the neuron vector ``[..., hidden]``
            (``mlp.act``; ``mlp.drop1`` for gated FFNs; the hidden norm when there is one).
        fc2: the output projection; its input is the neuron vector.
        inputs: every projection that loses row i with neuron i (``(fc1,)``; ``(fc1_g, fc1_x)``).
        kind: one of :data:`FFN_KINDS`.
        gate: the gate projection of a ``gated`` FFN (``fc1_g``), else None.
        norm: a norm over the hidden units between the activation and ``fc2`` (it loses entry i
            with neuron i), else None.
        mlp: the module mapping the FFN input to the FFN output, when there is one.
        layer_scale: what multiplies the FFN output before the residual add (timm ``ls2``, a
            ``gamma_2`` parameter), else None.
        post_norm: the block normalises the FFN output before the residual add
            (``x + norm(mlp(x))``) instead of its input.
    """

    index: int
    block: nn.Module
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Linear
    inputs: tuple[nn.Module, ...] = ()
    kind: str = "mlp"
    gate: nn.Module | None = None
    norm: nn.Module | None = None
    mlp: nn.Module | None = None
    layer_scale: nn.Module | nn.Parameter | None = None
    post_norm: bool = False
    _forward: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", (self.fc1,))
        if self.kind not in FFN_KINDS:
            raise ValueError(f"FFNLayer.kind must be one of {FFN_KINDS}, got {self.kind!r}")

    @property
    def hidden(self) -> int:
        """Number of neurons (the width of the vector entering ``fc2``)."""
        return int(self.fc2.in_features)

    @property
    def prunable(self) -> bool:
        """Whether Torch-Pruning's dependency graph removes this FFN's neurons correctly."""
        return self.kind != "gated_fused"

    def ffn(self, u: Tensor) -> Tensor:
        """The FFN output for the FFN input ``u`` (what the block adds to its residual stream,
        before ``layer_scale``)."""
        if self.mlp is not None:
            return self.mlp(u)
        if self._forward is not None:
            return self._forward(u)
        raise UnsupportedModelError(f"block {self.index}: no FFN module to run")

    def scale_output(self, y: Tensor) -> Tensor:
        """``y`` times the block's layer scale on the FFN branch (identity without one)."""
        if self.layer_scale is None:
            return y
        if isinstance(self.layer_scale, Tensor):
            return y * self.layer_scale
        return self.layer_scale(y)


@dataclass(frozen=True)
class FFNInfo:
    """FFN layers of a ViT, in block order, and its token layout.

    ``family`` names the registered model family (``timm-vit``, ``timm-eva``, ``timm-beit``,
    ``timm-relpos``, ``hf-vit``).
    """

    layers: tuple[FFNLayer, ...]
    has_cls_token: bool
    num_prefix_tokens: int
    family: str = "timm-vit"

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [layer.hidden for layer in self.layers]

    @property
    def kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]


def _is_identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_linear(label: str, index: int, **mods: Any) -> None:
    bad = {n: type(m).__name__ for n, m in mods.items() if not isinstance(m, nn.Linear)}
    if bad:
        found = ", ".join(f"{n} is {t}" for n, t in bad.items())
        raise UnsupportedModelError(f"model '{label}': block {index} FFN projections must be nn.Linear ({found})")


def timm_mlp_ffn(index: int, block: nn.Module, label: str, *, layer_scale: Any = None,
                 post_norm: bool = False) -> FFNLayer:
    """The FFN of a timm block whose ``mlp`` is timm ``Mlp``, ``SwiGLU`` or ``GluMlp``.

    Raises:
        UnsupportedModelError: any other FFN (named), a convolutional ``GluMlp``, or projections
            that are not ``nn.Linear``.
    """
    from timm.layers import GluMlp, Mlp, SwiGLU

    mlp = getattr(block, "mlp", None)
    kind_of = type(mlp)
    if kind_of is Mlp:
        _check_linear(label, index, fc1=mlp.fc1, fc2=mlp.fc2)
        norm = None if _is_identity(mlp.norm) else mlp.norm
        return FFNLayer(index=index, block=block, fc1=mlp.fc1, act=norm if norm is not None else mlp.act,
                        fc2=mlp.fc2, kind="mlp", norm=norm, mlp=mlp, layer_scale=layer_scale, post_norm=post_norm)
    if kind_of is SwiGLU:
        _check_linear(label, index, fc1_g=mlp.fc1_g, fc1_x=mlp.fc1_x, fc2=mlp.fc2)
        norm = None if _is_identity(mlp.norm) else mlp.norm
        return FFNLayer(index=index, block=block, fc1=mlp.fc1_x, act=norm if norm is not None else mlp.drop1,
                        fc2=mlp.fc2, inputs=(mlp.fc1_g, mlp.fc1_x), kind="gated", gate=mlp.fc1_g, norm=norm,
                        mlp=mlp, layer_scale=layer_scale, post_norm=post_norm)
    if kind_of is GluMlp:
        if getattr(mlp, "chunk_dim", -1) != -1:
            raise UnsupportedModelError(f"model '{label}': block {index} FFN is a convolutional GluMlp "
                                        "(use_conv=True); only linear FFNs are supported")
        _check_linear(label, index, fc1=mlp.fc1, fc2=mlp.fc2)
        norm = None if _is_identity(mlp.norm) else mlp.norm
        return FFNLayer(index=index, block=block, fc1=mlp.fc1, act=norm if norm is not None else mlp.drop1,
                        fc2=mlp.fc2, kind="gated_fused", norm=norm, mlp=mlp, layer_scale=layer_scale,
                        post_norm=post_norm)
    found = "no mlp" if mlp is None else f"{kind_of.__module__}.{kind_of.__name__}"
    raise UnsupportedModelError(
        f"model '{label}': block {index} FFN is {found}, not timm Mlp (fc1 -> act -> fc2), SwiGLU or "
        "GluMlp/SwiGLUPacked")


def check_distinct_sites(layers: tuple[FFNLayer, ...], label: str) -> None:
    """Refuse blocks sharing one site module: a hook on it would fire for every block."""
    seen: dict[int, int] = {}
    for layer in layers:
        other = seen.setdefault(id(layer.act), layer.index)
        if other != layer.index:
            raise UnsupportedModelError(
                f"model '{label}': blocks {other} and {layer.index} share one FFN activation module "
                f"({type(layer.act).__name__}); neurons of different blocks could not be told apart")


# -- fused GLU -> split projections ----------------------------------------------------------------


def _split_glu(mlp: nn.Module) -> nn.Module:
    """An equivalent timm ``SwiGLU`` for a linear timm ``GluMlp`` (weights copied, act/norm kept)."""
    from timm.layers import SwiGLU

    fc1 = mlp.fc1
    n = fc1.out_features // 2
    first, second = slice(0, n), slice(n, 2 * n)
    # gate_last: x1 * act(x2) -> the gate is the second half; else act(x1) * x2 -> the first
    gate_rows, value_rows = (second, first) if mlp.gate_last else (first, second)
    dd = dict(device=fc1.weight.device, dtype=fc1.weight.dtype)
    bias = (fc1.bias is not None, mlp.fc2.bias is not None)
    new = SwiGLU(fc1.in_features, n, mlp.fc2.out_features, bias=bias, **dd)
    with torch.no_grad():
        new.fc1_g.weight.copy_(fc1.weight[gate_rows])
        new.fc1_x.weight.copy_(fc1.weight[value_rows])
        if fc1.bias is not None:
            new.fc1_g.bias.copy_(fc1.bias[gate_rows])
            new.fc1_x.bias.copy_(fc1.bias[value_rows])
    new.fc1_g.weight.requires_grad_(fc1.weight.requires_grad)
    new.fc1_x.weight.requires_grad_(fc1.weight.requires_grad)
    new.act, new.drop1, new.norm, new.fc2, new.drop2 = mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2
    new.jas_fused_gate_last = bool(mlp.gate_last)  # what it was split from (rebuilding checkpoints)
    new.train(mlp.training)
    return new


def split_fused_glu(model: nn.Module) -> int:
    """Replace every linear timm ``GluMlp``/``SwiGLUPacked`` of ``model`` by the equivalent timm
    ``SwiGLU`` (fused ``fc1`` split into ``fc1_g``/``fc1_x``), in place; returns how many.

    The outputs are those of the fused model (to float rounding). Afterwards every neuron is a
    row of ``fc1_g`` and ``fc1_x`` and a column of ``fc2``, which Torch-Pruning's dependency graph
    prunes together. :func:`jas_prune.load_model` does this for every model it loads; the model
    records it (``model.jas_transforms``) so that pruned checkpoints are rebuilt the same way.
    """
    from timm.layers import GluMlp

    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is GluMlp and getattr(child, "chunk_dim", -1) == -1]
    for parent, name, child in todo:
        setattr(parent, name, _split_glu(child))
    if todo:
        done = list(getattr(model, "jas_transforms", []) or [])
        if "split_fused_glu" not in done:
            done.append("split_fused_glu")
        model.jas_transforms = done
    return len(todo)
