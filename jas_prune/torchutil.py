"""Small PyTorch helpers every stage shares: the model's device and dtype, and one context
manager that puts a model in eval mode with chosen parameters trainable and restores both."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .schema import Strict

__all__ = ["frozen_eval", "model_device", "model_dtype", "forward_ad_ready", "RuntimeSettings"]


@functools.cache
def forward_ad_ready() -> None:
    """Load PyTorch's forward-mode AD decompositions once, without their warning.

    The first ``torch.autograd.forward_ad.make_dual`` of a process imports them, and that import
    scripts a few functions with ``torch.jit.script``, which PyTorch >= 2.9 reports with a
    FutureWarning that is about PyTorch's own code: it was the first line a new user saw.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # another PyTorch layout: the warning, if any, stays PyTorch's
            pass


@contextlib.contextmanager
def frozen_eval(model: nn.Module, trainable: Iterable[nn.Parameter] | bool = ()) -> Iterator[nn.Module]:
    """Eval mode for the block, with only ``trainable`` parameters requiring grad.

    Args:
        trainable: the parameters that require grad inside the block (default none: attribution
            and scoring differentiate with respect to activations only), or ``True`` for all of
            them (Torch-Pruning traces its graph through the parameters' gradients).

    The training flag and every parameter's ``requires_grad`` are restored on exit, also when the
    block raises.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    on = None if isinstance(trainable, bool) else {id(p) for p in trainable}
    try:
        for p in params:
            p.requires_grad_(bool(trainable) if on is None else id(p) in on)
        model.eval()
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class RuntimeSettings(Strict):
    """``runtime``: the seed and where and in which dtype the run computes."""

    #: seeds Python, NumPy and PyTorch (NumPy takes 0 … 2**32 - 1)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
