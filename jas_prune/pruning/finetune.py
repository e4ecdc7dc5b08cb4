"""The optional short fine-tune after pruning, identical for every criterion."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .graph import find_vit
from .prune import remap_labels

__all__ = ["finetune"]


class _FinetuneBatches:
    """(x, y) batches from a loader of (images, labels, ...), filtered/remapped to a cut head."""

    def __init__(self, loader: Iterable, head_classes: Sequence[int] | None) -> None:
        self.loader = loader
        self.head_classes = list(head_classes) if head_classes is not None else None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        got = False
        for batch in self.loader:
            x, y = batch[0], torch.as_tensor(batch[1])
            if self.head_classes is not None:
                y = remap_labels(y, self.head_classes)
                ok = y >= 0
                if not bool(ok.any()):
                    continue
                x, y = x[ok.to(x.device)], y[ok]
            got = True
            yield x, y
        if not got:
            raise InvalidArgumentError("loader: no training images" + (
                f" of the head's classes {self.head_classes}" if self.head_classes is not None else ""))


def finetune(model: nn.Module, loader: Iterable, *, epochs: float = 1.0, lr: float = 1e-4,
             head_classes: Sequence[int] | None = None, device: torch.device | str = "cpu",
             **fit_settings: Any) -> dict[str, float]:
    """Short fine-tune after pruning, the same for every method (``jas_prune.train.fit``:
    AdamW, warm-up + cosine, label smoothing). With a cut head (``head_classes``, default: the
    model's ``jas_head_classes``) images of other classes are skipped and labels remapped.
    Returns fit's summary; the model is left in eval mode.

    Raises:
        InvalidArgumentError: ``epochs`` < 0, ``lr`` <= 0, or no training image of the head's classes.
    """
    from ..train import FitConfig, fit

    if not epochs >= 0:
        raise InvalidArgumentError(f"epochs: must be >= 0, got {epochs}")
    if not lr > 0:
        raise InvalidArgumentError(f"lr: must be > 0, got {lr}")
    if epochs == 0:
        return {"steps": 0, "loss": math.nan, "seconds": 0.0}
    if head_classes is None:
        vit, _ = find_vit(model)
        head_classes = getattr(vit, "jas_head_classes", None)
    batches = _FinetuneBatches(loader, head_classes)
    return fit(model, batches, FitConfig(epochs=epochs, lr=lr, **fit_settings), device=device, desc="finetune")
