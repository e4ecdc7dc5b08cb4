"""``random``: seeded uniform scores, the floor every criterion should beat."""

from __future__ import annotations

import torch
from torch import nn

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


def random_scores(model: nn.Module, *, seed: int = 0) -> dict[int, torch.Tensor]:
    """Uniform random scores, reproducible for a seed (independent of the global RNG)."""
    from ..graph import find_vit

    _, info = find_vit(model)
    gen = torch.Generator().manual_seed(int(seed))
    return {l.index: torch.rand(l.hidden, generator=gen) for l in info.layers}


@CRITERIA.register
def _random_criterion() -> Criterion:
    return Criterion(
        name="random", label="random", colour="#7f7f7f", needs_data=False,
        score=lambda inputs: CriterionScores(random_scores(inputs.model, seed=inputs.seed)),
        summary="uniform random scores, seeded by runtime.seed",
    )
