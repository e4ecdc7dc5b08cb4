"""``vit_slim``: ViT-Slim-style learned soft mask over the FFN neurons.

One scale per FFN neuron (init 1) multiplies the output of ``blk.mlp.act``; the scales alone are
trained (model parameters frozen, eval mode) with Adam on cross-entropy + λ·Σ|scale| over the
probe data; the score is |scale|.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from pydantic import Field
from torch import nn

from ...errors import InvalidArgumentError
from ...schema import Strict
from ..choices import EPOCHS_MAX
from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


class VitSlimOptions(Strict):
    """``prune.vit_slim``: the soft-mask training."""

    #: weight of the L1 penalty on the scales (recipe key ``lambda``)
    lambda_: float = Field(default=1e-4, ge=0.0, alias="lambda", allow_inf_nan=False)
    #: passes over the probe data (fractional allowed)
    epochs: float = Field(default=3.0, gt=0.0, le=EPOCHS_MAX, allow_inf_nan=False)
    #: Adam learning rate of the scales
    lr: float = Field(default=1e-2, gt=0.0, allow_inf_nan=False)


def vit_slim_scores(model: nn.Module, loader: Iterable, *, lam: float = 1e-4, epochs: float = 3.0,
                    lr: float = 1e-2, classes: Sequence[int] | None = None,
                    device: torch.device | str | None = None, max_steps: int | None = None) -> dict[int, torch.Tensor]:
    """Learned per-neuron scales (see the module docstring): ``epochs`` passes over the probe
    data (at most ``max_steps`` optimiser steps); the model is left as it was.

    Raises:
        InvalidArgumentError: ``lam`` < 0, ``epochs`` or ``lr`` <= 0, no probe image (of ``classes``).
    """
    from ..graph import find_vit
    from ..stats import device_of

    _, info = find_vit(model)
    dev = device_of(model, device)
    scales = {l.index: nn.Parameter(torch.ones(l.hidden, device=dev)) for l in info.layers}

    def hook_for(block: int):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return out * scales[block]
        return hook

    def install() -> list[Any]:
        return [l.act.register_forward_hook(hook_for(l.index)) for l in info.layers]

    train_soft_masks(model, loader, list(scales.values()), install, lam=lam, epochs=epochs, lr=lr, classes=classes,
                     device=dev, max_steps=max_steps)
    return {b: s.detach().abs().float().cpu() for b, s in scales.items()}


def train_soft_masks(model: nn.Module, loader: Iterable, scales: list[nn.Parameter], install: Any, *,
                     lam: float, epochs: float, lr: float, classes: Sequence[int] | None,
                     device: torch.device | str, max_steps: int | None = None) -> None:
    """Train ``scales`` alone (model frozen, eval mode) with Adam on cross-entropy + λ·Σ|scale|,
    with the hooks ``install()`` returns applying them (removed afterwards).

    Raises:
        InvalidArgumentError: ``lam`` < 0, ``epochs`` or ``lr`` <= 0, no probe image (of ``classes``).
    """
    from ...torchutil import frozen_eval
    from ..stats import iter_batches, no_images

    dev = device
    if lam < 0:
        raise InvalidArgumentError(f"lam: must be >= 0, got {lam}")
    if not epochs > 0:
        raise InvalidArgumentError(f"epochs: must be > 0, got {epochs}")
    if not lr > 0:
        raise InvalidArgumentError(f"lr: must be > 0, got {lr}")
    handles = install()
    opt = torch.optim.Adam(scales, lr=lr)
    try:
        with frozen_eval(model):
            try:
                per_epoch = len(loader)  # type: ignore[arg-type]
            except TypeError:
                per_epoch = None
            total = (max(1, math.ceil(epochs * per_epoch)) if per_epoch else None)
            if max_steps is not None:
                total = max_steps if total is None else min(total, max_steps)
            step, passes = 0, 0
            while total is None or step < total:
                got = False
                for images, labels in iter_batches(loader, classes=classes, device=dev):
                    got = True
                    loss = nn.functional.cross_entropy(model(images), labels)
                    loss = loss + lam * sum(s.abs().sum() for s in scales)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    if total is not None and step >= total:
                        break
                passes += 1
                if not got:
                    raise no_images(classes)
                if total is None and passes >= max(1, math.ceil(epochs)):
                    break
    finally:
        for h in handles:
            h.remove()


def _score(inputs: ScoringInputs) -> CriterionScores:
    opts = inputs.options_as(VitSlimOptions, "vit_slim")
    return CriterionScores(vit_slim_scores(inputs.model, inputs.require_loader("vit_slim"), lam=float(opts.lambda_),
                                           epochs=float(opts.epochs), lr=float(opts.lr), classes=inputs.classes,
                                           device=inputs.device))


@CRITERIA.register
def _vit_slim_criterion() -> Criterion:
    return Criterion(
        name="vit_slim", label="ViT-Slim", colour="#1f77b4", needs_data=True, score=_score, options=VitSlimOptions,
        summary="ViT-Slim-style soft mask: per-neuron scales trained with cross-entropy + λ·Σ|scale|, score |scale|",
    )
