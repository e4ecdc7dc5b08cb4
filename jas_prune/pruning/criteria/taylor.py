"""``taylor``: Torch-Pruning group Taylor importance |w · dL/dw| on the probe data."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs


def taylor_scores(model: nn.Module, loader: Iterable, *, example_inputs: torch.Tensor | None = None,
                  classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                  max_batches: int | None = None,
                  groups: Callable[[nn.Module, torch.Tensor | None], Iterator[tuple[int, Any]]] | None = None,
                  modules: Callable[[nn.Module], list[nn.Module]] | None = None,
                  score: Callable[[nn.Module], dict[int, torch.Tensor]] | None = None) -> dict[int, torch.Tensor]:
    """Group Taylor importance |w · dL/dw| of each FFN neuron's group (``fc1`` row, ``fc2``
    column; ``tp.importance.GroupTaylorImportance``, mean reduction, no normaliser), with the
    gradients of the cross-entropy summed over the probe batches. The model's parameters,
    ``requires_grad`` flags and ``.grad`` are left as they were.

    ``groups`` (``(model, example_inputs) -> (block, group)``) and ``modules`` (whose gradients
    the groups read) score other groups the same way (attention heads:
    :mod:`jas_prune.pruning.attention`); default: the FFN neuron groups. ``score`` (``model ->
    {block: scores}``, reading the accumulated ``.grad``) replaces the groups where Torch-Pruning's
    graph cannot form them.

    Raises:
        InvalidArgumentError: no probe image (of ``classes``).
    """
    import torch_pruning as tp

    from ...torchutil import frozen_eval
    from ..graph import fc1_groups, find_vit
    from ..stats import device_of, iter_batches, no_images

    _, info = find_vit(model)
    dev = device_of(model, device)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    # every module a neuron's group touches: its input projections (fc1, or gate and value of a
    # gated FFN), fc2 and a hidden norm; the scorer reads their gradients
    ffn = [p for l in info.layers for m in (*l.inputs, l.fc2, l.norm) if m is not None for p in m.parameters()] \
        if modules is None else [p for m in modules(model) for p in m.parameters()]
    groups = groups or fc1_groups
    try:
        with frozen_eval(model, trainable=ffn):
            for p in params:
                p.grad = None
            seen = 0
            for images, labels in iter_batches(loader, classes=classes, device=dev, max_batches=max_batches):
                loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
                loss.backward()
                seen += len(labels)
            if seen == 0:
                raise no_images(classes)
            if score is not None:
                return score(model)
            scorer = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
            return {b: scorer(g).detach().float().cpu() for b, g in groups(model, example_inputs)}
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad


def _score(inputs: ScoringInputs) -> CriterionScores:
    return CriterionScores(taylor_scores(inputs.model, inputs.require_loader("taylor"),
                                         example_inputs=inputs.example_inputs, classes=inputs.classes,
                                         device=inputs.device, max_batches=inputs.max_batches))


@CRITERIA.register
def _taylor_criterion() -> Criterion:
    return Criterion(
        name="taylor", label="Taylor", colour="#9467bd", needs_data=True, score=_score,
        summary="Torch-Pruning group Taylor |w · dL/dw| with cross-entropy gradients on the probe data",
    )
