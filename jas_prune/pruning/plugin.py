"""JASImportance: a score map as a Torch-Pruning importance for FFN neurons.

``tp.pruner.MetaPruner(model, example_inputs, importance=JASImportance(scores), pruning_ratio=r)``
removes FFN hidden neurons (rows of the input projections, columns of ``fc2``) and nothing else:
only groups rooted at an FFN input projection's output channels are scored, every other group
gets ``None``. With ``fallback=<another tp Importance>`` every other group (attention heads, the
embedding) is scored by the fallback instead, so one ``MetaPruner`` prunes heads and FFN neurons
together, with all of its options (``num_heads``, ``prune_num_heads``, ``head_pruning_ratio``,
``round_to``, ``global_pruning``, ``isomorphic``, ``pruning_ratio_dict``, ``max_pruning_ratio``,
``iterative_steps``). The scores may be JAS (:meth:`JASImportance.from_loader`,
:meth:`JASImportance.from_run`) or any other criterion's score map.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..errors import FingerprintMismatchError, InvalidArgumentError
from .graph import check_prunable, find_vit, update_attention_geometry
from .scoremap import ScoreMap, check_normalizer, clean_protect, clean_score_map, floor_count, ranking_scores
from .stats import device_of, iter_batches

__all__ = ["JASImportance"]


class JASImportance(tp.importance.Importance):
    """Torch-Pruning importance from per-neuron FFN scores (JAS or any other score map).

    Only groups rooted at an FFN input projection's output channels are scored (the root handler
    is compared with ``==`` against ``tp.prune_linear_out_channels`` and the root module by
    identity against every block's ``FFNLayer.inputs``: ``fc1``, or ``fc1_g``/``fc1_x`` of a gated
    FFN); every other group - attention ``qkv``/``proj``, the residual stream, the patch
    embedding, the head - gets ``None``, which ``MetaPruner`` skips, or, with ``fallback``, the
    fallback importance's scores. FFN blocks missing from the score map are not pruned (the
    fallback does not score them either).

    Without a fallback, ``MetaPruner``'s head-pruning options (``num_heads``,
    ``prune_num_heads``, ``head_pruning_ratio``, ``head_pruning_ratio_dict``) and
    ``pruning_ratio_dict`` entries for non-FFN modules do nothing; a ``UserWarning`` naming them is
    issued once per pruner.

    Iterative pruning (``MetaPruner(iterative_steps=k)``): an importance built by
    :meth:`from_loader` recomputes its scores on the pruned model at the start of every step
    (the ``rescores`` attribute counts how often); one built from scores or a run scores the dense
    model once and refuses ``iterative_steps > 1`` at the first step, before anything is pruned.

    Local and global mode: what is returned for a layer is its scores normalised per layer
    (``normalizer``, default ``mean``: s / mean(|s|), order-preserving and sign-safe) with the
    layer's top ``min_keep`` neurons (default 5 % of its width, at least one) and every
    ``protect``-ed neuron set to ``+inf``. In local mode (one ranking per layer) this changes
    nothing but the protection; in global mode (``global_pruning=True``, one ranking over all
    layers) the per-layer normalisation makes scales comparable and the ``+inf`` floor keeps any
    layer from collapsing.

    One instance may serve several models (copies of one dense model, say): the ``fc1`` module ->
    block map is kept per module with weak references, so a model that is freed, or whose
    ``fc1`` modules are replaced, is never mistaken for another.

    Args:
        scores: block index -> 1-D tensor, one score per FFN neuron (higher = more important).
        normalizer: ``mean`` | ``max`` | ``minmax`` | ``none``.
        min_keep: neurons of every layer never pruned by a global ranking (count or fraction).
        protect: block index -> neuron indices (or bool mask) that are never pruned.
        model: optional; by default the model is taken from the group's dependency graph.
        fallback: a Torch-Pruning importance (e.g. ``tp.importance.GroupMagnitudeImportance()``)
            for every group that is not an FFN neuron group.
        head_scores: block index -> one score per attention head (head JAS, e.g. from a run that
            located heads: :meth:`from_run` reads them). Groups rooted at a block's fused ``qkv``
            output channels (``MetaPruner(num_heads=..., prune_num_heads=True)``) or at its
            attention projection's input channels then get each channel's head score, so
            ``MetaPruner`` ranks heads by head JAS without a fallback (head *dimensions* all tie:
            JAS scores whole heads — use ``prune_head_dims=False``).

    Attributes:
        run_dir: the run directory the scores were read from (:meth:`from_run`), else None; a
            mismatch with the model is then a ``FingerprintMismatchError`` naming it.
        source: where the scores came from (``scores``, ``loader`` or the run directory).
        classes: class indices the scores were aggregated over (None: all).
        aggregation, fingerprint: :meth:`from_run` only, the masks' importance aggregation and
            the fingerprint they were computed with.

    Raises:
        InvalidArgumentError: malformed scores; at pruning time, a block the model does not have,
            or a block whose width differs from its scores (e.g. pruned already).
    """

    def __init__(self, scores: Mapping[int, Any], *, normalizer: str = "mean",
                 min_keep: float | int = 0.05, protect: Mapping[int, Any] | None = None,
                 model: nn.Module | None = None, fallback: Any = None,
                 head_scores: Mapping[int, Any] | None = None) -> None:
        if isinstance(scores, JASImportance):
            scores = scores.scores
        if isinstance(fallback, JASImportance):
            raise InvalidArgumentError("fallback: another JASImportance scores FFN groups only; pass a "
                                       "Torch-Pruning importance such as tp.importance.GroupMagnitudeImportance()")
        if fallback is not None and not callable(fallback):
            raise InvalidArgumentError(f"fallback: expected a Torch-Pruning importance (callable on a group), "
                                       f"got {type(fallback).__name__}")
        self.fallback = fallback
        self._head_scores = clean_score_map(head_scores, "head_scores") if head_scores else {}
        self._scores = clean_score_map(scores, "scores")
        self.normalizer = check_normalizer(normalizer)
        floor_count(1, min_keep)
        self.min_keep = min_keep
        widths = {b: len(s) for b, s in self._scores.items()}
        self.protect = clean_protect(protect, widths, "protect")
        self._ranked = ranking_scores(self._scores, normalizer=normalizer, min_keep=min_keep,
                                      protect=self.protect)
        self._model = model
        #: FFN input projection -> block index; weak keys, so a freed module can never match a new one
        self._fc1_blocks: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        #: pruners already checked for options that do nothing (warned at most once each)
        self._pruners_seen: weakref.WeakSet[Any] = weakref.WeakSet()
        #: from_loader only: what recomputes the scores on a pruned model (iterative pruning)
        self._rescore: dict[str, Any] | None = None
        #: how often the scores were recomputed on a pruned model
        self.rescores = 0
        self.run_dir: str | None = None
        self.source = "scores"
        self.classes: list[int] | None = None
        #: from_run only: the masks' aggregation and fingerprint
        self.aggregation: str | None = None
        self.fingerprint: dict[str, Any] = {}

    # -- readable back ------------------------------------------------------------------------
    @property
    def scores(self) -> ScoreMap:
        """The raw per-neuron scores, block index -> 1-D tensor (copies)."""
        return {b: s.clone() for b, s in self._scores.items()}

    def __repr__(self) -> str:
        blocks = ", ".join(f"{b}:{len(s)}" for b, s in self._scores.items())
        fb = f", fallback={type(self.fallback).__name__}" if self.fallback is not None else ""
        return f"JASImportance(blocks={{{blocks}}}, normalizer={self.normalizer!r}, source={self.source!r}{fb})"

    # -- Torch-Pruning entry point --------------------------------------------------------------
    def _error(self, msg: str, block: int | None = None) -> Exception:
        """InvalidArgumentError for given scores; FingerprintMismatchError for a run's importance."""
        where = "" if block is None else f"[{block}]"
        if self.run_dir is not None:
            return FingerprintMismatchError(f"importance from run {self.run_dir}{where} does not fit this "
                                            f"model: {msg}")
        return InvalidArgumentError(f"scores{where}: {msg}")

    def _model_of(self, group: Any) -> nn.Module:
        model = self._model if self._model is not None else getattr(getattr(group, "_DG", None), "model", None)
        if model is None:
            raise InvalidArgumentError("JASImportance: the group carries no dependency graph; pass model=...")
        return model

    def _block_of(self, module: nn.Module, group: Any) -> int | None:
        """The block one of whose FFN input projections is ``module``, or None."""
        block = self._fc1_blocks.get(module)
        if block is not None:
            return block
        _, info = find_vit(self._model_of(group))
        for b in self._scores:
            if not 0 <= b < info.depth:
                raise self._error(f"block {b} does not exist; the model has FFN blocks 0..{info.depth - 1}")
        check_prunable(info)
        for layer in info.layers:
            for m in layer.inputs:
                self._fc1_blocks[m] = layer.index
        return self._fc1_blocks.get(module)

    def _ffn_block(self, group: Any) -> int | None:
        root = group[0].dep
        if not root.handler == tp.prune_linear_out_channels:
            return None
        return self._block_of(root.target.module, group)

    def __call__(self, group: Any) -> torch.Tensor | None:
        pruner = _calling_pruner()
        if pruner is not None and pruner not in self._pruners_seen:
            self._pruners_seen.add(pruner)
            self._check_pruner(pruner)
        block = self._ffn_block(group)
        if block is None:
            heads = self._head_channel_scores(group) if self._head_scores else None
            if heads is not None:
                return heads
            return self.fallback(group) if self.fallback is not None else None
        if block not in self._ranked:
            return None
        module = group[0].dep.target.module
        if module.out_features != len(self._ranked[block]):
            self._follow_pruning(group, block, module.out_features, pruner)
        ranked = self._ranked[block]
        idxs = group[0].root_idxs if group[0].root_idxs is not None else group[0].idxs
        return ranked[torch.as_tensor(list(idxs), dtype=torch.long)].clone()

    def _head_channel_scores(self, group: Any) -> torch.Tensor | None:
        """Each root channel's head score, for a group rooted at a block's ``qkv`` output or
        attention projection input (None for any other group)."""
        from ..models.heads import discover_heads

        dep = group[0].dep
        module = dep.target.module
        _, info = find_vit(self._model_of(group))
        for h in discover_heads(info):
            qkv = getattr(h.attn, "qkv", None)
            rooted = (module is qkv and dep.handler == tp.prune_linear_out_channels) or \
                (module is h.proj and dep.handler == tp.prune_linear_in_channels)
            if not rooted or h.index not in self._head_scores:
                continue
            s = self._head_scores[h.index]
            if len(s) != h.heads:
                raise self._error(f"{len(s)} head scores but block {h.index} has {h.heads} heads", h.index)
            idxs = group[0].root_idxs if group[0].root_idxs is not None else group[0].idxs
            channel = torch.as_tensor(list(idxs), dtype=torch.long) % h.proj.in_features
            return s.float()[channel // h.head_dim].clone()
        return None

    # -- MetaPruner options and iterative pruning ------------------------------------------------
    def _check_pruner(self, pruner: Any) -> None:
        """Warn once about MetaPruner options that do nothing without a fallback; refuse
        ``iterative_steps > 1`` for scores that cannot follow the pruning."""
        steps = int(getattr(pruner, "iterative_steps", 1) or 1)
        if steps > 1 and self._rescore is None:
            raise InvalidArgumentError(
                f"iterative_steps: MetaPruner(iterative_steps={steps}) prunes the model again at every step, "
                f"but this JASImportance (from {self.source}) holds scores of the dense widths only; build it "
                "with JASImportance.from_loader(model, loader, ...), which recomputes the scores on the pruned "
                "model at each step, or prune in one step")
        if steps > 1 and self.protect:
            raise InvalidArgumentError(
                f"iterative_steps: MetaPruner(iterative_steps={steps}) with protected neurons: their indices "
                "refer to the dense model and cannot follow the pruning; drop protect or prune in one step")
        if self.fallback is not None:
            return
        ignored = []
        if getattr(pruner, "num_heads", None):
            ignored.append("num_heads")
        if getattr(pruner, "prune_num_heads", False):
            ignored.append("prune_num_heads")
        if float(getattr(pruner, "head_pruning_ratio", 0.0) or 0.0) > 0:
            ignored.append("head_pruning_ratio")
        if getattr(pruner, "head_pruning_ratio_dict", None):
            ignored.append("head_pruning_ratio_dict")
        others = self._non_ffn_ratio_keys(pruner)
        if others:
            more = f" and {len(others) - 2} more" if len(others) > 2 else ""
            ignored.append(f"pruning_ratio_dict entries for non-FFN modules ({', '.join(others[:2])}{more})")
        if ignored:
            warnings.warn(
                "JASImportance scores FFN neurons only and has no fallback importance, so these MetaPruner "
                f"options do nothing: {'; '.join(ignored)}. Pass JASImportance(..., fallback="
                "tp.importance.GroupMagnitudeImportance()) (or another Torch-Pruning importance) to prune "
                "attention heads and other groups too.", UserWarning, stacklevel=4)

    def _non_ffn_ratio_keys(self, pruner: Any) -> list[str]:
        ratios = getattr(pruner, "pruning_ratio_dict", None) or {}
        if not ratios:
            return []
        model = getattr(pruner, "model", None)
        if model is None:
            return []
        try:
            _, info = find_vit(model)
        except Exception:  # noqa: BLE001 - the call itself reports an unsupported model
            return []
        ffn = {id(m) for layer in info.layers for m in (*layer.inputs, layer.fc2, layer.norm) if m is not None}
        names = getattr(getattr(pruner, "DG", None), "_module2name", {}) or {}
        return [names.get(m, type(m).__name__) for m in ratios
                if isinstance(m, nn.Module) and id(m) not in ffn and any(True for _ in m.parameters(recurse=False))]

    def _follow_pruning(self, group: Any, block: int, width: int, pruner: Any) -> None:
        """The model's FFN widths are no longer those of the scores: recompute them (from_loader)
        or refuse."""
        if self._rescore is None:
            raise self._error(
                f"{len(self._ranked[block])} scores but block {block} has {width} neurons (pruned already? "
                "JASImportance scores a dense FFN once; for iterative pruning build it with "
                "JASImportance.from_loader, which recomputes the scores of the pruned model)", block)
        if self.protect:
            raise InvalidArgumentError("protect: neuron indices of the dense model cannot follow iterative "
                                       "pruning; drop protect or prune in one step")
        model = self._model_of(group)
        # heads pruned in the previous step: the attention modules must reshape with the new geometry
        update_attention_geometry(model, getattr(pruner, "num_heads", None))
        r = self._rescore
        try:
            with torch.enable_grad():
                scores = _mean_scores(model, r["loader"], r["classes"], r["device"], r["max_batches"],
                                      r["settings"], r["locate_settings"])
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InvalidArgumentError(
                f"iterative_steps: the model pruned so far cannot run ({first}), so JAS cannot be recomputed "
                "for the next step; update modules whose geometry Torch-Pruning changed after each step "
                "(jas_prune.pruning.graph.update_attention_geometry handles timm and Hugging Face attention)") from None
        self._scores = clean_score_map(scores, "scores")
        self._ranked = ranking_scores(self._scores, normalizer=self.normalizer, min_keep=self.min_keep,
                                      protect=self.protect)
        self.rescores += 1
        if self._ranked.get(block) is None or len(self._ranked[block]) != width:
            raise self._error(f"recomputed scores of block {block} do not fit its {width} neurons", block)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_loader(cls, model: nn.Module, loader: Iterable, classes: Sequence[int] | None = None, *,
                    device: torch.device | str | None = None, max_batches: int | None = None,
                    normalizer: str = "mean", min_keep: float | int = 0.05,
                    protect: Mapping[int, Any] | None = None, settings: Any = None,
                    fallback: Any = None, **locate_settings: Any) -> "JASImportance":
        """Mean over images of the layer-progressive candidate scores JAS(P ∪ {j}).

        Args:
            model: the dense ViT.
            loader: batches ``(images, labels, ...)``.
            classes: keep only images of these labels (class-specialised importance).
            device: where to run (default: the model's device).
            max_batches: stop after this many batches.
            settings: a :class:`~jas_prune.attribution.LocateSettings` built once; or
            **locate_settings: the same as keyword arguments of :func:`jas_prune.locate`
                (``steps``, ``scope``, ``formula``, ``quadrature``, ``candidates``, ``target``...).
            fallback: a Torch-Pruning importance for the groups that are not FFN neurons.

        The loader is kept: with ``MetaPruner(iterative_steps=k)`` the scores are recomputed on
        the pruned model at the start of every step (so it must be iterable more than once, e.g.
        a list or a DataLoader, not a generator).

        Raises:
            InvalidArgumentError: no image of the loader has one of ``classes``.
        """
        scores = _mean_scores(model, loader, classes, device, max_batches, settings, locate_settings)
        imp = cls(scores, normalizer=normalizer, min_keep=min_keep, protect=protect, model=None, fallback=fallback)
        imp._rescore = {"loader": loader, "classes": classes, "device": device, "max_batches": max_batches,
                        "settings": settings, "locate_settings": dict(locate_settings)}
        imp.source = "loader"
        imp.classes = sorted(int(c) for c in classes) if classes is not None else None
        return imp

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], classes: Sequence[int | str] | None = None, *,
                 aggregation: str = "mean", protect_topk: bool | None = None, normalizer: str = "mean",
                 min_keep: float | int = 0.05, model: nn.Module | None = None,
                 digest: str | None = None, fallback: Any = None) -> "JASImportance":
        """Dense per-class importance saved by a run's ``aggregate`` stage.

        The score of a neuron is the mean over the probe images of the selected classes (all when
        ``classes`` is None) of its candidate score, i.e. the per-class means weighted by the
        classes' image counts.

        Args:
            run_dir: a run directory holding ``masks.safetensors`` (or that file itself).
            classes: class indices or names (class-specialised importance).
            aggregation: ``mean`` (the signed candidate score), ``mean_abs`` or
                ``mean_abs_centered`` (see :data:`jas_prune.aggregate.IMPORTANCE_AGGREGATIONS`).
            protect_topk: never prune the class TopK masks of ``classes`` (default: True when
                ``classes`` is given, False otherwise).
            model: when given, refuse masks computed on other weights (compared by the weights
                digest the run stored); without it only the FFN widths are checked, at pruning.
            digest: the same check with an already computed
                :func:`~jas_prune.pathstore.weights_digest` of the model.
            fallback: a Torch-Pruning importance for the groups that are not FFN neurons.

        Raises:
            ClassSelectionError: a class the masks do not have.
            InvalidArgumentError: none of ``classes`` has probe images; an unknown aggregation, or
                one an older masks file does not hold.
            FingerprintMismatchError: the saved importance does not fit the masks' layers, or
                ``model``/``digest`` differ from the model the masks were computed on.
        """
        from jas_prune.aggregate import load_masks
        from jas_prune.classes import resolve_classes
        from jas_prune.rundir import RunDir

        path = Path(run_dir)
        masks = load_masks(path if path.is_file() else RunDir(path).masks)
        if model is not None and digest is None:
            from jas_prune.pathstore import weights_digest

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
        sel = list(range(len(names))) if classes is None else resolve_classes(classes, names, key="classes")
        valid = counts[sel] > 0
        if not bool(valid.any()):
            raise InvalidArgumentError(f"classes: none of {[names[c] for c in sel]} has probe images in {run_dir}")
        sel_valid = [c for c, ok in zip(sel, valid.tolist()) if ok]
        w = counts[sel_valid]
        dense = (torch.nan_to_num(importance[sel_valid]) * w[:, None, None]).sum(0) / w.sum()
        scores = {b: dense[j].float() for j, b in enumerate(layers)}
        if protect_topk is None:
            protect_topk = classes is not None
        protect = None
        if protect_topk:
            protect = {b: topk[sel, j].any(0) for j, b in enumerate(layers)}
        heads = None
        if getattr(masks, "heads", None) is not None:  # the run located heads: head JAS, weighted alike
            hw = torch.as_tensor(masks.heads.counts, dtype=torch.float64)[sel_valid]
            himp = torch.nan_to_num(torch.as_tensor(masks.heads.importance_for("mean"), dtype=torch.float64)[sel_valid])
            hdense = (himp * hw[:, None, None]).sum(0) / hw.sum()
            heads = {b: hdense[j].float() for j, b in enumerate(layers)}
        imp = cls(scores, normalizer=normalizer, min_keep=min_keep, protect=protect, fallback=fallback,
                  head_scores=heads)
        imp.source = imp.run_dir = str(run_dir)
        imp.classes = None if classes is None else sel
        imp.aggregation = aggregation
        imp.fingerprint = dict(getattr(masks, "fingerprint", {}) or {})
        return imp


def _mean_scores(model: nn.Module, loader: Iterable, classes: Sequence[int] | None, device: Any,
                 max_batches: int | None, settings: Any, locate_settings: Mapping[str, Any]) -> dict[int, torch.Tensor]:
    """Mean over the loader's images (of ``classes``) of the candidate scores JAS(P ∪ {j})."""
    from ..attribution import api

    sums: dict[int, torch.Tensor] = {}
    count = 0
    for images, labels in iter_batches(loader, classes=classes, device=device_of(model, device),
                                       max_batches=max_batches):
        result = api.locate(model, images, labels, settings, **locate_settings)
        for block, s in zip(result.layers, result.scores):
            s = s.detach().to("cpu", torch.float64)
            sums[int(block)] = sums.get(int(block), 0) + s.sum(0)
        count += len(labels)
    if count == 0:
        if classes is not None:
            raise InvalidArgumentError(f"classes: no image of the loader has one of the labels {list(classes)}")
        raise InvalidArgumentError("loader: yielded no images (a generator is exhausted after one pass; pass "
                                   "a list or a DataLoader)")
    return {b: (s / count).float() for b, s in sums.items()}


def _calling_pruner() -> Any:
    """The Torch-Pruning pruner whose ``estimate_importance`` called the importance, if any
    (``MetaPruner`` does not tell an importance which pruner calls it)."""
    base = getattr(tp.pruner, "BasePruner", None) or getattr(tp.pruner, "MetaPruner", None)
    if base is None:  # pragma: no cover - another Torch-Pruning layout
        return None
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, base):
            return owner
        frame = frame.f_back
    return None
