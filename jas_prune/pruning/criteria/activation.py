"""``activation`` and ``variance``: statistics of each FFN neuron's activation on probe tokens.

Both read one shared activation pass (:meth:`ScoringInputs.activation_stats`), the same one bias
compensation uses.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


def _stat(stats: Mapping[int, Mapping], key: str) -> dict[int, torch.Tensor]:
    return {b: torch.as_tensor(st[key]).float().clone() for b, st in sorted(stats.items())}


def _stats(model: nn.Module, loader: Iterable, classes: Sequence[int] | None, device: torch.device | str | None,
           max_batches: int | None, stats: Mapping[int, Mapping] | None) -> Mapping[int, Mapping]:
    from ..stats import ffn_activation_stats

    return stats or ffn_activation_stats(model, loader, classes=classes, device=device, max_batches=max_batches)


def activation_scores(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                      device: torch.device | str | None = None, max_batches: int | None = None,
                      stats: Mapping[int, Mapping] | None = None) -> dict[int, torch.Tensor]:
    """Mean |activation| of every FFN neuron over probe tokens (pass ``stats`` to reuse a pass)."""
    return _stat(_stats(model, loader, classes, device, max_batches, stats), "mean_abs")


def variance_scores(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                    device: torch.device | str | None = None, max_batches: int | None = None,
                    stats: Mapping[int, Mapping] | None = None) -> dict[int, torch.Tensor]:
    """Activation variance over probe tokens (variance-based pruning, VBP): a low-variance
    neuron is close to a constant, which bias compensation folds into ``fc2.bias``."""
    return _stat(_stats(model, loader, classes, device, max_batches, stats), "var")


@CRITERIA.register
def _activation_criterion() -> Criterion:
    return Criterion(
        name="activation", label="activation", colour="#ff7f0e", needs_data=True,
        score=lambda inputs: CriterionScores(_stat(inputs.activation_stats(), "mean_abs")),
        summary="mean |activation| of each neuron over all probe tokens",
    )


@CRITERIA.register
def _variance_criterion() -> Criterion:
    return Criterion(
        name="variance", label="act. variance", colour="#8c564b", needs_data=True,
        score=lambda inputs: CriterionScores(_stat(inputs.activation_stats(), "var")),
        summary="activation variance over probe tokens (VBP): near-constant neurons go, bias compensation keeps "
                "their mean",
    )
