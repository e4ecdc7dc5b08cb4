"""Probe batches and FFN activation statistics for the data-driven criteria.

:func:`iter_batches` is how every criterion reads the probe loader: ``(images, labels)`` on the
scoring device, optionally only the images of some classes (class-specialised pruning).
:func:`ffn_activation_stats` is the one activation pass that the ``activation`` and ``variance``
criteria and bias compensation share.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["ActivationStats", "ffn_activation_stats", "iter_batches", "device_of", "no_images", "forward_probe"]

#: per-block activation statistics as returned by :func:`jas_prune.neurons.activation_stats`:
#: ``{"mean_abs": [n], "mean": [n], "var": [n], "count": int}``
ActivationStats = dict[str, Any]


def no_images(classes: Sequence[int] | None) -> InvalidArgumentError:
    """The error for a loader that yielded nothing (of ``classes``)."""
    return InvalidArgumentError("loader: no images" + (f" of classes {list(classes)}" if classes is not None else ""))


def device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, or the model's when None."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def iter_batches(loader: Iterable, *, classes: Sequence[int] | None = None,
                 device: torch.device | str = "cpu", max_batches: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) on ``device`` from batches ``(images, labels, ...)``, optionally only the
    images whose label is in ``classes`` (batches left empty are skipped).

    Raises:
        InvalidArgumentError: a batch that is not an ``(images, labels, ...)`` tuple.
    """
    keep = None if classes is None else torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.long)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InvalidArgumentError("loader: batches must be (images, labels, ...) tuples")
        images, labels = batch[0], torch.as_tensor(batch[1])
        if keep is not None:
            mask = torch.isin(labels.cpu(), keep)
            if not bool(mask.any()):
                continue
            images, labels = images[mask.to(images.device)], labels[mask.to(labels.device)]
        yield images.to(device), labels.to(device)


def forward_probe(model: nn.Module, loader: Iterable, hooks: Sequence[Any], *, classes: Sequence[int] | None = None,
                  device: torch.device | str = "cpu", max_batches: int | None = None) -> int:
    """One forward pass over the probe images (of ``classes``) without gradients, in eval mode,
    for the statistics the registered forward ``hooks`` gather; the hooks are removed after.
    Returns the number of images.

    Raises:
        InvalidArgumentError: the loader yielded no image (of ``classes``).
    """
    from ..torchutil import frozen_eval

    seen = 0
    try:
        with torch.no_grad(), frozen_eval(model):
            for images, _ in iter_batches(loader, classes=classes, device=device, max_batches=max_batches):
                model(images)
                seen += len(images)
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise no_images(classes)
    return seen


class _Batches:
    """Re-iterable view of :func:`iter_batches` that counts the images it yields."""

    def __init__(self, loader: Iterable, **kwargs: Any) -> None:
        self.loader, self.kwargs, self.seen = loader, kwargs, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in iter_batches(self.loader, **self.kwargs):
            self.seen += len(labels)
            yield images, labels


def ffn_activation_stats(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                         device: torch.device | str | None = None, max_batches: int | None = None
                         ) -> dict[int, ActivationStats]:
    """Mean, mean |.| and variance of every FFN neuron over all tokens of the probe images
    (optionally only those of ``classes``): :func:`jas_prune.neurons.activation_stats` at scope
    ``all`` (structured pruning removes a neuron at every token position).

    Raises:
        InvalidArgumentError: the loader yielded no image (of ``classes``).
    """
    from ..neurons import activation_stats

    dev = device_of(model, device)
    batches = _Batches(loader, classes=classes, device=dev, max_batches=max_batches)
    try:
        return activation_stats(model, batches, dev, scope="all")
    except ValueError:
        if batches.seen == 0:
            raise no_images(classes) from None
        raise
