"""Model loading and FFN discovery.

``load_model`` returns a timm ``VisionTransformer`` in eval mode, from a timm name (random init,
local checkpoint, or weights already in the local cache) or the shipped ``builtin:shapes-vit``.
``discover_ffn`` finds, for each block, the ``mlp.fc1 -> mlp.act -> mlp.fc2`` FFN whose hidden
units are the neurons that jas-prune attributes and prunes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, PretrainedUnavailableError, UnsupportedModelError

__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_MODELS",
    "FFNLayer",
    "FFNInfo",
    "load_model",
    "create_model",
    "discover_ffn",
    "load_state_dict_file",
    "load_error_reason",
    "input_size",
    "model_spec",
]

BUILTIN_PREFIX = "builtin:"

#: Architecture of the shipped models: a timm base name plus keyword overrides, the data
#: config timm's ``resolve_data_config`` reads, and the weights file inside the package.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "shapes-vit": {
        "timm_name": "vit_tiny_patch16_224",
        "kwargs": {
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 64,
            "depth": 6,
            "num_heads": 2,
            "mlp_ratio": 4.0,
            "num_classes": 48,
        },
        "pretrained_cfg": {
            "input_size": (3, 32, 32),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
        },
        "weights": "shapes-vit.safetensors",
    }
}


@dataclass(frozen=True)
class FFNLayer:
    """One block's FFN: the neurons are the ``hidden`` outputs of ``act``."""

    index: int
    block: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear

    @property
    def hidden(self) -> int:
        return self.fc1.out_features


@dataclass(frozen=True)
class FFNInfo:
    """FFN layers of a ViT, in block order, and its token layout."""

    layers: tuple[FFNLayer, ...]
    has_cls_token: bool
    num_prefix_tokens: int

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [layer.hidden for layer in self.layers]


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model).__name__
    return str(name)


def discover_ffn(model: nn.Module) -> FFNInfo:
    """Find every block's ``mlp.fc1 -> mlp.act -> mlp.fc2``.

    Raises:
        UnsupportedModelError: the model is not a timm ViT with plain GELU-style FFN blocks, has
            a distillation token, or an FFN that is not ``fc1 -> act -> fc2``.
    """
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    label = _model_label(model)
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model '{label}' ({type(model).__name__}) is not a timm VisionTransformer; "
            "jas-prune supports vit_*, deit_* (no distillation token) and MAE-finetuned ViTs"
        )
    if getattr(model, "dist_token", None) is not None or getattr(model, "head_dist", None) is not None:
        raise UnsupportedModelError(
            f"model '{label}' has a distillation token and two heads; use the non-distilled variant"
        )
    layers = []
    for i, blk in enumerate(model.blocks):
        mlp = getattr(blk, "mlp", None)
        missing = [n for n in ("fc1", "act", "fc2") if mlp is None or not hasattr(mlp, n)]
        if missing or type(mlp) is not Mlp:
            found = type(mlp).__name__ if mlp is not None else "no mlp"
            raise UnsupportedModelError(
                f"model '{label}': block {i} FFN is {found}, not timm Mlp with fc1 -> act -> fc2"
                + (f" (missing {', '.join(missing)})" if missing else "")
            )
        if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise UnsupportedModelError(
                f"model '{label}': block {i} mlp.fc1/mlp.fc2 are not nn.Linear "
                f"({type(mlp.fc1).__name__}, {type(mlp.fc2).__name__})"
            )
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(
                f"model '{label}': block {i} FFN has a hidden norm ({type(mlp.norm).__name__}); "
                "only fc1 -> act -> fc2 FFNs are supported"
            )
        layers.append(FFNLayer(index=i, block=blk, fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2))
    if not layers:
        raise UnsupportedModelError(f"model '{label}' has no transformer blocks")
    has_cls = getattr(model, "cls_token", None) is not None
    return FFNInfo(
        layers=tuple(layers),
        has_cls_token=has_cls,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0)),
    )


def _builtin(name: str) -> dict[str, Any]:
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_MODELS:
        raise UnsupportedModelError(
            f"model.name: unknown built-in model '{name}'; available: "
            + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        )
    return BUILTIN_MODELS[key]


def builtin_weights_path(name: str) -> Path:
    """Path of the weights file shipped for a ``builtin:`` model."""
    entry = _builtin(name)
    return Path(str(resources.files("jas_prune") / "weights" / entry["weights"]))


def create_model(name: str, *, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build the architecture (random init, no weights) for a timm name or a ``builtin:`` name.

    ``overrides`` are passed to ``timm.create_model`` (e.g. a smaller ``mlp_ratio``).
    """
    import timm

    if name.startswith(BUILTIN_PREFIX):
        entry = _builtin(name)
        kwargs = {**entry["kwargs"], **overrides}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = timm.create_model(entry["timm_name"], pretrained=False, **kwargs)
        cfg = dict(model.pretrained_cfg)
        cfg.update(entry["pretrained_cfg"])
        cfg["architecture"] = name
        model.pretrained_cfg = cfg
        model.default_cfg = cfg
        return model
    try:
        kwargs = dict(overrides)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        if not str(exc).startswith("Unknown model"):
            raise
        raise UnsupportedModelError(f"model.name: unknown timm model '{name}'{_name_hint(name)}") from None
    return model


def _name_hint(name: str) -> str:
    """`` (did you mean 'x'?)`` for the closest timm or built-in model name, else ``""``."""
    import difflib

    import timm

    known = timm.list_models() + [BUILTIN_PREFIX + k for k in BUILTIN_MODELS]
    close = difflib.get_close_matches(name.split(".")[0], known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict (optionally nested under
    ``state_dict``/``model``/``model_state``) without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "model_state", "module"):
                if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
            if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"model.checkpoint: {path} does not hold a state dict of tensors")
            return {k.removeprefix("module."): v for k, v in obj.items()}
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt file, truncated download, wrong format
        raise CheckpointError(f"model.checkpoint: cannot read {path}: {load_error_reason(exc)}") from None
    raise CheckpointError(
        f"model.checkpoint: unsupported file type '{suffix}' for {path} "
        "(use .safetensors, .pth/.pt or a big_vision .npz)"
    )


def load_error_reason(exc: BaseException) -> str:
    """Why a weights file could not be read, in one short line (torch's and safetensors' messages
    run over several lines and mostly give advice that does not apply here)."""
    import re

    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds pickled Python objects ({found.group(1)}), not a state dict of tensors; "
                    "save model.state_dict() instead (jas-prune never unpickles code)")
        return "not a PyTorch checkpoint, or a corrupt one (torch.load with weights_only=True cannot parse it)"
    if isinstance(exc, OSError) and exc.filename is None and exc.strerror:  # a reader seeking past the end
        return f"corrupt or truncated file ({exc.strerror})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    first = first.split(". ")[0].rstrip(".")
    return first[:300]


def _head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    w = state.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def _load_weights(model: nn.Module, path: Path, strict_label: str) -> None:
    if path.suffix.lower() == ".npz":
        try:
            model.load_pretrained(str(path))  # timm's big_vision/JAX reader
        except Exception as exc:
            raise CheckpointError(
                f"{strict_label}: cannot load big_vision .npz {path}: {load_error_reason(exc)}") from None
        return
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict_file(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception:  # noqa: BLE001 - already in timm layout
        pass
    own = model.state_dict()
    sizes = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if sizes:
        more = f"; {len(sizes) - 2} more" if len(sizes) > 2 else ""
        raise CheckpointError(f"{strict_label}: {path} does not match the model: {'; '.join(sizes[:2])}{more}")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append("missing " + ", ".join(result.missing_keys[:4]))
    if result.unexpected_keys:
        problems.append("unexpected " + ", ".join(result.unexpected_keys[:4]))
    if problems:
        raise CheckpointError(f"{strict_label}: {path} does not match the model: " + "; ".join(problems))


def _checkpoint_num_classes(path: Path) -> int | None:
    if path.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(str(path)) as z:
                for key in ("head/kernel", "params/head/kernel"):
                    if key in z:
                        return int(z[key].shape[-1])
        except Exception as exc:
            raise CheckpointError(f"model.checkpoint: cannot read {path}: {load_error_reason(exc)}") from None
        return None
    if path.suffix.lower() == ".safetensors" and path.is_file():  # the header is enough
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if "head.weight" not in f.keys():
                    return None
                shape = f.get_slice("head.weight").get_shape()
        except Exception as exc:
            raise CheckpointError(f"model.checkpoint: cannot read {path}: {load_error_reason(exc)}") from None
        return int(shape[0]) if len(shape) == 2 else None
    return _head_classes(load_state_dict_file(path))


def _cached_pretrained_file(model: nn.Module) -> Path | None:
    """The locally cached weights of a timm model's default pretrained tag, if any."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for fname in (cfg.get("hf_hub_filename"), "open_clip_model.safetensors", "model.safetensors",
                      "pytorch_model.bin"):
            if not fname:
                continue
            found = try_to_load_from_cache(hub_id, fname)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = cfg.get("url")
    if url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if hub_dir.is_file():
            return hub_dir
    return None


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """Load a timm ViT in eval mode.

    Args:
        name: timm model name (``vit_base_patch16_224``) or ``builtin:shapes-vit``.
        checkpoint: local ``.safetensors``, ``.pth``/``.pt`` or big_vision ``.npz`` weights.
        pretrained: use timm's pretrained weights, which must already be in the local cache
            (nothing is downloaded).
        num_classes: classifier width; inferred from the checkpoint when not given.

    Raises:
        UnsupportedModelError, CheckpointError, PretrainedUnavailableError
    """
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {ckpt}")
    if name.startswith(BUILTIN_PREFIX):
        if pretrained:
            raise PretrainedUnavailableError(
                f"model.pretrained: '{name}' ships its weights; set pretrained: false"
            )
        if ckpt is None:
            ckpt = builtin_weights_path(name)
            if not ckpt.is_file():
                raise CheckpointError(
                    f"model.name: the weights of '{name}' are missing from the package ({ckpt}); "
                    "reinstall jas-prune or retrain with `jas-prune train`"
                )
    if ckpt is not None:
        in_file = _checkpoint_num_classes(ckpt)
        if num_classes is None:
            num_classes = in_file
        elif in_file is not None and in_file != num_classes:
            raise CheckpointError(
                f"model.num_classes: {num_classes}, but the checkpoint {ckpt} has a {in_file}-class head; "
                "leave model.num_classes unset to use the checkpoint's")
    model = create_model(name, num_classes=num_classes)
    try:
        discover_ffn(model)  # refuse unsupported models early, with the reason
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"model.name: {exc}") from None
    if pretrained and ckpt is None:
        cached = _cached_pretrained_file(model)
        if cached is None:
            raise PretrainedUnavailableError(
                f"model.pretrained: weights for '{name}' are not in the local cache and cannot be "
                "downloaded here; pass a local file instead: model.checkpoint=PATH "
                "(.safetensors, .pth or big_vision .npz), e.g. "
                f"`--set model.pretrained=false --set model.checkpoint=/path/to/{name}.safetensors`"
            )
        ckpt = cached
    if ckpt is not None:
        _load_weights(model, ckpt, "model.checkpoint")
    return model.eval()


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model really takes: ``patch_embed.img_size`` wins over ``pretrained_cfg``,
    which keeps timm's default (224) when a model is built with an ``img_size`` override."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (3, *(int(v) for v in img_size))  # type: ignore[return-value]
    return tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))  # type: ignore[return-value]


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What is needed to rebuild the architecture: name, timm kwargs, data config, FFN widths."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture", type(model).__name__)
    info = discover_ffn(model)
    return {
        "name": arch,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "ffn_widths": info.widths,
        "data_config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.items()
            if k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
        },
    }


def spec_json(model: nn.Module) -> str:
    return json.dumps(model_spec(model), sort_keys=True)
