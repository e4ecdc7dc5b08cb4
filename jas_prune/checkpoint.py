"""Pruned checkpoints, saved and loaded without pickle.

A pruned checkpoint holds the state dict, the FFN width of every block, what rebuilds the
architecture (model name, timm keyword arguments read off the model, data config) and, when the
head was cut, the label mapping. Two containers, chosen by the file suffix:

- ``.safetensors``: tensors plus the description as JSON in the safetensors metadata;
- anything else (``.pt``/``.pth``): ``torch.save`` of a dict holding only tensors, str, int,
  float, bool, None, lists and dicts, so ``torch.load(path, weights_only=True)`` reads it.

:func:`load_pruned` creates the architecture, shrinks each block's ``fc1``/``fc2`` to the stored
widths, loads the weights strictly and returns the model in eval mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_write
from .models import create_model, discover_ffn, load_error_reason, model_spec

__all__ = ["FORMAT", "FORMAT_VERSION", "save_pruned", "load_pruned", "read_pruned_meta", "vit_arch_kwargs"]

FORMAT = "jas-prune/pruned-vit"
FORMAT_VERSION = 1
_META_KEY = "jas_prune"


def vit_arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments read off a built model (all but the FFN
    width, which is stored per block)."""
    pe = model.patch_embed
    attn = model.blocks[0].attn
    as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    return {
        "img_size": [int(v) for v in as_list(pe.img_size)],
        "patch_size": [int(v) for v in as_list(pe.patch_size)],
        "in_chans": int(pe.proj.in_channels),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(attn.num_heads),
        "qkv_bias": attn.qkv.bias is not None,
        "class_token": getattr(model, "cls_token", None) is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "global_pool": str(getattr(model, "global_pool", "token")),
        "pre_norm": not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
    }


def _payload(model: nn.Module, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = model_spec(model)
    first_float = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": spec["name"],
        "num_classes": spec["num_classes"],
        "ffn_widths": spec["ffn_widths"],
        "data_config": spec["data_config"],
        "arch": vit_arch_kwargs(model),
        "dtype": str(first_float).removeprefix("torch."),
        "head_classes": getattr(model, "jas_head_classes", None),
        "head_class_names": getattr(model, "jas_head_class_names", None),
        "extra": dict(extra) if extra is not None else {},
    }
    try:
        return json.loads(json.dumps(payload))
    except (TypeError, ValueError) as exc:
        raise ValueError("extra: must hold only JSON values (str, int, float, bool, None, lists, "
                         f"dicts): {exc}") from None


def save_pruned(model: nn.Module, path: str | os.PathLike[str], *,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Save a (pruned) timm ViT without pickle; returns the path written.

    Args:
        model: the ViT, pruned or not; a cut head's mapping (``model.jas_head_classes``) is kept.
        path: ``.safetensors`` or ``.pt``/``.pth``.
        extra: JSON-serialisable information to keep alongside (method, ratio, ...).
    """
    path = Path(path)
    payload = _payload(model, extra)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        meta = {_META_KEY: json.dumps(payload), "format": FORMAT}
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return atomic_write(path, lambda tmp: torch.save({_META_KEY: payload, "state_dict": state}, tmp))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint: file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                raw = meta.get(_META_KEY)
                if raw is None:
                    raise CheckpointError(
                        f"checkpoint: {path} is not a jas-prune pruned checkpoint (no '{_META_KEY}' metadata); "
                        "load a dense state dict with jas_prune.load_model(name, checkpoint=...)")
                payload = json.loads(raw)
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping) or _META_KEY not in obj or "state_dict" not in obj:
                raise CheckpointError(
                    f"checkpoint: {path} is not a jas-prune pruned checkpoint (no '{_META_KEY}' entry); "
                    "load a dense state dict with jas_prune.load_model(name, checkpoint=...)")
            payload, state = obj[_META_KEY], obj["state_dict"]
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, corrupt, not a checkpoint at all
        raise CheckpointError(f"checkpoint: cannot read {path}: {load_error_reason(exc)}") from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(f"checkpoint: {path} has an unknown format {found!r}")
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} was written by a newer jas-prune (format version "
                              f"{payload.get('version')}); upgrade jas-prune")
    for key in ("name", "ffn_widths", "arch"):
        if key not in payload:
            raise CheckpointError(f"checkpoint: {path} lacks '{key}'")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint: {path} does not hold a state dict of tensors")
    return dict(payload), dict(state)


def read_pruned_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The description stored in a pruned checkpoint (name, widths, arch, data config, head
    mapping, ``extra``), without building the model."""
    payload, _ = _read(Path(path))
    return payload


def _shrink_ffn(model: nn.Module, widths: list[int], path: Path) -> None:
    info = discover_ffn(model)
    if len(widths) != info.depth:
        raise CheckpointError(f"checkpoint: {path} stores {len(widths)} FFN widths for a model with "
                              f"{info.depth} blocks")
    for layer, w in zip(info.layers, widths):
        w = int(w)
        if w < 1:
            raise CheckpointError(f"checkpoint: {path} stores FFN width {w} for block {layer.index}")
        if w == layer.hidden:
            continue
        mlp = layer.block.mlp
        fc1, fc2 = layer.fc1, layer.fc2
        mlp.fc1 = nn.Linear(fc1.in_features, w, bias=fc1.bias is not None,
                            device=fc1.weight.device, dtype=fc1.weight.dtype)
        mlp.fc2 = nn.Linear(w, fc2.out_features, bias=fc2.bias is not None,
                            device=fc2.weight.device, dtype=fc2.weight.dtype)


def load_pruned(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a pruned timm ViT saved by :func:`save_pruned`, in eval mode.

    The result carries ``jas_head_classes`` / ``jas_head_class_names`` when its head was cut
    (new output j = original class ``jas_head_classes[j]``) and ``jas_checkpoint_extra``.

    Raises:
        CheckpointError: missing, corrupt or mismatching file (names the file).
    """
    path = Path(path)
    payload, state = _read(path)
    arch = dict(payload["arch"])
    for key in ("img_size", "patch_size"):
        if isinstance(arch.get(key), list):
            arch[key] = tuple(arch[key])
    try:
        model = create_model(str(payload["name"]), num_classes=int(payload.get("num_classes") or 0), **arch)
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path}: cannot rebuild '{payload['name']}': {exc}") from None
    try:
        _shrink_ffn(model, list(payload["ffn_widths"]), path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path}: {exc}") from None
    dtype = getattr(torch, str(payload.get("dtype", "float32")), torch.float32)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model.to(dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise CheckpointError(
            f"checkpoint: {path} does not match the architecture it describes: {msg[:600]}") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key, value in (payload.get("data_config") or {}).items():
        cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg["architecture"] = payload["name"]
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    if payload.get("head_classes") is not None:
        model.jas_head_classes = [int(c) for c in payload["head_classes"]]
    if payload.get("head_class_names") is not None:
        model.jas_head_class_names = [str(c) for c in payload["head_class_names"]]
    model.jas_checkpoint_extra = dict(payload.get("extra") or {})
    return model.to(device).eval()
