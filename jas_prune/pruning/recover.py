"""Distillation recovery after pruning (``prune.recover``; :func:`recover` for Python users).

A user who pruned 90 % does next what every pruning tool's examples do: a short recovery. Here
the pruned student learns from the dense teacher on *unlabeled* images — no label is read:

- ``logits``: KL divergence between the teacher's and the student's softened class distributions
  (temperature T, scaled by T²); for a class-specialised student with a cut head the teacher's
  logits are restricted to the kept classes first;
- ``tokens``: the output tokens of every transformer block (ZipLM-style token distillation),
  mean squared error relative to the teacher's mean square, averaged over the blocks.

The images: the built-in ``shapes`` data's ``train`` split (procedural, so as many as the steps
need, never the probe or test images), or the probe images of the classes pruned for (user data).
Every criterion gets the same budget (steps × batch size); AdamW, linear warm-up then cosine decay.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import InvalidArgumentError
from ..schema import Strict, each_once


__all__ = ["RecoverSettings", "recover", "recovery_loader", "recover_entry"]

TARGETS = ("logits", "tokens")


class RecoverSettings(Strict):
    """``prune.recover``: distill every pruned model from the dense one (the same budget for all)."""

    method: Literal["kd"] = "kd"
    steps: int = Field(default=300, ge=0)
    lr: float = Field(default=3e-4, gt=0.0, allow_inf_nan=False)
    batch_size: int = Field(default=64, ge=1)
    temperature: float = Field(default=2.0, gt=0.0, allow_inf_nan=False)
    targets: list[Literal[TARGETS]] = ["logits"]  # type: ignore[valid-type]
    #: train: the shapes train split (built-in data only); probe: the probe images of the pruned classes
    data: Literal["train", "probe"] = "train"

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return each_once(v, "must list logits and/or tokens, each once")


def _images(batch: Any) -> torch.Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InvalidArgumentError("loader: batches must be image tensors [B, C, H, W] or (images, ...) tuples")
    return images


def _cycle(loader: Iterable) -> Iterator[torch.Tensor]:
    """The loader's image batches, again and again."""
    while True:
        got = False
        for batch in loader:
            got = True
            yield _images(batch)
        if not got:
            raise InvalidArgumentError("loader: yielded no images to distill on")


def _block_outputs(model: nn.Module, store: list[torch.Tensor]) -> list[Any]:
    from .graph import find_vit

    _, info = find_vit(model)
    return [layer.block.register_forward_hook(lambda _m, _a, out: store.append(out)) for layer in info.layers]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), mean over images."""
    t = temperature
    return nn.functional.kl_div((student / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True,
                                reduction="batchmean") * t * t


def recover(pruned: nn.Module, dense: nn.Module, loader: Iterable, *, steps: int = 300, lr: float = 3e-4,
            temperature: float = 2.0, targets: Sequence[str] = ("logits",),
            head_classes: Sequence[int] | None = None, device: torch.device | str | None = None,
            progress: bool = True, desc: str = "recover") -> dict[str, Any]:
    """Distill ``pruned`` (in place) from ``dense`` on the images of ``loader`` (labels unused).

    Works on any pruned model of a supported family, pruned by
    :func:`~jas_prune.pruning.prune.prune_ffn` or by Torch-Pruning's ``MetaPruner``::

        dense = jas_prune.load_model("builtin:shapes-vit")
        model = copy.deepcopy(dense)
        tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.9, ...).step()
        jas_prune.reconstruct(model, dense, probe_loader)
        jas_prune.recover(model, dense, unlabeled_loader, steps=300)

    Args:
        pruned: the student (trained in place, left in eval mode).
        dense: the teacher (unchanged).
        loader: batches of images ``[B, C, H, W]`` or ``(images, ...)``; re-read until ``steps``.
        steps: optimiser steps (one batch each); 0 does nothing.
        lr: peak AdamW learning rate (5 % linear warm-up, then cosine decay to 0).
        temperature: of the softened distributions (``logits`` target).
        targets: ``logits`` and/or ``tokens`` (every block's output tokens).
        head_classes: the classes the student's head kept (default: the model's
            ``jas_head_classes`` after a head cut): the teacher's logits are restricted to them.
        device: where to train (default: the student's device).

    Returns:
        ``{"steps", "loss_first", "loss_last", "seconds", "cpu_seconds"}`` (losses: running
        means; ``cpu_seconds``: this process's CPU time, the wall time on an otherwise idle machine
        when Torch uses one thread).

    Raises:
        InvalidArgumentError: a bad setting (named), a teacher of another shape, a loader without images.
    """
    from tqdm.auto import tqdm

    from ..torchutil import frozen_eval, model_device
    from .graph import find_vit

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidArgumentError(f"steps: must be an integer ≥ 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidArgumentError(f"lr: must be > 0, got {lr!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InvalidArgumentError(f"temperature: must be > 0, got {temperature!r}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise InvalidArgumentError(f"targets: {bad or 'none'}; use logits and/or tokens")
    if pruned is dense:
        raise InvalidArgumentError("dense: is the pruned model itself; pass the unpruned model")
    vit, info = find_vit(pruned)
    _, dense_info = find_vit(dense)
    if info.depth != dense_info.depth:
        raise InvalidArgumentError(f"dense: has {dense_info.depth} blocks but the pruned model has {info.depth}")
    if head_classes is None:
        head_classes = getattr(vit, "jas_head_classes", None)
    dev = torch.device(device) if device is not None else model_device(pruned)
    t0, c0 = time.perf_counter(), time.process_time()
    if steps == 0:
        return {"steps": 0, "loss_first": math.nan, "loss_last": math.nan, "seconds": 0.0, "cpu_seconds": 0.0}
    params = list(pruned.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:  # every weight of the student learns (a model loaded frozen too)
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    keep = None if head_classes is None else torch.as_tensor([int(c) for c in head_classes], dtype=torch.long, device=dev)
    tokens = "tokens" in targets
    s_out: list[torch.Tensor] = []
    t_out: list[torch.Tensor] = []
    hooks = (_block_outputs(pruned, s_out) + _block_outputs(dense, t_out)) if tokens else []
    first = last = math.nan
    bar = tqdm(total=steps, desc=desc, mininterval=2, disable=not progress)
    pruned.train()
    try:
        with frozen_eval(dense):
            batches = _cycle(loader)
            for step in range(steps):
                x = next(batches).to(dev)
                s_out.clear()
                t_out.clear()
                with torch.no_grad():
                    teacher = dense(x)
                student = pruned(x)
                if keep is not None:
                    teacher = teacher.index_select(-1, keep)
                if teacher.shape != student.shape:
                    raise InvalidArgumentError(f"dense: gives {teacher.shape[-1]} logits but the pruned model "
                                               f"{student.shape[-1]}; pass head_classes for a cut head")
                loss = student.new_zeros(())
                if "logits" in targets:
                    loss = loss + kd_loss(student, teacher, temperature)
                if tokens:
                    loss = loss + sum(nn.functional.mse_loss(s, t.detach()) / t.detach().pow(2).mean().clamp_min(1e-12)
                                      for s, t in zip(s_out, t_out)) / len(s_out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                value = float(loss.detach())
                last = value if math.isnan(last) else 0.95 * last + 0.05 * value
                if step < 10:
                    first = value if math.isnan(first) else (first * step + value) / (step + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{last:.4f}", refresh=False)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        bar.close()
        pruned.eval()
    return {"steps": steps, "loss_first": first, "loss_last": last, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


class _ShapesTrain(torch.utils.data.Dataset):
    """Images of the built-in data's ``train`` split (indices of the wanted classes), transformed."""

    def __init__(self, seed: int, indices: Sequence[int], transform: Any) -> None:
        self.seed, self.indices, self.transform = seed, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        from .. import shapes

        arr, _ = shapes.render(self.seed, "train", self.indices[i])
        return self.transform(Image.fromarray(arr))


def recovery_loader(settings: RecoverSettings, *, kind: str, transform: Any, seed: int,
                    classes: Sequence[int] | None, probe_loader: Any = None) -> Iterable:
    """The images a recovery reads: ``train`` renders steps × batch size images of the shapes
    train split (of ``classes``), each once, and holds them in memory when small, so that every
    pruned model of a run distills on the same images rendered once; ``probe`` is the given
    probe loader.

    Raises:
        InvalidArgumentError: ``train`` on data other than the built-in shapes.
    """
    if settings.data == "probe":
        return probe_loader
    if kind != "shapes":
        raise InvalidArgumentError("prune.recover.data: 'train' needs the built-in shapes data; "
                                   "use 'probe' for an ImageFolder")
    return _train_images(settings.steps * settings.batch_size, settings.batch_size, transform, seed,
                         None if classes is None else tuple(sorted(int(c) for c in classes)))


@functools.lru_cache(maxsize=1)
def _train_images(n: int, batch_size: int, transform: Any, seed: int, classes: tuple[int, ...] | None) -> Iterable:
    from .. import shapes
    from .calibration import cached_batches

    wanted = list(range(shapes.NUM_CLASSES)) if classes is None else list(classes)
    indices = [c + shapes.NUM_CLASSES * k for k in range(-(-n // len(wanted))) for c in wanted][:n]
    return cached_batches(torch.utils.data.DataLoader(_ShapesTrain(seed, indices, transform),
                                                      batch_size=batch_size, shuffle=False))


def recover_entry(ctx, settings: RecoverSettings | None, model: nn.Module, classes: list[int] | None,
                  head_classes: list[int] | None, desc: str) -> dict[str, Any] | None:
    """The pipeline's recovery of one pruned model (``prune.recover``; None without it): the
    settings and what it did, as recorded in the entry (``PrunedEntry.recover``)."""
    if settings is None or settings.steps == 0:
        return None
    probe = ctx.loader("probe", classes, batch_size=settings.batch_size)[0] if settings.data == "probe" else None
    loader = recovery_loader(settings, kind=ctx.recipe.data.kind, transform=ctx.transform,
                             seed=ctx.recipe.runtime.seed, classes=classes, probe_loader=probe)
    done = recover(model, ctx.model, loader, steps=settings.steps, lr=settings.lr, temperature=settings.temperature,
                   targets=settings.targets, head_classes=head_classes, device=ctx.device, desc=desc)
    return {"settings": settings.model_dump(mode="json"), **done}
