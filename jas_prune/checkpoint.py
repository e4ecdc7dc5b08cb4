"""Pruned checkpoints, saved and loaded without pickle.

A pruned checkpoint holds the weights (the state dict, plus the model's non-persistent buffers
such as RoPE tables and relative-position indices), and a JSON description: the model family,
architecture name and keyword arguments that rebuild its *structure*, every FFN's width and kind,
the attention geometry (``num_heads``, ``head_dim``... of every module that has them: Torch-Pruning
may have pruned heads), structural transforms applied after building (fused GLU FFNs split), the
data config, the class names and, when the head was cut, the label mapping. Every *size* comes
from the weights themselves, so whatever Torch-Pruning removed (FFN neurons, heads, head
dimensions, the embedding) is rebuilt. Two containers, chosen by the file suffix:

- ``.safetensors``: tensors plus the description as JSON in the safetensors metadata;
- anything else (``.pt``/``.pth``): ``torch.save`` of a dict holding only tensors, str, int,
  float, bool, None, lists and dicts, so ``torch.load(path, weights_only=True)`` reads it.

:func:`load_pruned` builds the dense architecture, applies the transforms, resizes every module
whose stored tensors differ in shape (``nn.Linear``, ``nn.LayerNorm``, ``nn.Conv2d`` and bare
parameters), restores the attention geometry, loads the weights strictly and returns the model in
eval mode.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import CheckpointError, InvalidArgumentError
from .io import atomic_write
from .models import FAMILIES, create_model, discover_ffn, load_error_reason, model_spec, split_fused_glu
from .models.elastic import TRANSFORM, make_attention_elastic

log = logging.getLogger("jas_prune")

__all__ = ["FORMAT", "FORMAT_VERSION", "save_pruned", "load_pruned", "read_pruned_meta", "vit_arch_kwargs",
           "GEOMETRY_ATTRS"]

FORMAT = "jas-prune/pruned-vit"
#: 2: family, FFN kinds, attention geometry, transforms, class names, non-persistent buffers
FORMAT_VERSION = 2
_META_KEY = "jas_prune"
#: state-dict prefix of the non-persistent buffers kept in the file
_BUFFER_PREFIX = "jas_prune.buffers."

#: module attributes that describe a pruned geometry (read and restored for every module)
GEOMETRY_ATTRS = ("num_heads", "head_dim", "attn_dim", "scale", "kv_dim", "num_kv_heads", "num_kv_groups",
                  "num_attention_heads", "attention_head_size", "all_head_size", "scaling",
                  "embed_dim", "num_features", "head_hidden_size", "num_classes")
#: attention modules whose geometry must fit their projection: (projection, heads attribute, head
#: size attribute, total attribute or None, projections fused in it). Torch-Pruning's own ViT
#: example sets ``num_heads`` and ``head_dim`` after pruning heads but not timm's ``attn_dim``.
_ATTENTION = (("qkv", "num_heads", "head_dim", "attn_dim", 3),
              ("q_proj", "num_attention_heads", "head_dim", None, 1))
#: structural transforms a model may carry (``model.jas_transforms``) and how to redo them
_TRANSFORMS = {"split_fused_glu": split_fused_glu, TRANSFORM: make_attention_elastic}


def vit_arch_kwargs(model: nn.Module) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments read off a built model (kept for callers of
    the first format; see :func:`jas_prune.models.model_spec` for every family)."""
    from .models.timm_vit import arch_kwargs

    return arch_kwargs(model)


def _geometry(model: nn.Module) -> dict[str, dict[str, int | float]]:
    out: dict[str, dict[str, int | float]] = {}
    for name, module in model.named_modules():
        attrs = {a: v for a in GEOMETRY_ATTRS
                 if isinstance(v := module.__dict__.get(a), (int, float)) and not isinstance(v, bool)}
        if attrs:
            out[name] = attrs
    return out


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _fit_attention(geometry: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]], where: str,
                   model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """The attention geometry checked against the projection weights.

    A total that disagrees with heads x head size (timm's ``attn_dim`` after Torch-Pruning's own
    head loop) is repaired from the weights, in ``model`` too when given, with a warning;
    heads x head size that does not fit the projection cannot be repaired.

    Raises:
        CheckpointError: naming the block, the attributes and the projection's size.
    """
    out = {name: dict(attrs) for name, attrs in geometry.items()}
    repairs = []
    for name, attrs in out.items():
        for proj, heads_key, dim_key, total_key, fused in _ATTENTION:
            shape = shapes.get(f"{name}.{proj}.weight" if name else f"{proj}.weight")
            heads, dim = attrs.get(heads_key), attrs.get(dim_key)
            if shape is None or not isinstance(heads, int) or not isinstance(dim, int) or "num_kv_heads" in attrs:
                continue
            if heads < 1 or fused * heads * dim != shape[0]:
                raise CheckpointError(
                    f"{where}: {name}: {heads_key} {heads} x {dim_key} {dim} does not fit its {proj} weight "
                    f"({shape[0]} outputs{f' = {fused} x heads x head size' if fused > 1 else ''}); set both "
                    "from the pruned weights (jas_prune.pruning.graph.update_attention_geometry) and save again")
            if total_key is not None and isinstance(attrs.get(total_key), int) and attrs[total_key] != heads * dim:
                repairs.append((name, total_key, attrs[total_key], heads_key, dim_key, heads * dim, proj))
                attrs[total_key] = heads * dim
    for name, total_key, was, heads_key, dim_key, now, proj in repairs:  # all checked: nothing refused
        log.warning("%s: %s.%s was %d, not %s x %s = %d (Torch-Pruning's head loop sets only those two); "
                    "repaired from the %s weight", where, name, total_key, was, heads_key, dim_key, now, proj)
        if model is not None:
            setattr(model.get_submodule(name), total_key, now)
    return out


def _non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        for buf in getattr(module, "_non_persistent_buffers_set", ()):
            t = module._buffers.get(buf)
            if isinstance(t, torch.Tensor):
                out[f"{mod_name}.{buf}" if mod_name else buf] = t
    return out


def _class_names(model: nn.Module, extra: Mapping[str, Any] | None,
                 given: Sequence[str] | None) -> list[str] | None:
    """Names of the original classifier outputs, when known and consistent with the model."""
    head_classes = getattr(model, "jas_head_classes", None)
    count = int(getattr(model, "num_classes", 0))
    candidates = [("class_names", given), ("model", getattr(model, "jas_class_names", None)),
                  ("extra", (extra or {}).get("class_names"))]
    for source, names in candidates:
        if names is None:
            continue
        names = [str(n) for n in names]
        fits = (len(names) > max(head_classes)) if head_classes else (len(names) == count)
        if fits:
            return names
        if source == "class_names":
            what = f"the original labels {max(head_classes) + 1}+" if head_classes else f"{count} outputs"
            raise InvalidArgumentError(f"class_names: {len(names)} names for a head with {what}")
    return None


def _payload(model: nn.Module, extra: Mapping[str, Any] | None, class_names: Sequence[str] | None) -> dict[str, Any]:
    spec = model_spec(model)
    first_float = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": spec["name"],
        "family": spec["family"],
        "num_classes": spec["num_classes"],
        "ffn_widths": spec["ffn_widths"],
        "ffn_kinds": spec["ffn_kinds"],
        "data_config": spec["data_config"],
        "arch": spec["arch"],
        "geometry": _fit_attention(_geometry(model), _shapes(model.state_dict()), "save_pruned", model),
        "transforms": list(getattr(model, "jas_transforms", []) or []),
        "dtype": str(first_float).removeprefix("torch."),
        "class_names": _class_names(model, extra, class_names),
        "head_classes": getattr(model, "jas_head_classes", None),
        "head_class_names": getattr(model, "jas_head_class_names", None),
        "extra": dict(extra) if extra is not None else {},
    }
    try:
        return json.loads(json.dumps(payload))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError("extra: must hold only JSON values (str, int, float, bool, None, lists, "
                                   f"dicts): {exc}") from None


def save_pruned(model: nn.Module, path: str | os.PathLike[str], *,
                extra: Mapping[str, Any] | None = None, class_names: Sequence[str] | None = None) -> Path:
    """Save a (pruned) supported ViT without pickle; returns the path written.

    Args:
        model: the model, pruned or not (FFN neurons, heads, embedding: any shape Torch-Pruning
            changed is kept); a cut head's mapping (``model.jas_head_classes``) is kept.
        path: ``.safetensors`` or ``.pt``/``.pth``.
        extra: JSON-serialisable information to keep alongside (method, ratio, ...).
        class_names: names of the original classifier outputs (default: the model's
            ``jas_class_names``, else ``extra["class_names"]`` when it fits the head).

    Raises:
        InvalidArgumentError: ``extra`` that is not JSON, ``class_names`` that do not fit the head.
        UnsupportedModelError: not a supported model.
    """
    path = Path(path)
    payload = _payload(model, extra, class_names)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, buf in _non_persistent(model).items():
        state[_BUFFER_PREFIX + name] = buf.detach().cpu().contiguous().clone()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        meta = {_META_KEY: json.dumps(payload)}  # one key: safetensors orders several at random
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return atomic_write(path, lambda tmp: torch.save({_META_KEY: payload, "state_dict": state}, tmp))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    """The description stored in a pruned checkpoint (name, family, widths, arch, geometry, data
    config, class names, head mapping, ``extra``), without building the model."""
    payload, _ = _read(Path(path))
    return payload


# -- rebuilding --------------------------------------------------------------------------------


def _build(payload: Mapping[str, Any], path: Path) -> nn.Module:
    """The dense architecture the checkpoint describes, with its transforms applied."""
    family_name = str(payload.get("family") or "timm-vit")
    if family_name not in FAMILIES:
        raise CheckpointError(f"checkpoint: {path} is of an unknown model family {family_name!r}")
    family = FAMILIES.get(family_name)
    name, num_classes = str(payload["name"]), int(payload.get("num_classes") or 0)
    try:
        if family.rebuild is not None:
            model = family.rebuild(name, payload["arch"], num_classes)
        else:
            model = create_model(name, num_classes=num_classes, **family.decode_arch(payload["arch"]))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path}: cannot rebuild '{name}': {exc}") from None
    for transform in payload.get("transforms") or []:
        if transform not in _TRANSFORMS:
            raise CheckpointError(f"checkpoint: {path} needs an unknown transform {transform!r}")
        _TRANSFORMS[transform](model)
    return model


def _set_dims(module: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    """Keep a resized module's size attributes in line with its new weights."""
    if isinstance(module, nn.Linear) and attr == "weight":
        module.out_features, module.in_features = shape
    elif isinstance(module, nn.Linear) and attr == "bias":
        module.out_features = shape[0]
    elif isinstance(module, nn.LayerNorm) and attr in ("weight", "bias"):
        module.normalized_shape = tuple(shape)
    elif isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
        module.out_channels, module.in_channels = shape[0], shape[1] * module.groups


def _resize(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Give every parameter/buffer named in ``shapes`` that shape (empty values; loaded after)."""
    for key, shape in shapes.items():
        mod_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue  # reported by the strict load, with every other missing key
        current = module._parameters.get(attr, module._buffers.get(attr))
        if not isinstance(current, torch.Tensor) or tuple(current.shape) == tuple(shape):
            continue
        new = torch.empty(shape, dtype=current.dtype, device=current.device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=current.requires_grad)
        else:
            module._buffers[attr] = new
        _set_dims(module, attr, tuple(shape))


def _restore_geometry(model: nn.Module, geometry: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    for mod_name, attrs in geometry.items():
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise CheckpointError(f"checkpoint: {path} describes module '{mod_name}', which the rebuilt "
                                  "model does not have") from None
        for attr, value in attrs.items():
            if attr not in GEOMETRY_ATTRS or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"checkpoint: {path}: geometry {mod_name}.{attr} = {value!r} is not allowed")
            setattr(module, attr, value)


def load_pruned(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned`, in eval mode.

    The result carries ``jas_class_names`` (names of the original classifier outputs, when
    known), ``jas_head_classes`` / ``jas_head_class_names`` when its head was cut (new output j
    = original class ``jas_head_classes[j]``) and ``jas_checkpoint_extra``.

    Raises:
        CheckpointError: missing, corrupt or mismatching file (names the file).
    """
    path = Path(path)
    payload, state = _read(path)
    buffers = {k[len(_BUFFER_PREFIX):]: v for k, v in state.items() if k.startswith(_BUFFER_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_BUFFER_PREFIX)}
    model = _build(payload, path)
    widths = list(payload["ffn_widths"])
    depth = discover_ffn(model).depth
    if len(widths) != depth:
        raise CheckpointError(f"checkpoint: {path} stores {len(widths)} FFN widths for a model with {depth} blocks")
    _resize(model, {**{k: tuple(v.shape) for k, v in state.items()},
                    **{k: tuple(v.shape) for k, v in buffers.items()}}, path)
    geometry = _fit_attention(payload.get("geometry") or {}, _shapes(state), f"checkpoint: {path}")
    _restore_geometry(model, geometry, path)
    dtype = getattr(torch, str(payload.get("dtype", "float32")), torch.float32)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model.to(dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise CheckpointError(
            f"checkpoint: {path} does not match the architecture it describes: {msg[:600]}") from None
    with torch.no_grad():
        for key, value in buffers.items():
            mod_name, _, attr = key.rpartition(".")
            try:
                module = model.get_submodule(mod_name)
            except AttributeError:
                raise CheckpointError(f"checkpoint: {path} holds buffer '{key}', which the rebuilt model "
                                      "does not have") from None
            if attr in module._buffers:
                module._buffers[attr] = value.to(module._buffers[attr].device if module._buffers[attr] is not None
                                                 else "cpu")
    got = discover_ffn(model).widths
    if got != [int(w) for w in widths]:
        raise CheckpointError(f"checkpoint: {path} does not match the architecture it describes: FFN widths "
                              f"{widths} stored, the weights give {got}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key, value in (payload.get("data_config") or {}).items():
        cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg["architecture"] = payload["name"]
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    if payload.get("class_names") is not None:
        model.jas_class_names = [str(c) for c in payload["class_names"]]
    if payload.get("head_classes") is not None:
        model.jas_head_classes = [int(c) for c in payload["head_classes"]]
    if payload.get("head_class_names") is not None:
        model.jas_head_class_names = [str(c) for c in payload["head_class_names"]]
    if payload.get("transforms"):
        model.jas_transforms = list(payload["transforms"])
    model.jas_checkpoint_extra = dict(payload.get("extra") or {})
    return model.to(device).eval()
