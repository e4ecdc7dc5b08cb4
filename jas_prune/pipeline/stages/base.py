"""The stage registry: one :class:`Stage` per module of this package, run in ``order``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ...recipe import Recipe
    from ..context import RunContext

__all__ = ["Stage", "STAGES"]


def _nothing_to_check(recipe: "Recipe") -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One step of ``jas-prune recipe run``.

    Attributes:
        name: short name (logs, docs).
        summary: what it does and writes, one line.
        enabled: whether the recipe asks for it.
        run: do the work on the context; results go into ``ctx.metrics`` and the run directory.
        check: refuse, before any work, a recipe that enables the stage without what it needs
            (raises :class:`~jas_prune.errors.StageNotAvailableError` naming the key).
        shared: every torchrun rank runs it (locating); other stages run on rank 0 alone, after
            every shared stage.
        order: its place in the run, lowest first (the stages so far are 10, 20, ... 80, atlas 45: a new
            one takes a number between its neighbours).
    """

    name: str
    summary: str
    enabled: Callable[["Recipe"], bool]
    run: Callable[["RunContext"], None]
    check: Callable[["Recipe"], None] = _nothing_to_check
    shared: bool = False
    order: int = 0


STAGES: Registry[Stage] = Registry("stage", order=lambda stage: stage.order)
