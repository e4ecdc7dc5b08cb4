"""Loading models: timm names (random init, local weights, weights already in the cache), the
shipped ``builtin:`` models and Hugging Face directories (``hf:DIR``).

Every loaded model is in eval mode, belongs to a supported family (refused early, with the
reason, otherwise) and has its fused GLU FFNs split (:func:`~jas_prune.models.ffn.split_fused_glu`)
so that its neurons can be pruned through Torch-Pruning's dependency graph.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, PretrainedUnavailableError, UnsupportedModelError
from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX
from .families import discover_ffn, family_of
from .ffn import split_fused_glu
from .hf import HF_PREFIX

__all__ = ["create_model", "load_model", "load_state_dict_file", "load_error_reason", "builtin_weights_path",
           "input_size"]


def _package() -> Any:
    """``jas_prune.models`` itself: tests replace its ``builtin_weights_path``."""
    return sys.modules[__name__.rsplit(".", 1)[0]]


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
    except ValueError as exc:  # timm: "... looks like a Hugging Face Hub repo id or a local path"
        if "no source prefix" not in str(exc):
            raise
        what = "a directory" if Path(name).is_dir() else "a path"
        raise UnsupportedModelError(
            f"model.name: '{name}' is {what}, not a timm model name; a Hugging Face model folder is "
            f"'hf:{name}', a weights file goes in model.checkpoint") from None
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


def _filter_fn(model: nn.Module) -> Any:
    """timm's ``checkpoint_filter_fn`` of the model's own module (it maps original layouts, e.g.
    EVA's or BEiT's, onto timm's), or None."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _load_weights(model: nn.Module, path: Path, strict_label: str) -> None:
    if path.suffix.lower() == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"{strict_label}: big_vision .npz weights can be read only into a timm "
                                  f"VisionTransformer, not a {type(model).__name__}; use .safetensors or .pth")
        try:
            model.load_pretrained(str(path))  # timm's big_vision/JAX reader
        except Exception as exc:
            raise CheckpointError(
                f"{strict_label}: cannot load big_vision .npz {path}: {load_error_reason(exc)}") from None
        return
    state = load_state_dict_file(path)
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
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
    """Load a supported ViT in eval mode.

    Args:
        name: timm model name (``vit_base_patch16_224``, ``eva02_tiny_patch14_224``,
            ``beit_base_patch16_224``, ``vit_relpos_medium_patch16_cls_224``...),
            ``builtin:shapes-vit``, or ``hf:/path/to/dir`` (a transformers ViT/DeiT image
            classifier written by ``save_pretrained``; needs ``pip install -e ".[hf]"``).
        checkpoint: local ``.safetensors``, ``.pth``/``.pt`` or big_vision ``.npz`` weights.
        pretrained: use timm's pretrained weights, which must already be in the local cache
            (nothing is downloaded).
        num_classes: classifier width; inferred from the checkpoint when not given.

    Fused GLU FFNs (timm ``GluMlp``/``SwiGLUPacked``, e.g. EVA-02 tiny/small, DINOv2-giant) come
    back split into ``fc1_g``/``fc1_x`` (same outputs), so that their neurons can be pruned.

    Raises:
        UnsupportedModelError, CheckpointError, PretrainedUnavailableError
    """
    if name.startswith(HF_PREFIX):
        from .hf import load_hf

        model = load_hf(name, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes)
        try:
            discover_ffn(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"model.name: {exc}") from None
        return model
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {ckpt}")
    if name.startswith(BUILTIN_PREFIX):
        if pretrained:
            raise PretrainedUnavailableError(
                f"model.pretrained: '{name}' ships its weights; set pretrained: false"
            )
        if ckpt is None:
            ckpt = _package().builtin_weights_path(name)
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
    split_fused_glu(model)
    return model.eval()


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model really takes (its family's reading: ``patch_embed.img_size`` for timm
    models, which wins over ``pretrained_cfg`` when a model is built with an ``img_size``
    override; the config of a Hugging Face model)."""
    family = family_of(model)
    if family is not None:
        return tuple(family.image_size(model))  # type: ignore[return-value]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (3, *(int(v) for v in img_size))  # type: ignore[return-value]
    return tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))  # type: ignore[return-value]
