"""Evaluation: top-1/top-5 on the test partition, parameter and MAC counts."""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from .errors import NonFiniteOutputError
from .schema import Strict

__all__ = ["accuracy", "count_params_macs", "predict_logits", "intervention_metrics", "cls_mask_protocol",
           "EvaluateSettings", "ClsMaskSettings", "ClsMaskAblationSettings"]


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, *, device: torch.device | str = "cpu",
                   sample_ids: Sequence[str] | None = None, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader of (x, y, position) batches.

    Raises:
        NonFiniteOutputError: naming the first image whose logits are NaN/Inf.
    """
    model.eval()
    outs, labels = [], []
    for x, y, pos in tqdm(loader, desc=desc, mininterval=2, leave=False):
        dtype = next(model.parameters()).dtype
        logits = model(x.to(device=device, dtype=dtype)).float().cpu()
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            j = int(pos[bad.nonzero()[0, 0]])
            name = sample_ids[j] if sample_ids is not None else f"#{j}"
            raise NonFiniteOutputError(f"{desc}: model output is not finite (NaN/Inf logits) for image {name}")
        outs.append(logits)
        labels.append(y)
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, *,
             label_map: Mapping[int, int] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy.

    Args:
        logits: [N, C] scores.
        labels: [N] original labels.
        label_map: for a head cut to a class subset, original label -> head index.
    """
    if label_map is not None:
        labels = torch.tensor([label_map[int(y)] for y in labels], dtype=torch.long)
    n = len(labels)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return {"top1": hit[:, 0].float().mean().item(), "top5": hit.any(dim=1).float().mean().item(), "n": n}


def count_params_macs(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Parameters and multiply-accumulates of one image at ``input_size`` (C, H, W)."""
    import torch_pruning as tp

    p = next(model.parameters())
    example = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"params": int(params), "macs": int(macs)}


def _path_multipliers(paths: torch.Tensor, layers: Sequence[int], widths: Sequence[int], factor: float,
                      device: torch.device | str) -> dict[int, torch.Tensor]:
    """Per-image factors: ``factor`` on each image's path neurons, 1 elsewhere."""
    out = {}
    for j, block in enumerate(layers):
        mult = torch.ones(paths.shape[0], widths[block], device=device)
        mult.scatter_(1, paths[:, j, :].to(device), factor)
        out[int(block)] = mult
    return out


@torch.no_grad()
def intervention_metrics(model: nn.Module, batches: Iterable, layers: Sequence[int], *,
                         scope: str) -> dict[str, float]:
    """Paper Table 1: edit each image's path neurons (×0 removal, ×2 enhancement) at the scope's
    positions; accuracy deviation (percentage points) and relative probability deviation of the
    target class (%, mean and median).

    Args:
        batches: iterable of (images, labels, targets, paths [b, L, K]) — streamed, so the
            test partition never has to fit in memory.
        layers: block index of each of the L path rows.
    """
    from .models import discover_ffn
    from .neurons import edit

    p = next(model.parameters())
    widths = discover_ffn(model).widths
    probs: dict[str, list[torch.Tensor]] = {"clean": [], "removal": [], "enhancement": []}
    correct: dict[str, list[torch.Tensor]] = {"clean": [], "removal": [], "enhancement": []}
    for x, y, t, path in batches:
        x = x.to(device=p.device, dtype=p.dtype)
        for name, factor in (("clean", None), ("removal", 0.0), ("enhancement", 2.0)):
            if factor is None:
                logits = model(x)
            else:
                with edit(model, _path_multipliers(path, layers, widths, factor, p.device), scope=scope):
                    logits = model(x)
            logits = logits.float().cpu()
            probs[name].append(logits.softmax(-1).gather(1, t[:, None]).squeeze(1))
            correct[name].append((logits.argmax(1) == y).float())
    pr = {k: torch.cat(v) for k, v in probs.items()}
    acc = {k: torch.cat(v).mean().item() for k, v in correct.items()}
    out: dict[str, float] = {"images": len(pr["clean"]), "top1": acc["clean"]}
    for name in ("removal", "enhancement"):
        rel = (pr[name] - pr["clean"]) / pr["clean"].clamp_min(1e-12)
        out[f"{name}_acc_dev"] = 100.0 * (acc[name] - acc["clean"])
        out[f"{name}_prob_dev_mean"] = 100.0 * rel.mean().item()
        out[f"{name}_prob_dev_median"] = 100.0 * rel.median().item()
    return out


@torch.no_grad()
def cls_mask_protocol(model: nn.Module, batches: Iterable, keep: torch.Tensor, layers: Sequence[int], *,
                      depth: int, fraction: float, seed: int = 0) -> dict[str, float]:
    """The paper's protocol (Tables 2/3, Fig. 6): for each test image of class c, keep class c's
    neurons ``keep[c]`` and zero a random fraction ``fraction`` of the other neurons at the class
    token only, in the first ``depth`` blocks; returns top-1/top-5.

    Args:
        batches: iterable of (images, labels, ...) — streamed.
        keep: [C, L, n] bool, the neurons kept per class (rows follow ``layers``).
        layers: block index of each row of ``keep``.
    """
    from .models import discover_ffn
    from .neurons import edit

    p = next(model.parameters())
    widths = discover_ffn(model).widths
    rows = [(j, int(b)) for j, b in enumerate(layers) if int(b) < depth]
    gen = torch.Generator().manual_seed(int(seed))
    logits_all, labels_all = [], []
    for x, y, *_ in batches:
        x = x.to(device=p.device, dtype=p.dtype)
        mults = {}
        for j, block in rows:
            kept = keep[y, j]  # [b, n]
            drop = torch.rand(len(y), widths[block], generator=gen) < fraction
            mults[block] = (~(drop & ~kept)).float().to(p.device)
        with edit(model, mults, scope="cls"):
            logits_all.append(model(x).float().cpu())
        labels_all.append(y)
    return accuracy(torch.cat(logits_all), torch.cat(labels_all))


class ClsMaskAblationSettings(Strict):
    """The paper's Table 3-style ablation: every top-K × depth × fraction for the class TopK
    masks of the first located method, beside random masks of the same size."""

    topk: list[int] = [1, 5, 10]
    depth: list[int] | None = None  # None: 1/3, 2/3 and all of the model's blocks

    @field_validator("topk", "depth")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one value")
            if any(k < 1 for k in v):
                raise ValueError("every value must be ≥ 1")
        return v


class ClsMaskSettings(Strict):
    """``evaluate.cls_mask``: the paper's class-mask protocol (fractions of the TopK kept)."""

    fractions: list[float] = [0.5]
    depth: int | None = Field(default=None, ge=1)
    ablation: ClsMaskAblationSettings | None = None

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{p} is outside [0, 1]")
        return v


class EvaluateSettings(Strict):
    """``evaluate``: the structured protocol (pruned models' accuracy) and the paper's CLS-mask
    and intervention protocols."""

    protocols: list[Literal["structured", "paper_cls_mask"]] = ["structured"]
    intervention: bool = False
    cls_mask: ClsMaskSettings = ClsMaskSettings()
