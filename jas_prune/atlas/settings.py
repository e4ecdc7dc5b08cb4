"""The recipe's ``report`` section: which extra parts ``recipe run`` builds next to ``report.md``.

``report.atlas`` turns the neuron atlas on: ``true`` (every default), ``false``/absent (off), or
a mapping of :class:`AtlasSettings`. Validated once here; the recipe schema only names
:class:`ReportSettings`.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import ConfigDict, Field, field_validator

from ..schema import Strict, each_once

__all__ = ["AtlasSettings", "ReportSettings"]


class AtlasSettings(Strict):
    """What the neuron atlas shows (``jas-prune atlas`` takes the same values as options).

    Attributes:
        images: top-activating probe images shown per neuron (k).
        classes: class names or indices, each once; None: every class with probe images, up
            to ``max_classes`` (the best-populated ones beyond that).
        max_classes: the cap on classes when ``classes`` is None (one figure and one page
            section per class).
        batch_size: images per forward of the activation pass (None: the recipe's
            ``data.batch_size``).
    """

    model_config = ConfigDict(strict=True)

    images: int = Field(default=6, ge=1, le=64)
    classes: list[Union[int, str]] | None = None
    max_classes: int = Field(default=64, ge=1, le=1000)
    batch_size: int | None = Field(default=None, ge=1, le=4096)

    @field_validator("classes")
    @classmethod
    def _each_once(cls, v: Any) -> Any:
        return each_once(v, "must name at least one class, each once (or be null for every class)")


class ReportSettings(Strict):
    """``report``: optional parts of the run's report."""

    model_config = ConfigDict(strict=True)

    atlas: AtlasSettings | None = None

    @field_validator("atlas", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        """``atlas: true`` means every default, ``false`` off."""
        if value is True:
            return {}
        if value is False:
            return None
        return value
