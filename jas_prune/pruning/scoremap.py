"""Score maps: what every pruning criterion produces, and how scores become a ranking.

A **score map** is block index -> 1-D float tensor with one score per FFN neuron of that block
(the hidden units of ``blk.mlp.fc1 -> act -> fc2``); higher means more important. This module
checks score maps and protect maps (neurons that must stay), normalises a layer's scores so that
layers become comparable, and turns a score map into the ranking scores that Torch-Pruning's
global mode and :func:`~jas_prune.pruning.prune.prune_ffn` sort: protected neurons and each
layer's top ``min_keep`` set to ``+inf``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import FingerprintMismatchError, InvalidArgumentError
from ..models import FFNInfo, discover_ffn

__all__ = [
    "ScoreMap",
    "NORMALIZERS",
    "check_normalizer",
    "clean_score_map",
    "check_score_map",
    "clean_protect",
    "normalize_layer_scores",
    "floor_count",
    "ranking_scores",
]

#: block index -> 1-D float tensor of per-neuron scores (higher = more important).
ScoreMap = dict[int, torch.Tensor]

#: Per-layer normalisations applied before scores of different layers are compared.
NORMALIZERS = ("mean", "max", "minmax", "none")


def check_normalizer(normalizer: str) -> str:
    """``normalizer`` if it is one of :data:`NORMALIZERS`.

    Raises:
        InvalidArgumentError: naming ``normalizer`` and the choices.
    """
    if normalizer not in NORMALIZERS:
        raise InvalidArgumentError(f"normalizer: unknown '{normalizer}'; choose one of {', '.join(NORMALIZERS)}")
    return normalizer


def _as_score_tensor(value: Any, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except Exception as exc:  # noqa: BLE001 - anything that is not array-like
        raise InvalidArgumentError(f"{name}: cannot be read as a 1-D tensor of scores ({exc})") from None
    t = t.detach().to("cpu", torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise InvalidArgumentError(f"{name}: expected a non-empty 1-D tensor of per-neuron scores, got shape "
                                   f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InvalidArgumentError(f"{name}: contains NaN or infinite scores")
    return t


def _as_block(key: Any, name: str) -> int:
    """A block index from an int, a 0-d integer tensor, a NumPy integer or a digit string."""
    if isinstance(key, torch.Tensor) and key.ndim == 0 and not key.is_floating_point():
        key = int(key.item())
    elif isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, bool):
        raise InvalidArgumentError(f"{name}: block keys must be integers, got {key!r}")
    try:
        block = operator.index(key)
    except TypeError:
        raise InvalidArgumentError(f"{name}: block keys must be integers, got {key!r}") from None
    if block < 0:
        raise InvalidArgumentError(f"{name}: block index {block} is negative")
    return int(block)


def clean_score_map(scores: Mapping[Any, Any], name: str = "scores") -> ScoreMap:
    """A checked copy of ``scores``: int block keys in ascending order, float32 CPU 1-D tensors.

    Raises:
        InvalidArgumentError: not a mapping, empty, a key that is not a block index, a block given
            twice, a value that is not a non-empty finite 1-D tensor (naming ``name[block]``).
    """
    if not isinstance(scores, Mapping):
        raise InvalidArgumentError(f"{name}: expected a mapping block index -> 1-D tensor, got "
                                   f"{type(scores).__name__}")
    if not scores:
        raise InvalidArgumentError(f"{name}: empty mapping; give scores for at least one block")
    out: ScoreMap = {}
    for key, value in scores.items():
        block = _as_block(key, name)
        if block in out:
            raise InvalidArgumentError(f"{name}: block {block} given twice")
        out[block] = _as_score_tensor(value, f"{name}[{block}]")
    return dict(sorted(out.items()))


def check_score_map(scores: Mapping[int, torch.Tensor], model_or_info: nn.Module | FFNInfo,
                    name: str = "scores", *, run_dir: str | None = None) -> None:
    """Check that every block of ``scores`` exists in the model and has one score per neuron.

    Args:
        run_dir: the run directory the scores were read from, if any: a run's saved importance
            that does not fit the model was computed on another model, so the mismatch is then a
            :class:`~jas_prune.errors.FingerprintMismatchError` naming the run.

    Raises:
        InvalidArgumentError: naming ``name`` and the block (unknown block, wrong length).
        FingerprintMismatchError: the same, for scores of ``run_dir``.
    """
    info = model_or_info if isinstance(model_or_info, FFNInfo) else discover_ffn(model_or_info)
    problem = None
    for block, s in scores.items():
        if not 0 <= block < info.depth:
            problem = (f"{name}: block {block} does not exist; the model has FFN blocks 0..{info.depth - 1}")
        elif len(s) != info.layers[block].hidden:
            n = info.layers[block].hidden
            problem = f"{name}[{block}]: {len(s)} scores for {n} FFN neurons of block {block}"
        if problem is not None:
            if run_dir is not None:
                raise FingerprintMismatchError(f"importance from run {run_dir} does not fit this model: {problem}")
            raise InvalidArgumentError(problem)


def _index_list(value: Any, n: int | None, name: str) -> list[int]:
    """Indices from a list/LongTensor of indices or a bool mask; checked against width ``n``."""
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    except Exception:  # noqa: BLE001 - strings, ragged lists...
        raise InvalidArgumentError(f"{name}: expected neuron indices (integers) or a boolean mask") from None
    if t.dtype == torch.bool:
        if t.ndim != 1 or (n is not None and len(t) != n):
            raise InvalidArgumentError(f"{name}: a boolean mask must be 1-D with one entry per FFN neuron "
                                       f"({n}), got shape {tuple(t.shape)}")
        return t.nonzero().flatten().tolist()
    if t.numel() == 0:
        return []
    if t.is_floating_point() or t.ndim > 1:
        raise InvalidArgumentError(f"{name}: expected neuron indices (integers) or a boolean mask")
    idx = sorted(set(int(i) for i in t.flatten().tolist()))
    if idx[0] < 0 or (n is not None and idx[-1] >= n):
        raise InvalidArgumentError(f"{name}: neuron index {idx[0] if idx[0] < 0 else idx[-1]} out of range "
                                   f"0..{(n - 1) if n is not None else '?'}")
    return idx


def clean_protect(protect: Mapping[Any, Any] | None, widths: Mapping[int, int] | None,
                  name: str = "protect") -> dict[int, list[int]]:
    """Protected neurons as block -> sorted unique indices (from index lists or bool masks).

    Args:
        widths: block -> width of the scored blocks; a protected block must be one of them.

    Raises:
        InvalidArgumentError: naming ``name[block]`` (unknown block, index out of range, bad mask).
    """
    if protect is None:
        return {}
    if not isinstance(protect, Mapping):
        raise InvalidArgumentError(f"{name}: expected a mapping block index -> neuron indices (or bool mask)")
    out: dict[int, list[int]] = {}
    for key, value in protect.items():
        block = _as_block(key, name)
        if widths is not None and block not in widths:
            raise InvalidArgumentError(f"{name}: block {block} is not among the pruned blocks {sorted(widths)}")
        out[block] = _index_list(value, widths.get(block) if widths is not None else None, f"{name}[{block}]")
    return out


def normalize_layer_scores(scores: torch.Tensor, normalizer: str = "mean") -> torch.Tensor:
    """Rescale one layer's scores so that layers become comparable; order is always preserved.

    ``mean``: s / mean(|s|) (Torch-Pruning's default, made sign-safe); ``max``: s / max(|s|);
    ``minmax``: (s - min) / (max - min); ``none``: unchanged. An all-zero layer stays zero.
    """
    s = scores.to(torch.float32)
    if normalizer == "none":
        return s.clone()
    if normalizer == "mean":
        d = s.abs().mean()
        return s / d if d > 0 else torch.zeros_like(s)
    if normalizer == "max":
        d = s.abs().max()
        return s / d if d > 0 else torch.zeros_like(s)
    if normalizer == "minmax":
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
    check_normalizer(normalizer)
    raise AssertionError("unreachable")  # pragma: no cover


def floor_count(n: int, min_keep: float | int) -> int:
    """How many of a layer's ``n`` neurons ``min_keep`` keeps (a count, or a fraction < 1; at
    least one, at most ``n``).

    Raises:
        InvalidArgumentError: ``min_keep`` is not a count >= 0 or a fraction in [0, 1).
    """
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or min_keep < 0:
        raise InvalidArgumentError(f"min_keep: expected a count >= 0 or a fraction in [0, 1), got {min_keep!r}")
    if isinstance(min_keep, float) and min_keep < 1:
        k = math.ceil(min_keep * n)
    else:
        k = int(min_keep)
    return max(1, min(n, k))


def ranking_scores(scores: Mapping[int, torch.Tensor], *, normalizer: str = "mean",
                   min_keep: float | int = 0.05,
                   protect: Mapping[int, Sequence[int]] | None = None) -> ScoreMap:
    """Scores ready for a ranking across layers (Torch-Pruning global mode or ``prune_ffn``).

    Each layer is normalised by :func:`normalize_layer_scores`; then the protected neurons and the
    top ``min_keep`` neurons of every layer (a count, or a fraction of the layer's width; at least
    one) are set to ``+inf``, so that a global threshold can never empty a layer or drop a
    protected neuron while the budget leaves room for them.
    """
    protect = protect or {}
    out: ScoreMap = {}
    for block, s in scores.items():
        r = normalize_layer_scores(s, normalizer)
        floor = floor_count(len(r), min_keep)
        top = torch.sort(r, descending=True, stable=True).indices[:floor]
        r[top] = math.inf
        if protect.get(block):
            r[torch.as_tensor(protect[block], dtype=torch.long)] = math.inf
        out[block] = r
    return out
