"""Aggregation (paper App. D.2/E.2): per-class neuron utilisation, class similarity,
class TopK masks and dense per-class importance, saved as ``masks.safetensors``.

The file carries the fingerprint of the model it was computed on; applying it to another model
is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from pydantic import Field

from .errors import FingerprintMismatchError, InvalidArgumentError
from .io import atomic_write
from .rundir import RunDir
from .schema import Strict

__all__ = ["MasksSettings", "ClassMasks", "MaskAccumulator", "aggregate", "aggregate_store", "save_masks", "load_masks",
           "per_image_importance", "IMPORTANCE_AGGREGATIONS", "MASKS_FILE"]

MASKS_FILE = RunDir.MASKS
#: Key prefix of the per-class head masks in ``masks.safetensors`` (runs that located heads).
HEAD_PREFIX = "heads."

#: How an image's candidate scores JAS(P ∪ {j}) become per-neuron importance before the class mean:
#: ``mean`` the signed score (the default), ``mean_abs`` its magnitude, ``mean_abs_centered`` the
#: magnitude of the score minus the layer's median over candidates. With ``candidates:
#: layer_scaled`` every candidate of a layer shares the path's part of the score, so centring
#: removes that offset and leaves each neuron's own contribution (for ``formula: ig`` exactly
#: ``v̄_j ḡ_j`` up to the median neuron's).
IMPORTANCE_AGGREGATIONS = ("mean", "mean_abs", "mean_abs_centered")


def per_image_importance(scores: torch.Tensor, aggregation: str = "mean") -> torch.Tensor:
    """Per-image importance ``[N, L, n]`` from candidate scores ``[N, L, n]`` (see
    ``IMPORTANCE_AGGREGATIONS``); the class importance is its mean over the class's images."""
    if aggregation == "mean":
        return scores
    if aggregation == "mean_abs":
        return scores.abs()
    _check_aggregation(aggregation)
    return (scores - scores.median(dim=2, keepdim=True).values).abs()  # mean_abs_centered


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in IMPORTANCE_AGGREGATIONS:
        raise InvalidArgumentError(f"aggregation: '{aggregation}' is not one of {', '.join(IMPORTANCE_AGGREGATIONS)}")


@dataclass
class ClassMasks:
    """Per-class results over the probe partition.

    Attributes:
        utilisation: [C, L, n] how often each neuron is in the class's paths, each layer summing
            to 1 (all-zero for a class without probe images).
        similarity: [C, C] cosine similarity of the flattened utilisation matrices.
        topk: [C, L, n] bool, the class TopK masks (K most frequent neurons per layer; ties broken
            by the mean dense score).
        topk_indices: [C, L, K] the same neurons, most frequent first.
        importance: [C, L, n] mean over the class's probe images of the dense candidate scores.
        importance_by: the class importance under every ``IMPORTANCE_AGGREGATIONS`` entry
            (``importance_by["mean"]`` is ``importance``).
        counts: [C] probe images per class.
        layers: block index of each of the L rows.
        class_names: C names.
        fingerprint: model digest and settings the masks were computed with.
        heads: the same per-class results over attention heads (``n`` = heads per block) when
            the run located heads (``attribution.units``), else None.
    """

    utilisation: torch.Tensor
    similarity: torch.Tensor
    topk: torch.Tensor
    topk_indices: torch.Tensor
    importance: torch.Tensor
    counts: torch.Tensor
    layers: list[int]
    class_names: list[str]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    importance_by: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: "ClassMasks | None" = None

    def importance_for(self, aggregation: str = "mean") -> torch.Tensor:
        """The ``[C, L, n]`` class importance under one aggregation.

        Raises:
            ValueError: unknown aggregation, or one this (older) masks file does not hold.
        """
        if aggregation == "mean":
            return self.importance
        _check_aggregation(aggregation)
        if aggregation not in self.importance_by:
            raise InvalidArgumentError(f"aggregation: '{aggregation}' is not stored in these masks; rebuild them "
                             "(re-run the recipe with --resume: the paths are reused)")
        return self.importance_by[aggregation]

    def check_model(self, digest: str, source: str = "masks") -> None:
        """Refuse masks computed on other weights.

        Raises:
            FingerprintMismatchError
        """
        mine = self.fingerprint.get("model")
        if mine is not None and mine != digest:
            raise FingerprintMismatchError(
                f"{source}: computed on a different model (weights digest {mine[:12]}… vs {digest[:12]}…)")


class MaskAccumulator:
    """Per-class path counts and importance sums, fed image batch by image batch (e.g. one
    ``paths/`` chunk at a time), so aggregating a large partition never holds every image's
    dense scores at once. :func:`aggregate` is the one-batch form.

    Args:
        num_classes: C.
        n_layers: L.
        widths: n, FFN neurons per layer.
    """

    def __init__(self, num_classes: int, n_layers: int, widths: int):
        self.num_classes, self.n_layers, self.widths = num_classes, n_layers, widths
        shape = (num_classes, n_layers, widths)
        self.freq = torch.zeros(shape, dtype=torch.float64)
        self.sums = {how: torch.zeros(shape, dtype=torch.float32) for how in IMPORTANCE_AGGREGATIONS}
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    def add(self, paths: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch: ``paths`` [b, L, K], ``scores`` [b, L, n] candidate scores, ``labels`` [b]."""
        labels = labels.long()
        onehot = torch.zeros(len(paths), self.n_layers, self.widths, dtype=torch.float64)
        onehot.scatter_(2, paths.long(), 1.0)
        self.freq.index_add_(0, labels, onehot)
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        scores = scores.float()
        for how in IMPORTANCE_AGGREGATIONS:
            self.sums[how].index_add_(0, labels, per_image_importance(scores, how))

    def finish(self, *, topk: int, layers: Sequence[int], class_names: Sequence[str],
               fingerprint: dict[str, Any] | None = None) -> ClassMasks:
        """The class masks of everything added (``topk`` neurons per layer per class)."""
        C, n = self.num_classes, self.widths
        if topk > n:
            raise InvalidArgumentError(f"masks.topk: {topk} exceeds the FFN width {n}")
        freq, counts = self.freq, self.counts
        importance_by = {}
        for how, total in self.sums.items():
            imp = total / counts.clamp_min(1).float()[:, None, None]
            imp[counts == 0] = float("nan")
            importance_by[how] = imp
        importance = importance_by["mean"]
        row = freq.sum(dim=2, keepdim=True)
        utilisation = torch.where(row > 0, freq / row.clamp_min(1e-12), torch.zeros_like(freq))
        flat = utilisation.reshape(C, -1)
        norms = flat.norm(dim=1).clamp_min(1e-12)
        similarity = (flat @ flat.T) / (norms[:, None] * norms[None, :])
        # frequency first, ties by mean dense score: rank by frequency + tiny, order-preserving tiebreak
        tie = torch.nan_to_num(importance, nan=0.0)
        span = tie.abs().amax(dim=2, keepdim=True).clamp_min(1e-30)
        key = freq + 0.25 * (tie / span)  # |tiebreak| < 0.5 never overturns a whole count
        topk_indices = key.topk(topk, dim=2).indices
        mask = torch.zeros(C, self.n_layers, n, dtype=torch.bool)
        mask.scatter_(2, topk_indices, True)
        mask[counts == 0] = False
        return ClassMasks(utilisation=utilisation.float(), similarity=similarity.float(), topk=mask,
                          topk_indices=topk_indices, importance=importance.float(), counts=counts.clone(),
                          layers=[int(b) for b in layers], class_names=list(class_names),
                          fingerprint=dict(fingerprint or {}),
                          importance_by={k: v.float() for k, v in importance_by.items()})


def aggregate(paths: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
              widths: int, topk: int, layers: Sequence[int], class_names: Sequence[str],
              fingerprint: dict[str, Any] | None = None) -> ClassMasks:
    """Build the class masks from per-image paths.

    Args:
        paths: [N, L, K] neuron indices of each image's path.
        scores: [N, L, n] dense candidate scores of each image.
        labels: [N] class of each image.
        num_classes: C.
        widths: n, FFN neurons per layer.
        topk: neurons per layer in each class mask.
    """
    acc = MaskAccumulator(num_classes, paths.shape[1], widths)
    acc.add(paths, scores, labels)
    return acc.finish(topk=topk, layers=layers, class_names=class_names, fingerprint=fingerprint)


def aggregate_store(chunks: Iterable[Any], method: str, *, num_classes: int, widths: int, topk: int,
                    class_names: Sequence[str], fingerprint: dict[str, Any] | None = None,
                    heads: bool = False) -> ClassMasks:
    """:func:`aggregate` over a partition's stored chunks (``PathStore.iter_chunks``), one chunk in
    memory at a time; ``heads``: over the located attention heads (``widths`` = heads per block)."""
    acc: MaskAccumulator | None = None
    layers: list[int] = []
    for c in chunks:
        paths, scores = (c.head_paths, c.head_scores) if heads else (c.paths, c.scores)
        if acc is None:
            acc, layers = MaskAccumulator(num_classes, paths[method].shape[1], widths), c.layers
        acc.add(paths[method], scores[method], c.labels)
    if acc is None:
        raise InvalidArgumentError("aggregate: no located images")
    return acc.finish(topk=topk, layers=layers, class_names=class_names, fingerprint=fingerprint)


def save_masks(masks: ClassMasks, path: str | Path) -> Path:
    """Write the masks file atomically (``path``: the file, e.g. ``RunDir(out).masks``, or a run
    directory)."""
    from safetensors.torch import save_file

    def flat(m: ClassMasks, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v for k, v in {
            "utilisation": m.utilisation, "similarity": m.similarity, "topk": m.topk.to(torch.uint8),
            "topk_indices": m.topk_indices.long(), "importance": m.importance, "counts": m.counts.long(),
            **{f"importance.{k}": v for k, v in m.importance_by.items() if k != "mean"}}.items()}

    tensors = flat(masks) | (flat(masks.heads, HEAD_PREFIX) if masks.heads is not None else {})
    # one metadata key: safetensors writes several in a random order, and the file should be the
    # same bytes for the same masks
    meta = {"masks": json.dumps({"layers": masks.layers, "class_names": masks.class_names,
                                 "fingerprint": masks.fingerprint})}
    data = {k: v.contiguous() for k, v in tensors.items()}
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).masks
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


def load_masks(run_dir: str | Path) -> ClassMasks:
    """Read the class masks of a run directory (or a ``masks.safetensors`` path).

    Raises:
        FileNotFoundError / FingerprintMismatchError-free read; use ``check_model`` to compare.
    """
    from safetensors import safe_open

    from .errors import CheckpointError

    path = Path(run_dir)
    if path.is_dir():
        path = RunDir(path).masks
    if not path.is_file():
        raise CheckpointError(f"{path}: no class masks here (run the masks stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            every = {k: f.get_tensor(k) for k in f.keys()}
        # one "masks" key; files written before kept each entry under its own key
        info = json.loads(meta["masks"]) if "masks" in meta else {k: json.loads(v) for k, v in meta.items()}

        def build(prefix: str) -> ClassMasks:
            t = {k[len(prefix):]: v for k, v in every.items() if k.startswith(prefix)}
            return ClassMasks(utilisation=t["utilisation"], similarity=t["similarity"], topk=t["topk"].bool(),
                              topk_indices=t["topk_indices"], importance=t["importance"], counts=t["counts"],
                              layers=info["layers"], class_names=info["class_names"],
                              fingerprint=info.get("fingerprint", {}),
                              importance_by={"mean": t["importance"],
                                             **{k.split(".", 1)[1]: v for k, v in t.items()
                                                if k.startswith("importance.")}})

        masks = build("")
        if f"{HEAD_PREFIX}topk" in every:
            masks.heads = build(HEAD_PREFIX)
        return masks
    except (KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a jas-prune masks file ({exc})") from None


class MasksSettings(Strict):
    """``masks``: TopK neurons kept per class and how per-image scores become importance."""

    topk: int = Field(default=5, ge=1)
    #: how per-image candidate scores become the importance JAS pruning uses (aggregate.py)
    importance: Literal["mean", "mean_abs", "mean_abs_centered"] = "mean"
