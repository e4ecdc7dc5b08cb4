"""``hessian``: Optimal Brain Damage, Torch-Pruning's group Hessian importance.

OBD (LeCun et al., 1989) scores a weight by the loss increase its removal causes under a diagonal
second-order model, ½ · h · w². As in Torch-Pruning's ``GroupHessianImportance``, the Hessian
diagonal is the empirical Fisher: the mean over probe images of the squared *per-image* gradient
of the cross-entropy. A neuron's score is the mean over its group's two layers of Σ w² · E[g²]
(its ``fc1`` row and its ``fc2`` column). Unlike Taylor, the squares keep the gradients of
different images from cancelling.

The per-image gradients of an ``nn.Linear`` weight come from one backward pass per batch: the
gradient of image b is Σ_t δ_bt x_btᵀ over its tokens t, from the layer's input x and the
gradient δ at its output, so no per-image backward is needed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import CRITERIA, Criterion, CriterionScores, ScoringInputs

#: cap on the elements of one per-image gradient block (images × out × in) held at once
_CHUNK_ELEMENTS = 1 << 24


def fisher_diagonal(model: nn.Module, loader: Iterable, modules: Sequence[nn.Linear], *,
                    classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                    max_batches: int | None = None) -> dict[nn.Linear, torch.Tensor]:
    """Mean over the probe images of the squared per-image cross-entropy gradient of every
    ``modules`` weight (float64, the weight's shape). The model is left as it was.

    Raises:
        InvalidArgumentError: no probe image (of ``classes``).
    """
    from ...torchutil import frozen_eval
    from ..stats import device_of, iter_batches, no_images

    dev = device_of(model, device)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen[module] = (inp[0].detach(), out)

    sums = {m: torch.zeros(m.weight.shape, dtype=torch.float64, device=dev) for m in modules}
    count = 0
    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        with frozen_eval(model, trainable=[m.weight for m in modules]), torch.enable_grad():
            for images, labels in iter_batches(loader, classes=classes, device=dev, max_batches=max_batches):
                seen.clear()
                loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
                grads = torch.autograd.grad(loss, [seen[m][1] for m in modules])
                for m, delta in zip(modules, grads):
                    x = seen[m][0]
                    delta, x = delta.reshape(len(labels), -1, delta.shape[-1]), x.reshape(len(labels), -1, x.shape[-1])
                    step = max(1, _CHUNK_ELEMENTS // m.weight.numel())
                    for s in range(0, len(labels), step):
                        per_image = torch.einsum("bto,bti->boi", delta[s:s + step], x[s:s + step])
                        sums[m] += per_image.double().pow(2).sum(0)
                count += len(labels)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    if count == 0:
        raise no_images(classes)
    return {m: s / count for m, s in sums.items()}


def hessian_scores(model: nn.Module, loader: Iterable, *, example_inputs: torch.Tensor | None = None,
                   classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                   max_batches: int | None = None) -> dict[int, torch.Tensor]:
    """OBD score of every FFN neuron: ``tp.importance.GroupHessianImportance`` (mean group
    reduction, no normaliser) on each neuron's ``fc1``/``fc2`` group, with the empirical Fisher
    of :func:`fisher_diagonal` as the Hessian diagonal. The model's parameters, flags and
    ``.grad`` are left as they were.

    Raises:
        InvalidArgumentError: no probe image (of ``classes``).
    """
    import torch_pruning as tp

    from ..graph import fc1_groups, find_vit

    _, info = find_vit(model)
    linears = [m for layer in info.layers for m in (*layer.inputs, layer.fc2)]  # gate and value rows of a gated FFN
    fisher = fisher_diagonal(model, loader, linears, classes=classes, device=device, max_batches=max_batches)
    saved: list[tuple[nn.Parameter, Any]] = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in saved:  # the scorer reads the Hessian diagonal from .grad, of these layers only
            p.grad = None
        for m, f in fisher.items():
            m.weight.grad = f.to(m.weight.device, m.weight.dtype)
        scorer = tp.importance.GroupHessianImportance(group_reduction="mean", normalizer=None)
        return {b: scorer(g).detach().float().cpu() for b, g in fc1_groups(model, example_inputs)}
    finally:
        for p, grad in saved:
            p.grad = grad


def _score(inputs: ScoringInputs) -> CriterionScores:
    return CriterionScores(hessian_scores(inputs.model, inputs.require_loader("hessian"),
                                          example_inputs=inputs.example_inputs, classes=inputs.classes,
                                          device=inputs.device, max_batches=inputs.max_batches))


@CRITERIA.register
def _hessian_criterion() -> Criterion:
    return Criterion(
        name="hessian", label="Hessian (OBD)", colour="#e377c2", needs_data=True, score=_score,
        summary="Optimal Brain Damage: Torch-Pruning group Hessian Σ w²·E[g²], per-image gradients on the probe data",
    )
