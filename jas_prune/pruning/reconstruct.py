"""Closed-form reconstruction of pruned FFNs (docs/torch-pruning.md and docs/benchmarks.md).

After some hidden neurons of a block's FFN are removed, the block's ``fc2`` (weight and bias) is
refit so that, on calibration tokens, the pruned FFN output matches a target computed with the
dense model. One vocabulary, cheapest first (``RECONSTRUCTIONS``):

- ``none``: leave the weights as pruned;
- ``bias``: refit ``fc2.bias`` alone (the mean shift; on dense inputs this is exactly
  ``prune_ffn(..., bias_compensation=stats)``, here it is fit on the pruned network's inputs);
- ``lsq``: ridge least squares for the whole ``fc2``: with the kept hidden ``h`` and the target
  ``y``, ``W = (Cov(h) + λ·mean(diag Cov(h))·I)⁻¹ Cov(h, y)`` and ``b = E[y] − E[h] W`` (the
  intercept is not damped), solved in float64 by Cholesky, with an eigen-decomposition
  pseudo-inverse when Cholesky fails.

Targets (``TARGETS``), for block l fed the pruned network's input ``x'``:

- ``local``: the dense FFN applied to the pruned block's own FFN input (``FFNLayer.ffn`` of the
  dense block on the input of the pruned ``fc1``);
- ``global``: the dense network's own FFN output at the same image and token (corrects upstream
  error that reaches the FFN output);
- ``residual``: the FFN output that makes the pruned block output the dense block's output: the
  dense block output minus the pruned block's stream after attention (``x' + attn(norm1(x'))``),
  divided by the block's own layer scale (``FFNLayer.scale_output``: timm ``ls2``, Eva/BEiT
  ``gamma_2``); for post-norm blocks (``x + LN(ffn(x))``) pulled back through the LayerNorm at the
  dense FFN output's per-token mean and scale (see :func:`_residual_target`). The FFN also
  absorbs the upstream error of the residual stream.

Everything is read through :class:`jas_prune.models.FFNLayer` (FFN input = input of ``fc1``,
hidden = input of ``fc2``, FFN output = output of ``fc2``), so every supported family (timm
VisionTransformer, Eva, Beit, VisionTransformerRelPos, Hugging Face ViT/DeiT) takes the same code.

Blocks are processed in order; block l's inputs come from the network pruned *and reconstructed*
so far. A refit is kept only when it lowers the block's calibration error (computed exactly from
the accumulated statistics), so reconstruction never increases it.

Cost and memory. Only sufficient statistics are accumulated per block (``Σh``, ``Σy``, ``Σhᵀh``,
``Σhᵀy``, ``Σ‖y‖²`` in float64: O(n²) for n kept neurons, independent of the number of images).
The calibration images are read once: the residual-stream input of the current block is cached
for every calibration image (N·T·D values, twice for the ``global``/``residual`` targets, which
also need the dense stream; ViT-B/16 with 768 images: 465 MB per stream in float32) and pushed
one block further per step, so the whole model costs about three forward passes over the
calibration set. When the cache would exceed ``cache_bytes`` the engine falls back to replaying
the images from the loader for every block (memory of one batch; about (L+1)/2 forward passes
per network instead of one).

The engine never needs to know which neurons were kept: the pruned hidden comes from the pruned
``fc1`` itself, so it works on models pruned by :func:`jas_prune.pruning.prune.prune_ffn` and by
``torch_pruning.pruner.MetaPruner`` alike (:func:`reconstruct`). :class:`SequentialReconstructor`
is the step-wise form for pruning and reconstructing one block at a time (layer-progressive
pruning: score block l+1 on the network pruned up to block l).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from jas_prune.errors import InvalidArgumentError, PruneSettingError, UnsupportedModelError
from jas_prune.models import FFNInfo, FFNLayer
from jas_prune.torchutil import frozen_eval, model_device, model_dtype

from .choices import DEFAULT_DAMPING, DEFAULT_TARGET, RECONSTRUCTIONS, TARGETS
from .graph import find_vit
from .linfit import LinearFit, ridge_solve

__all__ = [
    "RECONSTRUCTIONS",
    "TARGETS",
    "DEFAULT_DAMPING",
    "DEFAULT_TARGET",
    "DEFAULT_CACHE_BYTES",
    "LinearFit",
    "BlockReconstruction",
    "ReconstructionReport",
    "SequentialReconstructor",
    "reconstruct",
    "ridge_solve",
]

#: largest residual-stream cache (bytes) before replaying the images for every block.
DEFAULT_CACHE_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

@dataclass
class BlockReconstruction:
    """One block: calibration error (mean over tokens of ‖FFN output − target‖²) before and after.

    ``refit`` is False when the solve did not lower the error and the block was left as it was.
    ``energy`` is the mean ‖target‖², so ``error / energy`` is a relative error.
    """

    block: int
    width: int
    dense_width: int
    error_before: float
    error_after: float
    energy: float
    damping: float
    solver: str
    refit: bool
    tokens: int
    seconds: float

    @property
    def relative_before(self) -> float:
        return self.error_before / self.energy if self.energy > 0 else 0.0

    @property
    def relative_after(self) -> float:
        return self.error_after / self.energy if self.energy > 0 else 0.0


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did: settings, calibration size, seconds, and every block."""

    method: str
    target: str
    damping: float
    images: int = 0
    tokens_per_image: int = 0
    seconds: float = 0.0
    cache: str = "memory"
    cache_bytes: int = 0
    blocks: list[BlockReconstruction] = field(default_factory=list)
    #: the attention output projections refit (blocks whose heads or head dimensions were
    #: pruned; ``width`` = projection inputs kept), before each block's fc2
    attention: list[BlockReconstruction] = field(default_factory=list)
    #: the query/key logit compensations tried (``prune.attention.logits``; one
    #: :class:`~jas_prune.pruning.logits.LogitCompensation` per block with pruned head dimensions)
    logits: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (with each block's relative errors)."""
        d = asdict(self)
        for key in ("blocks", "attention"):
            for row, blk in zip(d[key], getattr(self, key)):
                row["relative_before"] = blk.relative_before
                row["relative_after"] = blk.relative_after
        return d


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once a block's input is captured."""


def _find_vit(model: nn.Module, name: str) -> tuple[nn.Module, FFNInfo]:
    """The supported ViT in ``model`` (itself or inside a wrapper) and its FFN layers."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return find_vit(model)


#: how a block is called: its positional arguments after the stream, and its keyword arguments
_Call = tuple[tuple[Any, ...], dict[str, Any]]


def _block_input(model: nn.Module, block: nn.Module, images: Tensor) -> tuple[Tensor, _Call]:
    """Run ``model`` on ``images`` until ``block`` is called; return its stream input and the rest
    of the call (rotary embeddings, shared position biases, attention masks...)."""
    got: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got["x"], got["call"] = args[0], (tuple(args[1:]), dict(kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise UnsupportedModelError("the model's forward never called its transformer block; "
                                    "reconstruction needs a ViT whose blocks run in order")
    return got["x"], got["call"]


def _run(block: nn.Module, x: Tensor, call: _Call) -> Tensor:
    args, kwargs = call
    return block(x, *args, **kwargs)


def _capture(module: nn.Module, store: dict[str, Tensor], key: str, *, output: bool) -> Any:
    """Hook storing a module's first input (``output=False``) or a copy of its output under ``key``
    (a copy: an in-place layer scale would otherwise rescale the stored tensor afterwards)."""
    if output:
        return module.register_forward_hook(lambda _m, _a, out: store.__setitem__(key, out.clone()))
    return module.register_forward_pre_hook(lambda _m, args: store.__setitem__(key, args[0]))


# -- the residual target: pulling the block-output error back to the FFN output ------------------

def _post_norm(layer: FFNLayer) -> nn.LayerNorm:
    """The norm a post-norm block applies to its FFN output before the residual add.

    Every supported post-norm block (timm ``ResPostBlock``, ``ResPostRelPosBlock``,
    ``EvaBlockPostNorm``) names it ``norm2``; :meth:`SequentialReconstructor.step` checks that it
    really receives the FFN output.

    Raises:
        PruneSettingError: anything but a LayerNorm over the embedding (it could not be inverted),
            or a layer scale on top of it.
    """
    norm = getattr(layer.block, "norm2", None)
    if norm is None:
        why = "the block has no norm2"
    elif not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        why = f"its norm2 is a {type(norm).__name__}, not a LayerNorm over the embedding"
    elif layer.layer_scale is not None:
        why = "a layer scale follows the norm"
    else:
        return norm
    raise PruneSettingError(f"target: 'residual' cannot invert the post-norm of block {layer.index} "
                            f"(x + norm(ffn(x))): {why}; use target 'local' or 'global'")


def _same(a: Tensor | None, b: Tensor) -> bool:
    return a is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _layer_gamma(layer: FFNLayer, like: Tensor) -> Tensor | None:
    """The layer scale of ``layer``'s FFN branch as a vector (None without one)."""
    if layer.layer_scale is None:
        return None
    return layer.scale_output(torch.ones(like.shape[-1], dtype=like.dtype, device=like.device))


def _residual_target(layer: FFNLayer, got: dict[str, Tensor], dense_got: dict[str, Tensor]) -> Tensor:
    """The FFN output that makes block ``layer`` output what the dense block outputs.

    ``got``/``dense_got`` hold each block's FFN input ``u``, FFN output ``f`` and block output
    ``out``. With ``mid`` the stream after attention (``mid_d`` the dense one's), the target is
    ``f_d + (mid_d − mid) / s``: the dense FFN output plus the upstream error of the stream seen
    through the branch's scale ``s``, written so that nothing cancels when ``mid = mid_d``
    (e.g. in the first block, where the target is exactly ``f_d``):

    - pre-norm blocks (``out = mid + γ ⊙ f``): ``s = γ``, the block's own layer scale
      (``FFNLayer.scale_output``; 1 without one); ``mid = out − γ ⊙ f``;
    - post-norm blocks (``out = mid + LN(f)``, the FFN reading ``mid`` itself): LN loses each
      token's mean and scale, so the target is the vector whose normalisation is ``LN``'s input
      for ``out_d`` taken at the dense FFN output's per-token mean and scale ``σ_d``:
      ``s = w / σ_d`` (``w`` the LayerNorm weight), ``mid = u``.

    Channels with ``s = 0`` never reach the stream; their target is ``f_d``.
    """
    f_d = dense_got["f"]
    if layer.post_norm:
        norm = _post_norm(layer)
        upstream = dense_got["u"] - got["u"]
        sigma = torch.sqrt(f_d.var(-1, unbiased=False, keepdim=True) + norm.eps)
        if norm.weight is None:
            return f_d + sigma * upstream
        live = norm.weight != 0
        return f_d + torch.where(live, sigma * upstream / torch.where(live, norm.weight, 1.0), 0.0)
    gamma = _layer_gamma(layer, f_d)
    if gamma is None:  # s = 1: f_d + (mid_d − mid)
        return f_d + (dense_got["out"] - f_d) - (got["out"] - got["f"])
    upstream = (dense_got["out"] - f_d * gamma) - (got["out"] - got["f"] * gamma)
    live = gamma != 0
    return f_d + torch.where(live, upstream / torch.where(live, gamma, 1.0), 0.0)


def _check_choice(value: Any, options: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise InvalidArgumentError(f"{name}: {value!r} is not one of {', '.join(options)}")
    return value


def _check_damping(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) or value < 0:
        raise InvalidArgumentError(f"damping: expected a finite number >= 0 (relative to the mean "
                                   f"diagonal of the hidden covariance), got {value!r}")
    return float(value)


def _check_count(value: Any, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name}: expected an integer >= {minimum} or None, got {value!r}")
    return int(value)


class SequentialReconstructor:
    """Step-wise reconstruction: :meth:`step` refits one block, blocks in increasing order.

    Between two steps the caller may prune the next blocks (e.g. after scoring them on the
    network pruned so far): a step always reads every block's *current* weights, and the cached
    residual stream is pushed through the earlier blocks only when the next step needs it.

    Args:
        pruned: the pruned ViT (changed in place: ``fc2`` of each stepped block).
        dense: the dense ViT it was pruned from (same depth and embedding width; not changed).
        loader: calibration batches ``(images, labels, ...)`` or plain image tensors; read once
            (or once per block when the stream cache exceeds ``cache_bytes``).
        method: ``bias`` or ``lsq`` (see ``RECONSTRUCTIONS``; ``none`` steps do nothing).
        target: ``local``, ``global`` or ``residual`` (see ``TARGETS``).
        damping: relative ridge damping λ ≥ 0 (``lsq`` only).
        max_images: use at most this many calibration images (None: all the loader yields).
        cache_bytes: largest residual-stream cache; above it, images are replayed per block.
        logits: query/key logit compensation tried before each attention projection refit
            (:mod:`jas_prune.pruning.logits`: ``none``, ``affine`` or ``centered``).
    """

    def __init__(self, pruned: nn.Module, dense: nn.Module, loader: Iterable, *, method: str = "lsq",
                 target: str = DEFAULT_TARGET, damping: float = DEFAULT_DAMPING,
                 max_images: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 logits: str = "none") -> None:
        from .logits import LOGIT_COMPENSATIONS

        self.method = _check_choice(method, RECONSTRUCTIONS, "method")
        self.target = _check_choice(target, TARGETS, "target")
        self.logits = _check_choice(logits, LOGIT_COMPENSATIONS, "logits")
        self.damping = _check_damping(damping)
        self.max_images = _check_count(max_images, "max_images", 1)
        cache = _check_count(cache_bytes, "cache_bytes", 0)
        self.cache_limit = DEFAULT_CACHE_BYTES if cache is None else cache
        if pruned is dense:
            raise InvalidArgumentError("dense: is the pruned model itself; pass the unpruned model "
                                       "(e.g. a copy.deepcopy taken before pruning)")
        self.pruned, self.info = _find_vit(pruned, "pruned")
        self.dense, self.dense_info = _find_vit(dense, "dense")
        self._check_pair()
        if self.logits != "none":  # refuse an unsupported family before any block is changed
            from .logits import qk_access

            self._qk = qk_access(self.pruned)
        if self.target == "residual":  # refuse before any block is changed
            for layer in self.info.layers:
                if layer.post_norm:
                    _post_norm(layer)
        if loader is None or isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
            raise InvalidArgumentError(f"loader: expected an iterable of image batches, got {type(loader).__name__}")
        self.loader = loader
        self.device, self.dtype = model_device(self.pruned), model_dtype(self.pruned)
        self.report = ReconstructionReport(method=self.method, target=self.target, damping=self.damping)
        self._chunks: list[dict[str, Any]] | None = None  # the cache; None before the first read
        self._replay = False
        self._last = -1

    # -- checks ----------------------------------------------------------------------------------
    def _check_pair(self) -> None:
        p, d = self.info, self.dense_info
        if p.depth != d.depth:
            raise InvalidArgumentError(f"dense: has {d.depth} blocks but the pruned model has {p.depth}")
        if model_device(self.dense) != model_device(self.pruned):
            raise InvalidArgumentError(f"dense: is on {model_device(self.dense)} but the pruned model on "
                                       f"{model_device(self.pruned)}; put both on one device")
        for lp, ld in zip(p.layers, d.layers):
            if lp.fc2.out_features != ld.fc2.out_features or lp.fc1.in_features != ld.fc1.in_features:
                raise InvalidArgumentError(
                    f"dense: block {lp.index} FFN maps {ld.fc1.in_features} -> {ld.fc2.out_features} "
                    f"but the pruned one {lp.fc1.in_features} -> {lp.fc2.out_features}; only FFN hidden "
                    "neurons may differ")
            if lp.hidden > ld.hidden:
                raise InvalidArgumentError(f"dense: block {lp.index} has {ld.hidden} FFN neurons, fewer than "
                                           f"the pruned model's {lp.hidden}; are the arguments swapped?")

    @property
    def _needs_dense_stream(self) -> bool:
        return self.target in ("global", "residual")

    # -- calibration images ----------------------------------------------------------------------
    def _images(self) -> Iterator[Tensor]:
        """Calibration image batches on the device, capped at ``max_images``."""
        seen = 0
        for batch in self.loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(images, Tensor) or images.ndim != 4:
                raise InvalidArgumentError("loader: batches must be image tensors [B, C, H, W] or "
                                           "(images, labels, ...) tuples")
            if self.max_images is not None:
                images = images[: self.max_images - seen]
            if len(images) == 0:
                continue
            seen += len(images)
            yield images.to(self.device, self.dtype if images.is_floating_point() else images.dtype)
            if self.max_images is not None and seen >= self.max_images:
                break

    def _fill_cache(self) -> None:
        """Read the calibration images once: block-0 inputs of both networks (or switch to replay)."""
        chunks: list[dict[str, Any]] = []
        size, images = 0, 0
        first_p, first_d = self.info.layers[0].block, self.dense_info.layers[0].block
        for x_img in self._images():
            x, call = _block_input(self.pruned, first_p, x_img)
            chunk: dict[str, Any] = {"x": x, "call": call, "pos": 0, "n": len(x_img)}
            size += x.numel() * x.element_size()
            if self._needs_dense_stream:
                chunk["xd"], chunk["calld"] = _block_input(self.dense, first_d, x_img)
                size += chunk["xd"].numel() * chunk["xd"].element_size()
            images += len(x_img)
            self.report.tokens_per_image = int(x.shape[1]) if x.ndim == 3 else 1
            if size > self.cache_limit:  # replay instead; the first replayed pass counts the images
                chunks, self._replay = [], True
                break
            chunks.append(chunk)
        if images == 0:
            raise InvalidArgumentError("loader: yielded no calibration images")
        self._chunks = chunks
        self.report.images = 0 if self._replay else images
        self.report.cache = "replay" if self._replay else "memory"
        self.report.cache_bytes = 0 if self._replay else size

    def _inputs(self, block: int) -> Iterator[dict[str, Any]]:
        """For every calibration batch: the inputs of ``block`` in the pruned (and dense) network."""
        if self._replay:
            blk_p, blk_d = self.info.layers[block].block, self.dense_info.layers[block].block
            images = 0
            for x_img in self._images():
                x, call = _block_input(self.pruned, blk_p, x_img)
                chunk: dict[str, Any] = {"x": x, "call": call}
                if self._needs_dense_stream:
                    chunk["xd"], chunk["calld"] = _block_input(self.dense, blk_d, x_img)
                images += len(x_img)
                yield chunk
            self.report.images = images
            return
        assert self._chunks is not None
        for chunk in self._chunks:
            while chunk["pos"] < block:  # push the cached stream through the blocks before
                k = chunk["pos"]
                chunk["x"] = _run(self.info.layers[k].block, chunk["x"], chunk["call"])
                if "xd" in chunk:
                    chunk["xd"] = _run(self.dense_info.layers[k].block, chunk["xd"], chunk["calld"])
                chunk["pos"] = k + 1
            yield chunk

    # -- one block -------------------------------------------------------------------------------
    def _target(self, block: int, chunk: dict[str, Any], got: dict[str, Tensor]) -> Tensor:
        """The target of block ``block``'s FFN output for one batch (``got``: the pruned block's
        FFN input ``u``, FFN output ``f`` and output ``out``)."""
        layer, layer_d = self.info.layers[block], self.dense_info.layers[block]
        if self.target == "local":
            return layer_d.ffn(got["u"])
        dense_got: dict[str, Tensor] = {}
        hooks = [_capture(layer_d.fc2, dense_got, "f", output=True),
                 _capture(layer_d.fc1, dense_got, "u", output=False)]
        try:
            dense_got["out"] = _run(layer_d.block, chunk["xd"], chunk["calld"])
        finally:
            for h in hooks:
                h.remove()
        if self.target == "global":
            return dense_got["f"]
        return _residual_target(layer, got, dense_got)

    def step(self, block: int) -> BlockReconstruction | None:
        """Refit ``fc2`` of ``block`` (its current weights; earlier blocks as they are now).

        Returns the block's report (None for method ``none``). Blocks must be stepped in
        increasing order.
        """
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.info.depth:
            raise InvalidArgumentError(f"blocks: {block!r} is not a block index 0..{self.info.depth - 1}")
        if block <= self._last:
            raise InvalidArgumentError(f"blocks: block {block} after block {self._last}; "
                                       "reconstruct blocks in increasing order")
        self._last = block
        if self.method == "none":
            return None
        self._refit_attention(block)
        t0 = time.perf_counter()
        layer = self.info.layers[block]
        fc2 = layer.fc2
        if fc2.bias is None:
            raise PruneSettingError(f"method: block {block} fc2 has no bias; '{self.method}' refits one")
        fit = LinearFit(fc2.in_features, fc2.out_features, device=self.device)
        with torch.no_grad(), frozen_eval(self.pruned), frozen_eval(self.dense):
            if self._chunks is None:
                self._fill_cache()
            for chunk in self._inputs(block):
                got: dict[str, Tensor] = {}
                hooks = [_capture(layer.fc1, got, "u", output=False), _capture(fc2, got, "h", output=False)]
                if self.target == "residual":
                    hooks.append(_capture(fc2, got, "f", output=True))
                    if layer.post_norm:
                        hooks.append(_capture(_post_norm(layer), got, "normed", output=False))
                try:
                    got["out"] = _run(layer.block, chunk["x"], chunk["call"])
                finally:
                    for h in hooks:
                        h.remove()
                if layer.post_norm and self.target == "residual" and not _same(got.get("normed"), got["f"]):
                    raise PruneSettingError(f"target: 'residual' cannot invert the post-norm of block {block} "
                                            "(x + norm(ffn(x))): its norm2 does not receive the FFN output; "
                                            "use target 'local' or 'global'")
                fit.add(got["h"], self._target(block, chunk, got))
            row = self._solve(fit, fc2, block, self.dense_info.layers[block].hidden, t0)
        self.report.blocks.append(row)
        self.report.seconds += row.seconds
        return row

    def _fit(self, fit: LinearFit, lin: nn.Linear) -> tuple[Tensor, Tensor, str, float, float]:
        """The refit of ``lin`` (not applied): weight, bias, solver, error before and after."""
        weight0, bias0 = lin.weight.detach(), lin.bias.detach()
        before = fit.error(weight0, bias0)
        if self.method == "bias":
            weight, bias, solver = weight0, fit.solve_bias(weight0), "mean"
        else:
            weight, bias, solver = fit.solve(self.damping)
        return weight, bias, solver, before, fit.error(weight, bias)

    def _best_error(self, fit: LinearFit, lin: nn.Linear) -> float:
        """The error :meth:`_solve` would leave (the refit's, or the current one when not lower)."""
        *_, before, after = self._fit(fit, lin)
        return after if after < before and math.isfinite(after) else before

    def _solve(self, fit: LinearFit, lin: nn.Linear, block: int, dense_width: int, t0: float) -> BlockReconstruction:
        """Refit ``lin`` from the accumulated statistics; keep it only if the error drops."""
        weight, bias, solver, before, after = self._fit(fit, lin)
        refit = bool(after < before) and math.isfinite(after)
        if refit:
            lin.weight.copy_(weight.to(lin.weight.dtype))
            lin.bias.copy_(bias.to(lin.bias.dtype))
        else:
            after = before
        return BlockReconstruction(
            block=block, width=lin.in_features, dense_width=dense_width,
            error_before=before, error_after=after, energy=fit.energy(),
            damping=self.damping if self.method == "lsq" else 0.0, solver=solver, refit=refit,
            tokens=fit.count, seconds=time.perf_counter() - t0)

    def _refit_attention(self, block: int) -> None:
        """Refit the attention output projection of a block whose heads or head dimensions were
        pruned (its input, the kept head outputs, is narrower than the dense one's): the same
        ridge least squares and keep-if-better rule as ``fc2``, towards the same kind of target —
        ``local``: the dense attention on the pruned block's attention input; ``global``: the
        dense attention output; ``residual``: what makes the stream after attention the dense
        one, ``(x_dense + ls1(attn_dense) − x') / γ₁`` (timm ``ls1``).

        With ``logits`` set, the query/key logit compensation is fit first and the projection
        refit accumulated twice, on the attention without and with it; the compensation is kept
        when the block's error after the refit is lower with it."""
        from ..models.heads import attention_of

        mine = attention_of(self.info.layers[block].block)
        dense = attention_of(self.dense_info.layers[block].block)
        if mine is None or dense is None or mine[1].in_features >= dense[1].in_features:
            return
        t0 = time.perf_counter()
        (attn, proj), (attn_d, _) = mine, dense
        layer, blk, blk_d = self.info.layers[block], self.info.layers[block].block, self.dense_info.layers[block].block
        if proj.bias is None:
            raise PruneSettingError(f"method: block {block} attention projection has no bias; '{self.method}' refits one")
        ls1 = getattr(blk, "ls1", nn.Identity())
        if self.target == "residual" and not (isinstance(ls1, nn.Identity) or hasattr(ls1, "gamma")):
            raise PruneSettingError(f"target: 'residual' needs block {block}'s attention layer scale (ls1); "
                                    "use target 'local' or 'global'")
        gamma_of = _attention_gamma(self.pruned)
        # a post-norm block (x + norm1(attn(x))) cannot pull the stream error back through the
        # norm: its attention is fitted to the dense attention output (the 'global' target)
        target = "global" if self.target == "residual" and layer.post_norm else self.target
        fit = LinearFit(proj.in_features, proj.out_features, device=self.device)
        with torch.no_grad(), frozen_eval(self.pruned), frozen_eval(self.dense):
            if self._chunks is None:
                self._fill_cache()
            delta = self._logit_delta(block, attn, attn_d)
            fit_c = LinearFit(proj.in_features, proj.out_features, device=self.device) if delta is not None else None
            for chunk in self._inputs(block):
                got: dict[str, Any] = {}
                hooks = [attn.register_forward_pre_hook(lambda _m, a, k: got.__setitem__("a", (a, k)),
                                                        with_kwargs=True),
                         _capture(proj, got, "h", output=False)]
                try:
                    _run(blk, chunk["x"], chunk["call"])
                finally:
                    for h in hooks:
                        h.remove()
                if target == "local":
                    args, kwargs = got["a"]
                    y = _first(attn_d(*args, **kwargs))
                else:
                    dense_got: dict[str, Tensor] = {}
                    hook = attn_d.register_forward_hook(lambda _m, _a, out: dense_got.__setitem__("y", _first(out).clone()))
                    try:
                        _run(blk_d, chunk["xd"], chunk["calld"])
                    finally:
                        hook.remove()
                    y = dense_got["y"]
                    if target == "residual":
                        gamma, gamma_d = gamma_of(blk), gamma_of(blk_d)
                        y = chunk["xd"] + (y if gamma_d is None else y * gamma_d) - chunk["x"]
                        y = y if gamma is None else y / gamma
                fit.add(got["h"], y)
                if delta is not None:  # the same block again, its queries compensated
                    got_c: dict[str, Tensor] = {}
                    hook = _capture(proj, got_c, "h", output=False)
                    try:
                        with delta.applied(attn):
                            _run(blk, chunk["x"], chunk["call"])
                    finally:
                        hook.remove()
                    fit_c.add(got_c["h"], y)
            if delta is not None:
                fit = self._choose_logits(block, attn, proj, delta, fit, fit_c, t0)
            row = self._solve(fit, proj, block, int(dense[1].in_features), t0)
        self.report.attention.append(row)
        self.report.seconds += row.seconds


    def _logit_delta(self, block: int, attn: nn.Module, attn_d: nn.Module) -> Any:
        """The query correction of ``block`` fit on its attention inputs (None without ``logits``
        or when no kept head lost a query/key channel)."""
        if self.logits == "none":
            return None
        from .logits import fit_query_delta

        blk = self.info.layers[block].block

        def inputs() -> Iterator[Tensor]:
            for chunk in self._inputs(block):
                got: dict[str, Tensor] = {}

                def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                    got["a"] = args[0] if args else kwargs["hidden_states"]  # Hugging Face passes it by name
                    raise _Stop

                handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
                try:
                    _run(blk, chunk["x"], chunk["call"])
                except _Stop:
                    pass
                finally:
                    handle.remove()
                yield got["a"]

        return fit_query_delta(self._qk, attn, attn_d, inputs(), candidate=self.logits, damping=self.damping,
                               block=block)

    def _choose_logits(self, block: int, attn: nn.Module, proj: nn.Linear, delta: Any, fit: LinearFit,
                       fit_c: LinearFit, t0: float) -> LinearFit:
        """Keep the compensation when the block's error after the projection refit is lower with
        it (then apply it); the statistics the refit uses."""
        from .logits import LogitCompensation

        without, with_ = self._best_error(fit, proj), self._best_error(fit_c, proj)
        kept = bool(with_ < without) and math.isfinite(with_)
        if kept:
            delta.apply(attn)
        self.report.logits.append(LogitCompensation(
            block=block, candidate=self.logits, error_without=without, error_with=with_, kept=kept,
            key_residual=delta.residual, key_energy=delta.energy, tokens=delta.tokens,
            seconds=time.perf_counter() - t0))
        return fit_c if kept else fit


def _first(out: Any) -> Tensor:
    """An attention module's output tensor (Hugging Face attention returns ``(output, weights)``)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _attention_gamma(model: nn.Module) -> Any:
    """``block -> layer scale of its attention branch`` (None: none) for ``model``'s family."""
    from ..models import FAMILIES
    from ..models.heads import GRAPH_LAYOUT

    layout = FAMILIES.get(find_vit(model)[1].family).attention
    return (layout or GRAPH_LAYOUT).gamma


def _narrower_attention(block: nn.Module, dense_block: nn.Module) -> bool:
    """Whether a block lost heads or head dimensions (its attention projection input is narrower)."""
    from ..models.heads import attention_of

    mine, dense = attention_of(block), attention_of(dense_block)
    return mine is not None and dense is not None and mine[1].in_features < dense[1].in_features


def reconstruct(pruned: nn.Module, dense: nn.Module, loader: Iterable, *, method: str = "lsq",
                target: str = DEFAULT_TARGET, damping: float = DEFAULT_DAMPING,
                max_images: int | None = None, blocks: Sequence[int] | None = None,
                cache_bytes: int = DEFAULT_CACHE_BYTES, logits: str = "none") -> ReconstructionReport:
    """Refit the FFN ``fc2`` of every pruned block of ``pruned`` to match ``dense``, in place.

    Works on any FFN-pruned model of a supported family (:mod:`jas_prune.models`) — pruned by
    :func:`~jas_prune.pruning.prune.prune_ffn` or by Torch-Pruning's ``MetaPruner`` — without
    knowing which neurons were kept: the pruned hidden comes from the pruned ``fc1`` itself.
    Torch-Pruning::

        dense = jas_prune.load_model("builtin:shapes-vit")
        model = copy.deepcopy(dense)
        tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5, ...).step()
        report = reconstruct(model, dense, probe_loader, max_images=768)

    The pipeline, right after :func:`~jas_prune.pruning.prune.prune_ffn` (no bias compensation there;
    ``method="bias"`` is its sequential form)::

        model = copy.deepcopy(dense)
        prune_ffn(model, scores, ratio=0.7)
        report = reconstruct(model, dense, probe_loader, method="lsq", max_images=768)

    Args:
        pruned: the pruned model (``fc2`` weights and biases change in place).
        dense: the model it was pruned from (unchanged).
        loader: calibration batches ``(images, labels, ...)`` or image tensors (probe images).
        method: ``none``, ``bias`` or ``lsq`` (``RECONSTRUCTIONS``).
        target: ``local``, ``global`` or ``residual`` (``TARGETS``).
        damping: relative ridge damping for ``lsq``.
        max_images: calibration images used at most.
        blocks: blocks to refit (default: every block whose FFN or attention is narrower than the
            dense one's; a block with pruned heads or head dimensions gets its attention output
            projection refit first, by the same rule).
        cache_bytes: residual-stream cache limit (see the module docstring).
        logits: query/key logit compensation of blocks with pruned head dimensions (``none``,
            ``affine``, ``centered``; :mod:`jas_prune.pruning.logits`), kept per block only when
            it lowers the block's calibration error after the projection refit.

    Returns:
        A :class:`ReconstructionReport` (per block: error before/after, damping, tokens, seconds).

    Raises:
        InvalidArgumentError: a bad argument (named).
        PruneSettingError: target ``residual`` on a post-norm block whose norm is not a LayerNorm
            (names the block; targets ``local``/``global`` work), or ``fc2`` without a bias.
    """
    engine = SequentialReconstructor(pruned, dense, loader, method=method, target=target, damping=damping,
                                     max_images=max_images, cache_bytes=cache_bytes, logits=logits)
    if blocks is None:
        todo = [l.index for l, d in zip(engine.info.layers, engine.dense_info.layers)
                if l.hidden < d.hidden or _narrower_attention(l.block, d.block)]
    else:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
            raise InvalidArgumentError(f"blocks: expected a list of block indices, got {blocks!r}")
        todo = sorted(set(blocks)) if all(isinstance(b, int) and not isinstance(b, bool) for b in blocks) \
            else list(blocks)
    t0 = time.perf_counter()
    for b in todo:
        engine.step(b)
    engine.report.seconds = time.perf_counter() - t0
    return engine.report
