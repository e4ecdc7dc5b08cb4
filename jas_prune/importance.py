"""Per-neuron FFN importance: the JAS Torch-Pruning plugin and the baseline criteria.

Every criterion here produces the same thing, a **score map**: block index -> 1-D float tensor
with one score per FFN neuron of that block (the hidden units of ``blk.mlp.fc1 -> act -> fc2``);
higher means more important. :class:`JASImportance` turns a score map into a
``torch_pruning.importance.Importance`` that scores only the groups rooted at an FFN ``fc1``
output-channel pruning and returns ``None`` for every other group, so a plain
``tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=r)`` removes FFN hidden
neurons (rows of ``fc1``, columns of ``fc2``) and nothing else.

Baselines (same budget, same pipeline): :func:`activation_scores` (mean |activation|),
:func:`variance_scores` (activation variance, VBP-style), :func:`random_scores` (seeded),
:func:`magnitude_scores` (Torch-Pruning group L2), :func:`taylor_scores` (Torch-Pruning group
Taylor on cross-entropy gradients) and :func:`vit_slim_scores` (learned per-neuron scales).
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .errors import FingerprintMismatchError
from .models import FFNInfo, discover_ffn

__all__ = [
    "ScoreMap",
    "NORMALIZERS",
    "CRITERIA",
    "JASImportance",
    "ActivationStats",
    "ffn_activation_stats",
    "activation_scores",
    "variance_scores",
    "random_scores",
    "magnitude_scores",
    "taylor_scores",
    "vit_slim_scores",
    "criterion_scores",
    "normalize_layer_scores",
    "ranking_scores",
    "check_score_map",
    "dependency_graph",
    "example_inputs_for",
]

#: block index -> 1-D float tensor of per-neuron scores (higher = more important).
ScoreMap = dict[int, torch.Tensor]

#: Per-layer normalisations applied before scores of different layers are compared.
NORMALIZERS = ("mean", "max", "minmax", "none")

#: Every pruning criterion :func:`criterion_scores` knows (the recipe's ``prune.methods``).
CRITERIA = ("jas", "vit_slim", "magnitude", "taylor", "activation", "variance", "random")


# --------------------------------------------------------------------------------------------
# score maps: validation, per-layer normalisation, protected neurons
# --------------------------------------------------------------------------------------------

def _as_score_tensor(value: Any, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except Exception as exc:  # noqa: BLE001 - anything that is not array-like
        raise ValueError(f"{name}: cannot be read as a 1-D tensor of scores ({exc})") from None
    t = t.detach().to("cpu", torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor of per-neuron scores, got shape "
                         f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite scores")
    return t


def _as_block(key: Any, name: str) -> int:
    """A block index from an int, a 0-d integer tensor, a NumPy integer or a digit string."""
    if isinstance(key, torch.Tensor) and key.ndim == 0 and not key.is_floating_point():
        key = int(key.item())
    elif isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, bool):
        raise ValueError(f"{name}: block keys must be integers, got {key!r}")
    try:
        block = operator.index(key)
    except TypeError:
        raise ValueError(f"{name}: block keys must be integers, got {key!r}") from None
    if block < 0:
        raise ValueError(f"{name}: block index {block} is negative")
    return int(block)


def _clean_score_map(scores: Mapping[Any, Any], name: str = "scores") -> ScoreMap:
    if isinstance(scores, JASImportance):
        return scores.scores
    if not isinstance(scores, Mapping):
        raise ValueError(f"{name}: expected a mapping block index -> 1-D tensor, got {type(scores).__name__}")
    if not scores:
        raise ValueError(f"{name}: empty mapping; give scores for at least one block")
    out: ScoreMap = {}
    for key, value in scores.items():
        block = _as_block(key, name)
        if block in out:
            raise ValueError(f"{name}: block {block} given twice")
        out[block] = _as_score_tensor(value, f"{name}[{block}]")
    return dict(sorted(out.items()))


def check_score_map(scores: Mapping[int, torch.Tensor], model_or_info: nn.Module | FFNInfo,
                    name: str = "scores") -> None:
    """Check that every block of ``scores`` exists in the model and has one score per neuron.

    Raises:
        ValueError: naming ``name`` and the block (unknown block, wrong length).
    """
    info = model_or_info if isinstance(model_or_info, FFNInfo) else discover_ffn(model_or_info)
    for block, s in scores.items():
        if not 0 <= block < info.depth:
            raise ValueError(f"{name}: block {block} does not exist; the model has FFN blocks "
                             f"0..{info.depth - 1}")
        n = info.layers[block].hidden
        if len(s) != n:
            raise ValueError(f"{name}[{block}]: {len(s)} scores for {n} FFN neurons of block {block}")


def _index_list(value: Any, n: int | None, name: str) -> list[int]:
    """Indices from a list/LongTensor of indices or a bool mask; checked against width ``n``."""
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    except Exception:  # noqa: BLE001 - strings, ragged lists...
        raise ValueError(f"{name}: expected neuron indices (integers) or a boolean mask") from None
    if t.dtype == torch.bool:
        if t.ndim != 1 or (n is not None and len(t) != n):
            raise ValueError(f"{name}: a boolean mask must be 1-D with one entry per FFN neuron "
                             f"({n}), got shape {tuple(t.shape)}")
        return t.nonzero().flatten().tolist()
    if t.numel() == 0:
        return []
    if t.is_floating_point() or t.ndim > 1:
        raise ValueError(f"{name}: expected neuron indices (integers) or a boolean mask")
    idx = sorted(set(int(i) for i in t.flatten().tolist()))
    if idx[0] < 0 or (n is not None and idx[-1] >= n):
        raise ValueError(f"{name}: neuron index {idx[0] if idx[0] < 0 else idx[-1]} out of range "
                         f"0..{(n - 1) if n is not None else '?'}")
    return idx


def _clean_protect(protect: Mapping[Any, Any] | None, widths: Mapping[int, int] | None,
                   name: str = "protect") -> dict[int, list[int]]:
    if protect is None:
        return {}
    if not isinstance(protect, Mapping):
        raise ValueError(f"{name}: expected a mapping block index -> neuron indices (or bool mask)")
    out: dict[int, list[int]] = {}
    for key, value in protect.items():
        block = _as_block(key, name)
        if widths is not None and block not in widths:
            raise ValueError(f"{name}: block {block} is not among the pruned blocks "
                             f"{sorted(widths)}")
        out[block] = _index_list(value, widths.get(block) if widths is not None else None,
                                 f"{name}[{block}]")
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
    raise ValueError(f"normalizer: unknown '{normalizer}'; choose one of {', '.join(NORMALIZERS)}")


def _floor_count(n: int, min_keep: float | int) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or min_keep < 0:
        raise ValueError(f"min_keep: expected a count >= 0 or a fraction in [0, 1), got {min_keep!r}")
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
        floor = _floor_count(len(r), min_keep)
        top = torch.sort(r, descending=True, stable=True).indices[:floor]
        r[top] = math.inf
        if protect.get(block):
            r[torch.as_tensor(protect[block], dtype=torch.long)] = math.inf
        out[block] = r
    return out


# --------------------------------------------------------------------------------------------
# Torch-Pruning helpers
# --------------------------------------------------------------------------------------------

def _find_vit(model: nn.Module) -> tuple[nn.Module, FFNInfo]:
    """The model itself, or the first VisionTransformer inside a wrapper, with its FFN layers."""
    try:
        return model, discover_ffn(model)
    except Exception:
        from timm.models.vision_transformer import VisionTransformer

        for sub in model.modules():
            if isinstance(sub, VisionTransformer) and sub is not model:
                return sub, discover_ffn(sub)
        raise


def example_inputs_for(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random image batch of the model's input size, on the model's device."""
    vit, _ = _find_vit(model)
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None) or (224, 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    param = next(model.parameters())
    return torch.randn(batch, 3, *size, device=param.device, dtype=param.dtype)


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor | None = None) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (traced once on ``example_inputs``).

    Torch-Pruning warns about the ViT's unwrapped ``cls_token``/``pos_embed`` parameters; they are
    never pruned here (only FFN hidden channels and the classifier's outputs are), so that warning
    is silenced.
    """
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        # TP traces the autograd graph: frozen parameters would hide layers from it
        for p in params:
            p.requires_grad_(True)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _fc1_groups(model: nn.Module, example_inputs: torch.Tensor | None) -> Iterator[tuple[int, Any]]:
    """(block, full group) for every FFN fc1 output-channel pruning group."""
    _, info = _find_vit(model)
    dg = dependency_graph(model, example_inputs)
    for layer in info.layers:
        yield layer.index, dg.get_pruning_group(layer.fc1, tp.prune_linear_out_channels,
                                                list(range(layer.hidden)))


# --------------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------------

class JASImportance(tp.importance.Importance):
    """Torch-Pruning importance from per-neuron FFN scores (JAS or any other score map).

    Only groups rooted at an FFN ``fc1`` output-channel pruning are scored (the root handler is
    compared with ``==`` against ``tp.prune_linear_out_channels`` and the root module by identity
    against the model's ``blk.mlp.fc1`` modules); every other group - attention ``qkv``/``proj``,
    the residual stream, the patch embedding, the head - gets ``None``, which ``MetaPruner`` skips.
    Blocks missing from the score map are not pruned either.

    Local and global mode: what is returned for a layer is its scores normalised per layer
    (``normalizer``, default ``mean``: s / mean(|s|), order-preserving and sign-safe) with the
    layer's top ``min_keep`` neurons (default 5 % of its width, at least one) and every
    ``protect``-ed neuron set to ``+inf``. In local mode (one ranking per layer) this changes
    nothing but the protection; in global mode (``global_pruning=True``, one ranking over all
    layers) the per-layer normalisation makes scales comparable and the ``+inf`` floor keeps any
    layer from collapsing.

    Args:
        scores: block index -> 1-D tensor, one score per FFN neuron (higher = more important).
        normalizer: ``mean`` | ``max`` | ``minmax`` | ``none``.
        min_keep: neurons of every layer never pruned by a global ranking (count or fraction).
        protect: block index -> neuron indices (or bool mask) that are never pruned.
        model: optional; by default the model is taken from the group's dependency graph.

    Raises:
        ValueError: malformed scores; at pruning time, a block the model does not have, or a
            score vector whose length differs from the block's current ``fc1`` width (e.g. after
            an earlier pruning step: recompute the scores for the pruned model).
        FingerprintMismatchError: the same, for scores read by :meth:`from_run`.
    """

    def __init__(self, scores: Mapping[int, Any], *, normalizer: str = "mean",
                 min_keep: float | int = 0.05, protect: Mapping[int, Any] | None = None,
                 model: nn.Module | None = None) -> None:
        self._scores = _clean_score_map(scores, "scores")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer: unknown '{normalizer}'; choose one of {', '.join(NORMALIZERS)}")
        _floor_count(1, min_keep)
        self.normalizer = normalizer
        self.min_keep = min_keep
        widths = {b: len(s) for b, s in self._scores.items()}
        self.protect = _clean_protect(protect, widths, "protect")
        self._ranked = ranking_scores(self._scores, normalizer=normalizer, min_keep=min_keep,
                                      protect=self.protect)
        self._model = model
        self._fc1_cache: tuple[int, dict[int, int]] | None = None
        self._run_dir: str | None = None
        #: where the scores came from (``scores``, a run directory, ``loader``) - for messages
        self.source = "scores"
        #: class indices the scores were aggregated over (None: all)
        self.classes: list[int] | None = None

    # -- readable back ------------------------------------------------------------------------
    @property
    def scores(self) -> ScoreMap:
        """The raw per-neuron scores, block index -> 1-D tensor (copies)."""
        return {b: s.clone() for b, s in self._scores.items()}

    def __repr__(self) -> str:
        blocks = ", ".join(f"{b}:{len(s)}" for b, s in self._scores.items())
        return f"JASImportance(blocks={{{blocks}}}, normalizer={self.normalizer!r}, source={self.source!r})"

    # -- Torch-Pruning entry point --------------------------------------------------------------
    def _error(self, msg: str, block: int | None = None) -> Exception:
        """ValueError for given scores; FingerprintMismatchError for a run's saved importance."""
        where = "" if block is None else f"[{block}]"
        if self._run_dir is not None:
            return FingerprintMismatchError(f"importance from run {self._run_dir}{where} does not fit this "
                                            f"model: {msg}")
        return ValueError(f"scores{where}: {msg}")

    def _block_map(self, group: Any) -> dict[int, int]:
        model = self._model if self._model is not None else getattr(getattr(group, "_DG", None), "model", None)
        if model is None:
            raise ValueError("JASImportance: the group carries no dependency graph; pass model=...")
        if self._fc1_cache is not None and self._fc1_cache[0] == id(model):
            return self._fc1_cache[1]
        _, info = _find_vit(model)
        for block in self._scores:
            if not 0 <= block < info.depth:
                raise self._error(f"block {block} does not exist; the model has FFN blocks "
                                  f"0..{info.depth - 1}")
        mapping = {id(layer.fc1): layer.index for layer in info.layers}
        self._fc1_cache = (id(model), mapping)
        return mapping

    def __call__(self, group: Any) -> torch.Tensor | None:
        root = group[0].dep
        if not root.handler == tp.prune_linear_out_channels:
            return None
        module = root.target.module
        block = self._block_map(group).get(id(module))
        if block is None or block not in self._ranked:
            return None
        ranked = self._ranked[block]
        if module.out_features != len(ranked):
            raise self._error(
                f"{len(ranked)} scores but block {block} fc1 has {module.out_features} neurons (pruned "
                "already? JASImportance scores a dense FFN once; for iterative pruning recompute the "
                "scores of the pruned model)", block)
        idxs = group[0].root_idxs if group[0].root_idxs is not None else group[0].idxs
        return ranked[torch.as_tensor(list(idxs), dtype=torch.long)].clone()

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_loader(cls, model: nn.Module, loader: Iterable, classes: Sequence[int] | None = None, *,
                    device: torch.device | str | None = None, max_batches: int | None = None,
                    normalizer: str = "mean", min_keep: float | int = 0.05,
                    protect: Mapping[int, Any] | None = None, **locate_settings: Any) -> "JASImportance":
        """Mean over images of the layer-progressive candidate scores JAS(P ∪ {j}).

        Args:
            model: the dense ViT.
            loader: batches ``(images, labels, ...)``.
            classes: keep only images of these labels (class-specialised importance).
            device: where to run (default: the model's device).
            max_batches: stop after this many batches.
            **locate_settings: keyword arguments of :func:`jas_prune.locate.locate`
                (``steps``, ``scope``, ``formula``, ``quadrature``, ``candidates``, ``target``...).
        """
        from .locate import locate

        sums: dict[int, torch.Tensor] = {}
        count = 0
        for images, labels in _iter_batches(loader, classes=classes, device=_device_of(model, device),
                                            max_batches=max_batches):
            result = locate(model, images, labels, **locate_settings)
            for block, s in zip(result.layers, result.scores):
                s = s.detach().to("cpu", torch.float64)
                sums[int(block)] = sums.get(int(block), 0) + s.sum(0)
            count += len(labels)
        if count == 0:
            raise ValueError("classes: no image of the loader has one of the labels "
                             f"{list(classes) if classes is not None else []}")
        imp = cls({b: (s / count).float() for b, s in sums.items()}, normalizer=normalizer,
                  min_keep=min_keep, protect=protect, model=None)
        imp.source = "loader"
        imp.classes = sorted(int(c) for c in classes) if classes is not None else None
        return imp

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], classes: Sequence[int | str] | None = None, *,
                 aggregation: str = "mean", protect_topk: bool | None = None, normalizer: str = "mean",
                 min_keep: float | int = 0.05, model: nn.Module | None = None,
                 digest: str | None = None) -> "JASImportance":
        """Dense per-class importance saved by a run's ``aggregate`` stage.

        The score of a neuron is the mean over the probe images of the selected classes (all when
        ``classes`` is None) of its candidate score, i.e. the per-class means weighted by the
        classes' image counts.

        Args:
            run_dir: a run directory holding ``masks.*``.
            classes: class indices or names (class-specialised importance).
            aggregation: ``mean`` (the signed candidate score, SPEC), ``mean_abs`` or
                ``mean_abs_centered`` (see :data:`jas_prune.aggregate.IMPORTANCE_AGGREGATIONS`).
            protect_topk: never prune the class TopK masks of ``classes`` (default: True when
                ``classes`` is given, False otherwise).
            model: when given, refuse masks computed on other weights (compared by the weights
                digest the run stored); without it only the FFN widths are checked, at pruning.
            digest: the same check with an already computed
                :func:`~jas_prune.pathstore.weights_digest` of the model.

        Raises:
            ValueError: unknown class; an unknown aggregation, or one an older masks file does
                not hold.
            FingerprintMismatchError: the saved importance does not fit the masks' layers, or
                ``model``/``digest`` differ from the model the masks were computed on.
        """
        from .aggregate import load_masks

        masks = load_masks(run_dir)
        if model is not None and digest is None:
            from .pathstore import weights_digest

            digest = weights_digest(model)
        if digest is not None:
            masks.check_model(digest, source=str(run_dir))
        names = list(masks.class_names)
        importance = torch.as_tensor(masks.importance_for(aggregation), dtype=torch.float64)
        topk = torch.as_tensor(masks.topk, dtype=torch.bool)
        counts = torch.as_tensor(masks.counts, dtype=torch.float64)
        layers = [int(b) for b in masks.layers]
        if importance.ndim != 3 or importance.shape[1] != len(layers) or importance.shape[0] != len(names):
            raise FingerprintMismatchError(
                f"{run_dir}: masks importance has shape {tuple(importance.shape)}, expected "
                f"[classes={len(names)}, layers={len(layers)}, neurons]")
        sel = _resolve_classes(classes, names)
        weights = counts[sel]
        valid = weights > 0
        if not bool(valid.any()):
            raise ValueError(f"classes: none of {[names[c] for c in sel]} has probe images in {run_dir}")
        sel_valid = [c for c, ok in zip(sel, valid.tolist()) if ok]
        w = counts[sel_valid]
        dense = (torch.nan_to_num(importance[sel_valid]) * w[:, None, None]).sum(0) / w.sum()
        scores = {b: dense[j].float() for j, b in enumerate(layers)}
        if protect_topk is None:
            protect_topk = classes is not None
        protect = None
        if protect_topk:
            protect = {b: topk[sel, j].any(0) for j, b in enumerate(layers)}
        imp = cls(scores, normalizer=normalizer, min_keep=min_keep, protect=protect)
        imp.source = imp._run_dir = str(run_dir)
        imp.classes = None if classes is None else sel
        imp.aggregation = aggregation
        imp.fingerprint = dict(getattr(masks, "fingerprint", {}) or {})  # type: ignore[attr-defined]
        return imp


def _resolve_classes(classes: Sequence[int | str] | None, names: Sequence[str]) -> list[int]:
    if classes is None:
        return list(range(len(names)))
    if isinstance(classes, (str, int)):
        classes = [classes]
    out: list[int] = []
    for c in classes:
        if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
            if c not in names:
                raise ValueError(f"classes: unknown class name '{c}'")
            idx = names.index(c)
        else:
            idx = int(c)
            if not 0 <= idx < len(names):
                raise ValueError(f"classes: class index {idx} out of range 0..{len(names) - 1}")
        if idx not in out:
            out.append(idx)
    if not out:
        raise ValueError("classes: empty class list")
    return sorted(out)


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------

def _no_images(classes: Sequence[int] | None) -> ValueError:
    return ValueError("loader: no images" + (f" of classes {list(classes)}" if classes is not None else ""))


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _iter_batches(loader: Iterable, *, classes: Sequence[int] | None = None,
                  device: torch.device | str = "cpu", max_batches: int | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) on ``device`` from batches ``(images, labels, ...)``, optionally filtered."""
    keep = None if classes is None else torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.long)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("loader: batches must be (images, labels, ...) tuples")
        images, labels = batch[0], torch.as_tensor(batch[1])
        if keep is not None:
            mask = torch.isin(labels.cpu(), keep)
            if not bool(mask.any()):
                continue
            images, labels = images[mask.to(images.device)], labels[mask.to(labels.device)]
        yield images.to(device), labels.to(device)


#: per-block activation statistics as returned by :func:`jas_prune.neurons.activation_stats`:
#: ``{"mean_abs": [n], "mean": [n], "var": [n], "count": int}``
ActivationStats = dict[str, Any]


def ffn_activation_stats(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                         device: torch.device | str | None = None, max_batches: int | None = None
                         ) -> dict[int, ActivationStats]:
    """Mean, mean |.| and variance of every FFN neuron over all tokens of the probe images
    (optionally only those of ``classes``): :func:`jas_prune.neurons.activation_stats` at scope
    ``all`` (structured pruning removes a neuron at every token position)."""
    from .neurons import activation_stats

    dev = _device_of(model, device)
    batches = _Batches(loader, classes=classes, device=dev, max_batches=max_batches)
    try:
        return activation_stats(model, batches, dev, scope="all")
    except ValueError:
        if batches.seen == 0:
            raise _no_images(classes) from None
        raise


class _Batches:
    """Re-iterable view of ``_iter_batches`` that counts the images it yields."""

    def __init__(self, loader: Iterable, **kwargs: Any) -> None:
        self.loader, self.kwargs, self.seen = loader, kwargs, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in _iter_batches(self.loader, **self.kwargs):
            self.seen += len(labels)
            yield images, labels


# --------------------------------------------------------------------------------------------
# baseline criteria
# --------------------------------------------------------------------------------------------

def activation_scores(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                      device: torch.device | str | None = None, max_batches: int | None = None,
                      stats: Mapping[int, ActivationStats] | None = None) -> ScoreMap:
    """Mean |activation| of every FFN neuron over probe tokens (pass ``stats`` to reuse a pass)."""
    stats = stats or ffn_activation_stats(model, loader, classes=classes, device=device,
                                          max_batches=max_batches)
    return {b: torch.as_tensor(st["mean_abs"]).float().clone() for b, st in sorted(stats.items())}


def variance_scores(model: nn.Module, loader: Iterable, *, classes: Sequence[int] | None = None,
                    device: torch.device | str | None = None, max_batches: int | None = None,
                    stats: Mapping[int, ActivationStats] | None = None) -> ScoreMap:
    """Activation variance over probe tokens (variance-based pruning, VBP): a low-variance
    neuron is close to a constant, which bias compensation folds into ``fc2.bias``."""
    stats = stats or ffn_activation_stats(model, loader, classes=classes, device=device,
                                          max_batches=max_batches)
    return {b: torch.as_tensor(st["var"]).float().clone() for b, st in sorted(stats.items())}


def random_scores(model: nn.Module, *, seed: int = 0) -> ScoreMap:
    """Uniform random scores, reproducible for a seed (independent of the global RNG)."""
    _, info = _find_vit(model)
    gen = torch.Generator().manual_seed(int(seed))
    return {l.index: torch.rand(l.hidden, generator=gen) for l in info.layers}


def magnitude_scores(model: nn.Module, example_inputs: torch.Tensor | None = None, *, p: int = 2) -> ScoreMap:
    """Torch-Pruning group magnitude (L2 by default) of each FFN neuron's group: its ``fc1`` row
    and ``fc2`` column (``GroupMagnitudeImportance``, mean group reduction, no normaliser)."""
    scorer = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)
    return {b: scorer(g).detach().float().cpu() for b, g in _fc1_groups(model, example_inputs)}


def taylor_scores(model: nn.Module, loader: Iterable, *, example_inputs: torch.Tensor | None = None,
                  classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                  max_batches: int | None = None) -> ScoreMap:
    """Torch-Pruning group Taylor importance |w · dL/dw| of each FFN neuron's group, with the
    gradients of the cross-entropy accumulated over the probe batches. The model's parameters,
    ``requires_grad`` flags and ``.grad`` are left as they were."""
    _, info = _find_vit(model)
    dev = _device_of(model, device)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    targets = {id(p) for l in info.layers for m in (l.fc1, l.fc2) for p in m.parameters()}
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(id(p) in targets)
            p.grad = None
        model.eval()
        seen = 0
        for images, labels in _iter_batches(loader, classes=classes, device=dev, max_batches=max_batches):
            loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
            loss.backward()
            seen += len(labels)
        if seen == 0:
            raise _no_images(classes)
        scorer = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
        return {b: scorer(g).detach().float().cpu() for b, g in _fc1_groups(model, example_inputs)}
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)


def vit_slim_scores(model: nn.Module, loader: Iterable, *, lam: float = 1e-4, epochs: float = 3.0,
                    lr: float = 1e-2, classes: Sequence[int] | None = None,
                    device: torch.device | str | None = None, max_steps: int | None = None) -> ScoreMap:
    """ViT-Slim-style learned soft mask: one scale per FFN neuron (init 1) multiplies the output
    of ``blk.mlp.act``; the scales alone are trained (model parameters frozen, eval mode) with
    Adam on cross-entropy + ``lam`` · Σ|scale| over the probe data for ``epochs`` passes
    (fractional allowed); the score is |scale|.
    """
    if lam < 0:
        raise ValueError(f"lam: must be >= 0, got {lam}")
    if not epochs > 0:
        raise ValueError(f"epochs: must be > 0, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    _, info = _find_vit(model)
    dev = _device_of(model, device)
    scales = {l.index: nn.Parameter(torch.ones(l.hidden, device=dev)) for l in info.layers}

    def hook_for(block: int):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return out * scales[block]
        return hook

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = model.training
    handles = [l.act.register_forward_hook(hook_for(l.index)) for l in info.layers]
    opt = torch.optim.Adam(list(scales.values()), lr=lr)
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        total = (max(1, math.ceil(epochs * per_epoch)) if per_epoch else None)
        if max_steps is not None:
            total = max_steps if total is None else min(total, max_steps)
        step, passes = 0, 0
        while total is None or step < total:
            got = False
            for images, labels in _iter_batches(loader, classes=classes, device=dev):
                got = True
                loss = nn.functional.cross_entropy(model(images), labels)
                loss = loss + lam * sum(s.abs().sum() for s in scales.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if total is not None and step >= total:
                    break
            passes += 1
            if not got:
                raise _no_images(classes)
            if total is None and passes >= max(1, math.ceil(epochs)):
                break
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {b: s.detach().abs().float().cpu() for b, s in scales.items()}


def criterion_scores(method: str, model: nn.Module, loader: Iterable | None = None, *,
                     classes: Sequence[int] | None = None, example_inputs: torch.Tensor | None = None,
                     seed: int = 0, device: torch.device | str | None = None,
                     max_batches: int | None = None, vit_slim: Mapping[str, Any] | None = None,
                     stats: Mapping[int, ActivationStats] | None = None,
                     **locate_settings: Any) -> ScoreMap:
    """Score map of any criterion by name (``CRITERIA``), on the probe ``loader``.

    ``vit_slim`` takes ``lambda``/``lam``, ``epochs``, ``lr``; ``locate_settings`` go to
    :meth:`JASImportance.from_loader` for ``jas``; ``stats`` reuses one activation pass for
    ``activation``/``variance``.
    """
    if method not in CRITERIA:
        raise ValueError(f"method: unknown pruning criterion '{method}'; choose one of {', '.join(CRITERIA)}")
    if method == "random":
        return random_scores(model, seed=seed)
    if method == "magnitude":
        return magnitude_scores(model, example_inputs)
    if loader is None:
        raise ValueError(f"loader: the '{method}' criterion needs probe data")
    if method == "activation":
        return activation_scores(model, loader, classes=classes, device=device, max_batches=max_batches,
                                 stats=stats)
    if method == "variance":
        return variance_scores(model, loader, classes=classes, device=device, max_batches=max_batches,
                               stats=stats)
    if method == "taylor":
        return taylor_scores(model, loader, example_inputs=example_inputs, classes=classes, device=device,
                             max_batches=max_batches)
    if method == "vit_slim":
        cfg = dict(vit_slim or {})
        lam = cfg.pop("lambda", cfg.pop("lambda_", cfg.pop("lam", 1e-4)))
        unknown = set(cfg) - {"epochs", "lr"}
        if unknown:
            raise ValueError(f"vit_slim: unknown setting(s) {sorted(unknown)}; use lambda, epochs, lr")
        return vit_slim_scores(model, loader, lam=float(lam), epochs=float(cfg.get("epochs", 3.0)),
                               lr=float(cfg.get("lr", 1e-2)), classes=classes, device=device)
    return JASImportance.from_loader(model, loader, classes, device=device, max_batches=max_batches,
                                     **locate_settings).scores
