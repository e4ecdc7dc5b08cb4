"""``model``: which model a recipe loads (:func:`jas_prune.models.load_model` reads these)."""

from __future__ import annotations

from pydantic import Field

from ..schema import Strict

__all__ = ["ModelSettings"]


class ModelSettings(Strict):
    """``model``: a timm name, ``builtin:shapes-vit`` or ``hf:DIR``; ``checkpoint`` loads local
    weights, ``num_classes`` gives a new, untrained head."""

    name: str = "builtin:shapes-vit"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = Field(default=None, ge=1)
