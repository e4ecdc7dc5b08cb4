"""``magnitude``: Torch-Pruning group magnitude of each FFN neuron (no data needed)."""

from __future__ import annotations

import torch
from torch import nn

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


def magnitude_scores(model: nn.Module, example_inputs: torch.Tensor | None = None, *, p: int = 2) -> dict[int, torch.Tensor]:
    """Group magnitude (L2 by default) of each FFN neuron's group: its ``fc1`` row and ``fc2``
    column (``tp.importance.GroupMagnitudeImportance``, mean group reduction, no normaliser)."""
    import torch_pruning as tp

    from ..graph import fc1_groups

    scorer = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)
    return {b: scorer(g).detach().float().cpu() for b, g in fc1_groups(model, example_inputs)}


@CRITERIA.register
def _magnitude_criterion() -> Criterion:
    return Criterion(
        name="magnitude", label="magnitude", colour="#2ca02c", needs_data=False,
        score=lambda inputs: CriterionScores(magnitude_scores(inputs.model, inputs.example_inputs)),
        summary="Torch-Pruning group L2 magnitude of each neuron's fc1 row and fc2 column",
    )
