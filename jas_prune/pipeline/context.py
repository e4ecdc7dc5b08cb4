"""What the stages of one run share: :class:`RunContext`."""

from __future__ import annotations

import dataclasses

import functools
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attribution import ResolvedSettings
from ..data import DataSource, ImageDataset, make_loader
from ..distributed import Dist
from ..io import atomic_write_json
from ..metrics import Metrics, PaperMetrics
from ..pruning.settings import ResolvedPrune
from ..recipe import Recipe
from ..rundir import RunDir

__all__ = ["RunContext", "resolve_device", "seed_everything"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when usable, else CPU; ``cuda`` without CUDA is a user error."""
    from ..errors import StageNotAvailableError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageNotAvailableError("runtime.device: 'cuda' requested but CUDA is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """The recipe, the run directory, the model, the data and the metrics of one run.

    Attributes:
        locate: the recipe's attribution settings, resolved against the model once (``None``
            without an ``attribution`` section).
        prune: the recipe's prune settings, resolved against the model and data once (``None``
            without a ``prune`` section).
        scores: per-neuron scores of data-driven criteria by (method, classes), computed once per run
            (the prune and CLS-mask stages share ViT-Slim's trained scales, for example).
    """

    recipe: Recipe
    run: RunDir
    device: torch.device
    model: nn.Module
    source: DataSource
    transform: Any
    metrics: Metrics = field(default_factory=Metrics)
    locate: ResolvedSettings | None = None
    prune: ResolvedPrune | None = None
    scores: dict[tuple, Any] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)
    #: continuing an interrupted run (``--resume``): finished work is kept
    resume: bool = False

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the model's weights (``pathstore.weights_digest``), computed once per run."""
        from ..pathstore import weights_digest

        return weights_digest(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.recipe.runtime.dtype)

    def criterion(self, method: str, classes: list[int] | None = None, **inputs: Any) -> Any:
        """A pruning criterion's :class:`~jas_prune.pruning.criteria.CriterionScores` on the probe
        data (of ``classes``), computed once per (method, classes) and shared by the stages.

        Args:
            inputs: more :class:`~jas_prune.pruning.criteria.ScoringInputs` fields
                (``example_inputs``, ``stats``, ``masks``).
        """
        from ..pruning.criteria import CRITERIA, ScoringInputs

        key = (method, None if classes is None else tuple(classes))
        if key not in self.scores:
            options = self.prune.settings.options_for(method) if self.prune is not None else None
            loader, _ = self.loader("probe", classes)
            self.scores[key] = CRITERIA.get(method, "prune.methods").score(ScoringInputs(
                model=self.model, loader=loader, classes=classes, seed=self.recipe.runtime.seed, device=self.device,
                options=options, **inputs))
        return self.scores[key]

    def locate_settings(self, method: str | None = None) -> ResolvedSettings:
        """The resolved attribution settings, for ``method`` (default: the first located one)."""
        assert self.locate is not None, "no attribution section"
        if method is None or method == self.locate.method:
            return self.locate
        return dataclasses.replace(self.locate, settings=self.locate.settings.replace(method=method))

    def loader(self, part: str, classes=None, batch_size: int | None = None):
        """A loader over a partition (optionally some classes) and its samples."""
        samples = self.source.subset(part, classes)
        return make_loader(samples, self.transform, batch_size=batch_size or self.recipe.data.batch_size,
                           workers=self.recipe.data.workers, seed=self.recipe.runtime.seed), samples

    def images(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of a few samples, stacked (one locate chunk)."""
        ds = ImageDataset(samples, self.transform, shapes_seed=self.recipe.runtime.seed)
        items = [ds[i] for i in range(len(ds))]
        return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.long)

    @property
    def paper(self) -> PaperMetrics:
        """``metrics.paper``, created on first use (the paper's evaluations fill it in)."""
        if self.metrics.paper is None:
            self.metrics.paper = PaperMetrics()
        return self.metrics.paper

    def save_metrics(self) -> None:
        """Rewrite ``metrics.json`` (rank 0 only: the other ranks never write it)."""
        if self.dist.is_root:
            atomic_write_json(self.run.metrics, self.metrics.to_dict())

