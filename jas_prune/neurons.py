"""Forward-hook primitives on the FFN neurons of a supported ViT.

A *neuron* ``(l, i)`` is unit ``i`` of the vector that enters ``fc2`` of block ``l``: the
post-activation FFN hidden (``act(fc1 x)``; for a gated FFN the gated product
``act(fc1_g x) * fc1_x x``; after the hidden norm when the FFN has one). It is the output of the
block's *site* module, ``FFNLayer.act`` (:mod:`jas_prune.models.ffn`): ``mlp.act``,
``mlp.drop1`` of a gated FFN, or the hidden norm. Everything here works through forward hooks on
the site that are always removed again (also when the forward raises), so the model is left
unchanged. Shared by locating (:mod:`jas_prune.attribution`), the evaluation metrics and the
pruning baselines.

Scopes (docs/faithfulness.md): ``"cls"`` reads/edits token position 0 only (needs a class token); ``"all"``
reads/edits every token position.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError, RecipeError, UnsupportedModelError
from .models import FFNInfo, discover_ffn
from .torchutil import frozen_eval, model_device, model_dtype

__all__ = [
    "SCOPES",
    "resolve_layers",
    "check_scope",
    "hook_hidden",
    "capture",
    "activation_stats",
    "edit",
    "read_scope",
    "write_scope",
]

SCOPES = ("cls", "all")

HiddenFn = Callable[[Tensor], "Tensor | None"]


def resolve_layers(info: FFNInfo, layers: int | Sequence[int] | None, key: str = "attribution.layers") -> list[int]:
    """Block indices selected by ``layers``.

    Args:
        info: the model's FFN layout.
        layers: ``None`` (every block), an int ``d`` (the first ``d`` blocks) or a list of block
            indices (returned sorted; negative indices count from the end).
        key: setting name used in error messages.

    Raises:
        RecipeError: empty, out-of-range or duplicate indices.
    """
    depth = info.depth
    if layers is None:
        return list(range(depth))
    if isinstance(layers, bool):
        raise RecipeError(f"{key}: expected a depth (int) or a list of block indices, got {layers!r}")
    if isinstance(layers, numbers.Integral):
        layers = int(layers)
        if not 1 <= layers <= depth:
            raise RecipeError(f"{key}: depth {layers} is out of range 1..{depth} (the model has {depth} blocks)")
        return list(range(layers))
    if isinstance(layers, Tensor):
        layers = layers.tolist()
    try:
        items = list(layers)
    except TypeError:
        raise RecipeError(f"{key}: expected a depth (int) or a list of block indices, got {layers!r}") from None
    if not items:
        raise RecipeError(f"{key}: the list of block indices is empty")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise RecipeError(f"{key}: block index {item!r} is not an integer")
        item = int(item)
        idx = item + depth if item < 0 else item
        if not 0 <= idx < depth:
            raise RecipeError(f"{key}: block index {item} is out of range 0..{depth - 1}")
        out.append(idx)
    if len(set(out)) != len(out):
        raise RecipeError(f"{key}: duplicate block indices in {items}")
    return sorted(out)


def check_scope(info: FFNInfo, scope: str, key: str = "attribution.scope") -> str:
    """Validate a scope against the model (``cls`` needs a class token)."""
    if scope not in SCOPES:
        raise RecipeError(f"{key}: must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "cls" and not info.has_cls_token:
        raise UnsupportedModelError(
            f"{key}: 'cls' needs a class token and this model has none; use scope 'all'"
        )
    return scope


def read_scope(hidden: Tensor, scope: str) -> Tensor:
    """The scope's view of a hidden ``[R, T, n]``: ``[R, n]`` (cls) or ``[R, T, n]`` (all)."""
    return hidden[:, 0] if scope == "cls" else hidden


# Autograd nodes whose backward does not read their own output, so the output may be written
# in place: GELU and SiLU save their input only, a product (the gated FFN's act(g) * x, also after
# an eval-mode dropout, which returns its input) saves its factors, LayerNorm (a hidden norm)
# its input and statistics. ReLU/Sigmoid/Tanh save their result and may not; anything not listed
# is written out of place. Should a listed node ever save its output, autograd's version check
# raises instead of computing a wrong gradient (tests/test_neurons.py checks every entry).
_INPLACE_SAFE_NODES = ("GeluBackward0", "MulBackward0", "SiluBackward0", "NativeLayerNormBackward0")


def write_scope(hidden: Tensor, value: Tensor, scope: str) -> Tensor:
    """``hidden`` with its scope positions replaced by ``value`` (autograd-safe).

    ``value`` is ``[R, n]`` for ``cls`` and ``[R, T, n]`` (or broadcastable) for ``all``. For
    ``cls`` the class-token row is written in place when that is safe for autograd (no graph
    yet, or an activation such as GELU whose backward does not need its output) — this avoids
    copying the whole hidden — and out of place otherwise.
    """
    if scope == "cls":
        node = hidden.grad_fn
        if not hidden.requires_grad or (node is not None and type(node).__name__ in _INPLACE_SAFE_NODES):
            hidden[:, 0] = value
            return hidden
        return torch.cat([value.unsqueeze(1).to(hidden.dtype), hidden[:, 1:]], dim=1)
    return value.to(hidden.dtype).expand_as(hidden)


@contextlib.contextmanager
def hook_hidden(model: nn.Module, fns: Mapping[int, HiddenFn], info: FFNInfo | None = None) -> Iterator[FFNInfo]:
    """Run ``fns[l](hidden)`` on the FFN hidden ``[B, T, n]`` of block ``l`` in every forward.

    A function may return a replacement tensor (same shape) or ``None`` (observe only). Hooks are
    removed on exit, also on exceptions.

    Yields:
        The model's :class:`~jas_prune.models.FFNInfo`.
    """
    info = info or discover_ffn(model)
    handles = []
    try:
        for l, fn in fns.items():
            if not 0 <= l < info.depth:
                raise RecipeError(f"layers: block index {l} is out of range 0..{info.depth - 1}")

            def hook(_mod: nn.Module, _inp: Any, out: Tensor, _fn: HiddenFn = fn) -> Tensor | None:
                return _fn(out)

            handles.append(info.layers[l].act.register_forward_hook(hook))
        yield info
    finally:
        for h in handles:
            h.remove()


def _loader_inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "image", "images", "x"):
            if key in batch:
                return batch[key]
        raise TypeError(f"loader batch dict has no image key (keys: {sorted(batch)})")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"loader must yield (images, labels, ...) tuples, got {type(batch).__name__}")


@torch.no_grad()
def capture(
    model: nn.Module, x: Tensor, layers: int | Sequence[int] | None = None
) -> tuple[list[Tensor], Tensor]:
    """Clean post-activation FFN hiddens and logits in one forward.

    Args:
        model: a supported ViT (see :func:`~jas_prune.models.discover_ffn`).
        x: images ``[B, C, H, W]`` (moved to the model's device and dtype).
        layers: ``None`` (all blocks), a prefix depth, or a list of block indices.

    Returns:
        ``(hiddens, logits)``: ``hiddens[i]`` is ``[B, T, n]`` for the i-th selected block (in
        block order), detached; ``logits`` is ``[B, classes]``.
    """
    info = discover_ffn(model)
    idx = resolve_layers(info, layers, key="layers")
    store: dict[int, Tensor] = {}

    def saver(l: int) -> HiddenFn:
        def fn(h: Tensor) -> None:
            store[l] = h.detach()

        return fn

    x = x.to(device=model_device(model), dtype=model_dtype(model))
    with hook_hidden(model, {l: saver(l) for l in idx}, info):
        logits = model(x)
    return [store[l] for l in idx], logits.detach()


class _Welford:
    """Streaming mean / variance / mean |x| per neuron (Chan et al. parallel merge, float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.abs_sum: Tensor | None = None

    def update(self, h: Tensor) -> None:
        flat = h.reshape(-1, h.shape[-1]).to(torch.float64)
        n_b = flat.shape[0]
        if n_b == 0:
            return
        mean_b = flat.mean(0)
        m2_b = ((flat - mean_b) ** 2).sum(0)
        abs_b = flat.abs().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2, self.abs_sum = n_b, mean_b, m2_b, abs_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.abs_sum = self.abs_sum + abs_b
        self.count = n

    def result(self) -> dict[str, Any]:
        assert self.mean is not None and self.m2 is not None and self.abs_sum is not None
        return {
            "mean_abs": (self.abs_sum / self.count).float().cpu(),
            "mean": self.mean.float().cpu(),
            "var": (self.m2 / self.count).float().cpu(),
            "count": self.count,
        }


@torch.no_grad()
def activation_stats(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    scope: str = "all",
    max_batches: int | None = None,
) -> dict[int, dict[str, Any]]:
    """Per-neuron activation statistics, streamed over a loader.

    Statistics are over every token at the scope's positions (``all``: all tokens of all images;
    ``cls``: the class token of every image). Nothing but running sums is kept.

    Args:
        model: a supported ViT; put in eval mode for the pass and restored afterwards.
        loader: yields ``(images, labels, ...)`` tuples (or image tensors / dicts with
            ``pixel_values``).
        device: where to run (default: the model's device). The model is not moved.
        layers: ``None`` (all blocks), a prefix depth, or a list of block indices.
        scope: ``"all"`` (default) or ``"cls"``.
        max_batches: stop after this many batches.

    Returns:
        ``{block: {"mean_abs": [n], "mean": [n], "var": [n] (population variance), "count": int}}``
        as float32 CPU tensors.

    Raises:
        DataError-like ``ValueError`` when the loader is empty.
    """
    info = discover_ffn(model)
    idx = resolve_layers(info, layers, key="layers")
    check_scope(info, scope, key="scope")
    dev = torch.device(device) if device is not None else model_device(model)
    dtype = model_dtype(model)
    acc = {l: _Welford() for l in idx}

    def observer(l: int) -> HiddenFn:
        def fn(h: Tensor) -> None:
            acc[l].update(read_scope(h, scope))

        return fn

    with frozen_eval(model), hook_hidden(model, {l: observer(l) for l in idx}, info):
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            model(_loader_inputs(batch).to(device=dev, dtype=dtype))
    if acc[idx[0]].mean is None:
        raise InvalidArgumentError("activation_stats: the loader yielded no images")
    return {l: acc[l].result() for l in idx}


def _as_factor(mult: Tensor | float, hidden: Tensor, layer: int) -> Tensor:
    """Reshape a multiplier broadcastable to ``[B, n]`` into ``[B|1, 1, n|1]``."""
    m = torch.as_tensor(mult, device=hidden.device, dtype=hidden.dtype)
    if m.ndim > 2:
        raise InvalidArgumentError(f"edit: multiplier of block {layer} must broadcast to [B, n], got shape {tuple(m.shape)}")
    m2 = m.reshape(1, -1) if m.ndim == 1 else (m.reshape(1, 1) if m.ndim == 0 else m)
    try:
        torch.broadcast_shapes(m2.shape, (hidden.shape[0], hidden.shape[-1]))
    except RuntimeError:
        raise InvalidArgumentError(
            f"edit: multiplier of block {layer} with shape {tuple(m.shape)} does not broadcast to "
            f"[B, n] = [{hidden.shape[0]}, {hidden.shape[-1]}]"
        ) from None
    return m2.unsqueeze(1)


@contextlib.contextmanager
def edit(
    model: nn.Module, multipliers: Mapping[int, Tensor | float], scope: str = "cls"
) -> Iterator[None]:
    """Multiply FFN neurons during every forward inside the ``with`` block.

    ``multipliers[l]`` broadcasts to ``[B, n]`` (per-image, per-neuron factors; e.g. a ``[n]``
    mask of 0/1 for removal, 2 for enhancement) and scales the hidden of block ``l`` at the scope's
    positions (``cls``: token 0 only, the paper's protocol; ``all``: every token).

    Example:
        >>> with edit(model, {3: mask}, scope="cls"):
        ...     logits = model(x)
    """
    info = discover_ffn(model)
    check_scope(info, scope, key="scope")

    def scaler(l: int, mult: Tensor | float) -> HiddenFn:
        def fn(h: Tensor) -> Tensor:
            f = _as_factor(mult, h, l)
            if scope == "cls":
                return torch.cat([h[:, :1] * f, h[:, 1:]], dim=1)
            return h * f

        return fn

    for l in multipliers:
        if not isinstance(l, int) or not 0 <= l < info.depth:
            raise RecipeError(f"edit: block index {l!r} is out of range 0..{info.depth - 1}")
    with hook_hidden(model, {l: scaler(l, m) for l, m in multipliers.items()}, info):
        yield
