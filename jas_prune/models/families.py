"""Model families: which models jas-prune understands, and how each one's FFNs are found.

A :class:`Family` is registered once, in the module that implements it (``timm_vit``, ``eva``,
``beit``, ``relpos``, ``hf``); :func:`discover_ffn` asks the registry instead of an if/elif
chain, and an unknown model gets one error naming what was found and what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import UnsupportedModelError
from ..registry import Registry
from .ffn import FFNInfo, check_distinct_sites

__all__ = ["Family", "FAMILIES", "family_of", "discover_ffn", "model_label", "supported_text", "num_outputs",
           "find_vit"]


@dataclass(frozen=True)
class Family:
    """One family of models.

    Attributes:
        name: registry key (``timm-vit``).
        label: what users call it (``timm VisionTransformer``), used in messages.
        matches: whether a model belongs to the family (an ``isinstance`` test, imports lazily).
        discover: ``(model, label) -> FFNInfo`` (raises :class:`UnsupportedModelError`).
        image_size: ``model -> (C, H, W)`` the model takes.
        arch_kwargs: ``model -> dict`` of JSON keyword arguments that, with the architecture
            name, rebuild the model's structure (sizes are restored from the weights).
        decode_arch: ``arch -> timm keyword arguments`` (names of classes back to classes).
        rebuild: ``(name, arch, num_classes) -> model`` when ``create_model`` cannot rebuild it
            (models that are not timm names); None: ``create_model(name, **decode_arch(arch))``.
        head: ``model -> nn.Module`` the classifier.
        example: ``() -> model``, a tiny random-init member (two blocks, a few dozen pixels, no
            download): the tests run every registered family on its example, so a new family is
            tested without being listed anywhere.
        attention: where its heads' parameters are (:class:`~jas_prune.models.heads.AttentionLayout`),
            for attention pruning; None: heads are not pruned in this family.
    """

    name: str
    label: str
    matches: Callable[[nn.Module], bool]
    discover: Callable[[nn.Module, str], FFNInfo]
    image_size: Callable[[nn.Module], tuple[int, int, int]]
    arch_kwargs: Callable[[nn.Module], dict[str, Any]]
    decode_arch: Callable[[Mapping[str, Any]], dict[str, Any]] = dict
    rebuild: Callable[[str, Mapping[str, Any], int], nn.Module] | None = None
    head: Callable[[nn.Module], Any] = lambda m: getattr(m, "head", None)
    example: Callable[[], nn.Module] | None = None
    attention: Any = None


FAMILIES: Registry[Family] = Registry("model family")


def model_label(model: nn.Module) -> str:
    """The architecture name of a model (timm's ``pretrained_cfg``), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return str(name or type(model).__name__)


def num_outputs(model: nn.Module, *, fix: str = "load_model(name, num_classes=N)") -> int:
    """The classifier outputs of ``model``; a model without a classifier is refused, since its
    output is features, not class scores (every probability and label check would be wrong).

    Args:
        fix: how the caller's user gives the model a head, for the message.

    Raises:
        UnsupportedModelError: ``num_classes`` is 0, naming the model and ``fix``.
    """
    n_out = getattr(model, "num_classes", None)
    if isinstance(n_out, int) and n_out <= 0:
        raise UnsupportedModelError(f"model '{model_label(model)}' has no classifier (num_classes {n_out}): its "
                                    f"output is features, not class scores; give it a head with {fix}")
    return int(n_out) if isinstance(n_out, int) else 0


def supported_text() -> str:
    """``timm VisionTransformer, timm Eva, ... or Hugging Face ViT/DeiT`` in registration order."""
    labels = [f.label for f in FAMILIES]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def family_of(model: nn.Module) -> Family | None:
    """The registered family ``model`` belongs to, or None."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    return None


def discover_ffn(model: nn.Module) -> FFNInfo:
    """The FFN layers of a supported ViT and its token layout.

    Raises:
        UnsupportedModelError: the model belongs to no registered family, or to one whose FFN or
            token layout is not supported (the message names what was found).
    """
    label = model_label(model)
    family = family_of(model)
    if family is None:
        first = next(iter(FAMILIES)).label
        raise UnsupportedModelError(
            f"model '{label}' ({type(model).__name__}) is not a {first}; jas-prune supports "
            f"{supported_text()} models (vit_*, deit_* without distillation token, eva02_*, beit*, "
            "vit_relpos_*, hf:DIR)")
    info = family.discover(model, label)
    if not info.layers:
        raise UnsupportedModelError(f"model '{label}' has no transformer blocks")
    check_distinct_sites(info.layers, label)
    return info


def find_vit(model: nn.Module) -> tuple[nn.Module, FFNInfo]:
    """The model itself, or the first supported ViT inside a wrapper, with its FFN layers.

    Raises:
        UnsupportedModelError: neither the model nor any submodule is a supported ViT (the
            model's own reason).
    """
    try:
        return model, discover_ffn(model)
    except UnsupportedModelError as first:
        for sub in model.modules():
            if sub is model or family_of(sub) is None:
                continue
            try:
                return sub, discover_ffn(sub)
            except UnsupportedModelError:
                continue
        raise first from None
