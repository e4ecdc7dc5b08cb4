"""What the timm families share: blocks in ``model.blocks``, a ``patch_embed``, class-token
attributes, and the reading of a block's FFN (:func:`~jas_prune.models.ffn.timm_mlp_ffn`)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .ffn import FFNInfo, FFNLayer, timm_mlp_ffn

__all__ = ["tiny_timm", "timm_image_size", "timm_tokens", "timm_info", "pair", "act_name", "patch_kwargs",
           "factory_args", "tuples"]


def pair(v: Any) -> list[int]:
    """``[h, w]`` from an int or a pair."""
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def timm_image_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)``: ``patch_embed.img_size`` wins over ``pretrained_cfg`` (which keeps timm's
    default when a model is built with an ``img_size`` override)."""
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    chans = int(getattr(proj, "in_channels", 3))
    if img_size is not None:
        h, w = pair(img_size)
        return (chans, h, w)
    return tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))  # type: ignore[return-value]


def timm_tokens(model: nn.Module) -> tuple[bool, int]:
    """(has a class token, number of prefix tokens) of a timm ViT."""
    has_cls = getattr(model, "cls_token", None) is not None
    return has_cls, int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))


def timm_info(model: nn.Module, label: str, family: str,
              layer: Callable[[int, nn.Module], FFNLayer] | None = None) -> FFNInfo:
    """FFNInfo of a timm model whose blocks are ``model.blocks`` (``layer(i, blk)`` reads one)."""
    read = layer or (lambda i, blk: timm_mlp_ffn(i, blk, label))
    layers = tuple(read(i, blk) for i, blk in enumerate(getattr(model, "blocks", ())))
    has_cls, prefix = timm_tokens(model)
    return FFNInfo(layers=layers, has_cls_token=has_cls, num_prefix_tokens=prefix, family=family)


_ACT_NAMES = {"GELU": "gelu", "SiLU": "silu", "QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh",
              "ReLU": "relu", "Sigmoid": "sigmoid"}


def act_name(act: nn.Module) -> str | None:
    """timm's name of an activation module (``gelu``, ``gelu_tanh``, ``silu``...), or None."""
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return _ACT_NAMES.get(name)


def patch_kwargs(model: nn.Module) -> dict[str, Any]:
    """``img_size``, ``patch_size``, ``in_chans``, ``embed_dim`` and ``depth`` of a timm ViT."""
    pe = model.patch_embed
    return {
        "img_size": pair(pe.img_size),
        "patch_size": pair(pe.patch_size),
        "in_chans": int(pe.proj.in_channels),
        "embed_dim": int(getattr(model, "embed_dim", pe.proj.out_channels)),
        "depth": len(model.blocks),
    }


#: factory arguments that are not architecture (or are stored elsewhere in a checkpoint)
_NOT_ARCH = {"num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
             "checkpoint_path", "cache_dir", "features_only", "device", "dtype", "scriptable", "exportable", "no_jit"}


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        items = [_json_value(x) for x in v]
        return None if any(x is _SKIP for x in items) else items
    return _SKIP


_SKIP = object()


def factory_args(model: nn.Module) -> dict[str, Any]:
    """The JSON-representable keyword arguments ``timm.create_model`` was called with (timm
    records them as ``model._model_args`` since 1.0.2x; empty for older timm or other builders)."""
    out: dict[str, Any] = {}
    for key, value in (getattr(model, "_model_args", None) or {}).items():
        if key in _NOT_ARCH or key.endswith("drop_rate"):
            continue
        v = _json_value(value)
        if v is not _SKIP:
            out[key] = v
    return out


def tuples(arch: dict[str, Any]) -> dict[str, Any]:
    """Lists (as JSON stores them) back to tuples, which timm's constructors expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


def tiny_timm(name: str, **overrides: Any) -> nn.Module:
    """A two-block random-init timm model of architecture ``name`` on 32-px images (a family's
    ``example``), fused SwiGLU split as :func:`~jas_prune.models.load_model` does."""
    import timm

    from .ffn import split_fused_glu

    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    model = timm.create_model(name, **{**args, **overrides}).eval()
    split_fused_glu(model)
    return model
