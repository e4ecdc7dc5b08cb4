"""Torch-Pruning helpers: the ViT inside a model, its dependency graph, and the FFN groups.

A neuron of block l is removed through
``DependencyGraph.get_pruning_group(layer.fc1, tp.prune_linear_out_channels, idxs)``: rows of
every input projection (``fc1``; ``fc1_g`` and ``fc1_x`` of a gated FFN), the entries of a
hidden norm, and the matching columns of ``fc2``. :func:`check_group` refuses a group that would
change anything else (:func:`ffn_group_allowed` lists what may change), so a surprise in the graph
(a model that shares ``fc1`` outputs elsewhere) stops the pruning instead of silently changing
other layers. Torch-Pruning itself is imported only by the functions that use it, so
:func:`find_vit` costs nothing to import.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import PruneSettingError, UnsupportedModelError
from ..models import FFNInfo, FFNLayer, discover_ffn, family_of, find_vit, input_size
from ..torchutil import frozen_eval

if TYPE_CHECKING:  # pragma: no cover
    import torch_pruning as tp

__all__ = ["find_vit", "example_inputs_for", "dependency_graph", "fc1_groups", "check_group",
           "ffn_group_allowed", "check_prunable", "update_attention_geometry"]


def check_prunable(info: FFNInfo, model_name: str = "model") -> None:
    """Refuse FFNs whose neurons Torch-Pruning's dependency graph cannot remove correctly.

    Raises:
        UnsupportedModelError: a fused GLU FFN (timm ``GluMlp``/``SwiGLUPacked``): the graph maps a
            removed unit to one half of the fused ``fc1`` only.
    """
    fused = [layer.index for layer in info.layers if not layer.prunable]
    if fused:
        raise UnsupportedModelError(
            f"{model_name}: blocks {fused} have a fused GLU FFN (timm GluMlp/SwiGLUPacked: one fc1 holding gate "
            "and value, split by chunk); Torch-Pruning's dependency graph would remove a unit from one half only. "
            "Split it first with jas_prune.models.split_fused_glu(model) (same outputs; jas_prune.load_model "
            "does this)")


def ffn_group_allowed(layer: FFNLayer) -> list[tuple[nn.Module, Any]]:
    """What a pruning group of ``layer``'s neurons may change, as (module, Torch-Pruning handler):
    rows of every input projection, columns of ``fc2``, entries of a hidden norm."""
    import torch_pruning as tp

    allowed: list[tuple[nn.Module, Any]] = [(m, tp.prune_linear_out_channels) for m in layer.inputs]
    allowed.append((layer.fc2, tp.prune_linear_in_channels))
    if layer.norm is not None:
        allowed.append((layer.norm, tp.prune_layernorm_out_channels))
    return allowed


def example_inputs_for(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random image batch of the model's input size, on the model's device."""
    vit, _ = find_vit(model)
    size = input_size(vit)
    param = next(model.parameters())
    return torch.randn(batch, *size, device=param.device, dtype=param.dtype)


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor | None = None) -> "tp.DependencyGraph":
    """Torch-Pruning's dependency graph of ``model`` (traced once on ``example_inputs``).

    Torch-Pruning traces the autograd graph, so every parameter requires grad while it traces
    (frozen parameters would hide layers from it); flags and training mode are restored after.
    Its warning about unwrapped parameters (class token, position embeddings, layer-scale
    ``gamma``s, relative-position tables) is silenced: jas-prune never prunes them.

    Raises:
        UnsupportedModelError: a model whose FFN neurons cannot be pruned (:func:`check_prunable`).
    """
    import torch_pruning as tp

    _, info = find_vit(model)
    check_prunable(info)
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    with frozen_eval(model, trainable=True), warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def fc1_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> Iterator[tuple[int, Any]]:
    """(block, group) for every FFN neuron pruning group (rooted at ``layer.fc1``'s output
    channels), all neurons selected: what Torch-Pruning's group importances (magnitude, Taylor,
    Hessian) score per neuron. A gated FFN's group holds both input projections."""
    import torch_pruning as tp

    _, info = find_vit(model)
    dg = dependency_graph(model, example_inputs)
    for layer in info.layers:
        yield layer.index, dg.get_pruning_group(layer.fc1, tp.prune_linear_out_channels,
                                                list(range(layer.hidden)))


def _has_params(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


def check_group(group: Any, allowed: Sequence[tuple[nn.Module, Any]], what: str) -> None:
    """Refuse a pruning group that would touch any parameterised module but ``allowed``
    (pairs of module and Torch-Pruning handler).

    Raises:
        RuntimeError: naming ``what`` and the module the group would also change.
    """
    for dep, _idxs in group:
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            raise RuntimeError(f"{what}: Torch-Pruning would also prune an unwrapped parameter; refusing")
        if not _has_params(target):
            continue
        if not any(target is mod and dep.handler == fn for mod, fn in allowed):
            name = dep.target.name if hasattr(dep.target, "name") else type(target).__name__
            raise RuntimeError(f"{what}: Torch-Pruning would also change {name} ({dep.handler.__name__}); "
                               "refusing (only FFN input-projection rows, hidden-norm entries and fc2 "
                               "columns may change)")


def update_attention_geometry(model: nn.Module, num_heads: Mapping[nn.Module, int] | None = None) -> list[str]:
    """Make every attention module's head count and head size agree with its (pruned) projections.

    After Torch-Pruning removed heads (``prune_num_heads``) or head dimensions, a timm attention
    module with a fused ``qkv`` still reshapes with its old ``num_heads``/``head_dim``; this sets
    ``num_heads`` (from ``num_heads[module.qkv]``, e.g. ``pruner.num_heads``, else unchanged),
    ``head_dim = qkv.out_features // (3 * num_heads)`` and ``attn_dim`` - what Torch-Pruning's own
    timm ViT example does by hand after pruning. A Hugging Face ViT attention (separate
    ``q_proj``/``k_proj``/``v_proj``) gets ``num_attention_heads`` and ``head_dim`` the same way.
    Modules that already agree are left alone. Returns the names of the modules changed.

    Raises:
        PruneSettingError: a block with no head left (Torch-Pruning's iterative head pruning can
            reach 0), naming the block.
    """
    num_heads = num_heads or {}
    changed = []
    for name, m in model.named_modules():
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "head_dim"):
            heads = _heads_left(name, num_heads.get(qkv, m.num_heads), qkv)
            head_dim = qkv.out_features // (3 * heads)
            if (heads, head_dim) != (m.num_heads, m.head_dim):
                m.num_heads, m.head_dim = heads, head_dim
                if hasattr(m, "attn_dim"):
                    m.attn_dim = heads * head_dim
                changed.append(name)
            continue
        q = getattr(m, "q_proj", None)
        if isinstance(q, nn.Linear) and isinstance(getattr(m, "head_dim", None), int) \
                and isinstance(getattr(m, "num_attention_heads", None), int):
            heads = _heads_left(name, num_heads.get(q, m.num_attention_heads), q)
            head_dim = q.out_features // heads
            if (heads, head_dim) != (m.num_attention_heads, m.head_dim):
                m.num_attention_heads, m.head_dim = heads, head_dim
                changed.append(name)
    return changed


def _heads_left(name: str, heads: Any, proj: nn.Linear) -> int:
    """The head count of attention module ``name``, refused when no head is left (a block
    without attention heads cannot reshape its projections)."""
    heads = int(heads)
    if heads < 1:
        raise PruneSettingError(f"{name or 'model'}: no attention head left after pruning ({proj.out_features} "
                                "query/key/value outputs); keep at least one head per block (lower "
                                "head_pruning_ratio, or prune heads in fewer iterative_steps)")
    return heads
