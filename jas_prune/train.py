"""Training: the reference ``builtin:shapes-vit`` and the post-pruning fine-tune share ``fit``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import shapes
from .shapes import BUILTIN_TRAINING

__all__ = ["FitConfig", "fit", "ShapesTrainBatches", "train_builtin"]

log = logging.getLogger("jas_prune")



@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings (AdamW, linear warm-up then cosine decay, label smoothing)."""

    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0


class ShapesTrainBatches:
    """Shuffled mini-batches of the ``shapes`` train split, rendered once and kept as uint8."""

    def __init__(self, *, seed: int, per_class: int, batch_size: int, mean, std, progress: bool = True):
        n = per_class * shapes.NUM_CLASSES
        images = np.empty((n, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        for i in tqdm(range(n), desc="render shapes/train", disable=not progress, mininterval=2):
            images[i], labels[i] = shapes.render(seed, "train", i)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = (self.images[idx].float() - self.mean) / self.std
            yield x, self.labels[idx]


def fit(model: nn.Module, batches: Iterable, cfg: FitConfig, *, device: torch.device | str = "cpu",
        steps_per_epoch: int | None = None, desc: str = "train",
        on_epoch: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Train ``model`` in place on (x, y) batches with cross-entropy; returns summary figures.

    ``cfg.epochs`` may be fractional; the iterable is re-iterated for every epoch.
    """
    device = torch.device(device)
    model.to(device).train()
    steps_per_epoch = steps_per_epoch or len(batches)  # type: ignore[arg-type]
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = max(1, int(cfg.warmup_fraction * total))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step, epoch, t0, running = 0, 0, time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc=desc, mininterval=2)
    while step < total:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            if step >= total:
                break
        epoch += 1
        if on_epoch is not None:
            on_epoch(epoch, running)
    bar.close()
    model.eval()
    return {"steps": step, "loss": running, "seconds": time.perf_counter() - t0}


def train_builtin(out: str | Path, *, seed: int = BUILTIN_TRAINING["seed"], epochs: float = BUILTIN_TRAINING["epochs"],
                  per_class: int = BUILTIN_TRAINING["per_class"], batch_size: int = BUILTIN_TRAINING["batch_size"],
                  lr: float = BUILTIN_TRAINING["lr"], device: str = "cpu", threads: int | None = None) -> dict:
    """Train ``builtin:shapes-vit`` from scratch on the shapes train split and save safetensors.

    Deterministic for a given (seed, device, thread count).
    """
    from .models import BUILTIN_MODELS, create_model

    out = Path(out)
    meta = {"seed": str(seed), "epochs": str(epochs), "per_class": str(per_class), "batch_size": str(batch_size),
            "lr": str(lr)}
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create_model("builtin:shapes-vit")
    cfg = BUILTIN_MODELS["shapes-vit"]["pretrained_cfg"]
    t0 = time.perf_counter()
    batches = ShapesTrainBatches(seed=seed, per_class=per_class, batch_size=batch_size,
                                 mean=cfg["mean"], std=cfg["std"])
    render_s = time.perf_counter() - t0
    # a small slice of the train split's tail, never trained on, to follow progress per epoch
    val_x, val_y = shapes.render_batch(seed, "train", range(per_class * shapes.NUM_CLASSES,
                                                            (per_class + 10) * shapes.NUM_CLASSES))
    val_x = (torch.from_numpy(val_x).permute(0, 3, 1, 2).float() - batches.mean) / batches.std
    val_y = torch.from_numpy(val_y)

    def on_epoch(epoch: int, loss: float) -> None:
        model.eval()
        with torch.no_grad():
            acc = (model(val_x.to(device)).argmax(1).cpu() == val_y).float().mean().item()
        model.train()
        log.info("epoch %d loss %.4f held-out top1 %.4f", epoch, loss, acc)
        _save(model, out, {**meta, "epochs_done": str(epoch), "heldout_top1": f"{acc:.4f}"})

    summary = fit(model, batches, FitConfig(epochs=epochs, lr=lr), device=device, desc="train shapes-vit",
                  on_epoch=on_epoch)
    _save(model, out, {**meta, "epochs_done": str(epochs), "train_seconds": f"{summary['seconds'] + render_s:.1f}",
                       "threads": str(torch.get_num_threads())})
    return {**summary, "render_seconds": render_s, "path": str(out)}


def _save(model: nn.Module, out: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from .io import atomic_write

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=meta))
