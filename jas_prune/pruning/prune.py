"""Structured FFN pruning through Torch-Pruning's dependency graph.

:func:`prune_ffn` removes FFN hidden neurons for real: for each block the neurons to remove go
through ``tp.DependencyGraph.get_pruning_group(fc1, tp.prune_linear_out_channels, idxs)``, which
deletes rows of ``fc1`` (weight and bias) and the matching columns of ``fc2``; nothing else
changes (this is checked on every group). Options: uniform or global budget, kept widths rounded
to a multiple (``round_to``), protected neurons (class TopK masks), bias compensation, and a
classifier head cut to a class subset with the label mapping recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Any, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..classes import resolve_classes
from ..errors import BudgetError, InvalidArgumentError, PruneSettingError
from .graph import check_group, dependency_graph, ffn_group_allowed, find_vit
from .plugin import JASImportance
from .scoremap import check_normalizer, check_score_map, clean_protect, clean_score_map, floor_count, ranking_scores

__all__ = [
    "MODES",
    "PruneSummary",
    "prune_ffn",
    "cut_head",
    "resolve_head_classes",
    "remap_labels",
    "count_params",
    "discover_widths",
    "check_round_to",
    "round_kept",
    "uniform_widths",
]

#: How the budget is spread: the same share of every block, or one ranking over all blocks.
MODES = ("uniform", "global")


@dataclass
class PruneSummary:
    """What :func:`prune_ffn` did.

    ``kept`` maps block -> the *original* indices of the neurons kept (sorted; the new neuron j of
    the block is the old neuron ``kept[block][j]``). ``head_classes``, when the head was cut, lists
    the original labels kept: new output j is old class ``head_classes[j]``.
    """

    ratio: float
    mode: str
    kept: dict[int, list[int]]
    widths_before: dict[int, int]
    widths_after: dict[int, int]
    params_before: int
    params_after: int
    bias_compensation: bool
    protected: dict[int, int] = field(default_factory=dict)
    head_classes: list[int] | None = None
    head_class_names: list[str] | None = None
    #: the kept widths are multiples of this (None: not rounded)
    round_to: int | None = None

    @property
    def removed_fraction(self) -> float:
        """Fraction of the pruned blocks' FFN neurons actually removed."""
        before = sum(self.widths_before.values())
        return 1.0 - sum(self.widths_after.values()) / before if before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (block keys as strings)."""
        d = asdict(self)
        for key in ("kept", "widths_before", "widths_after", "protected"):
            d[key] = {str(k): v for k, v in d[key].items()}
        d["removed_fraction"] = self.removed_fraction
        return d


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def discover_widths(model: nn.Module) -> dict[int, int]:
    """Current FFN width of every block."""
    _, info = find_vit(model)
    return {l.index: l.hidden for l in info.layers}


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 < float(ratio) < 1.0:
        raise InvalidArgumentError(f"ratio: {ratio!r} is outside (0, 1); a ratio is the fraction of FFN "
                                   "neurons removed")
    return float(ratio)


def check_round_to(round_to: Any, name: str = "round_to") -> int | None:
    """``round_to`` as an int ≥ 2, or None for no rounding (``None`` and 1 alike).

    Raises:
        InvalidArgumentError: not None and not an integer ≥ 1 (naming ``name``).
    """
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, Integral) or round_to < 1:
        raise InvalidArgumentError(f"{name}: expected an integer ≥ 1 or None, got {round_to!r}")
    return int(round_to) if round_to > 1 else None


def round_kept(count: int, width: int, round_to: int | None, *, at_least: int = 1, block: int | None = None,
               name: str = "round_to") -> int:
    """The number of neurons a block of ``width`` keeps when ``count`` would be kept unrounded.

    The KEPT count is rounded, to the nearest multiple of ``round_to`` (a tie rounds up, keeping
    more), because the kept width is the dimension the pruned ``fc1``/``fc2`` matmuls run at:
    rounding the removed count would give aligned widths only when the dense width is aligned
    already (Torch-Pruning's ``round_to`` also rounds what remains). The result is at least
    ``at_least`` (≥ 1; protected or forced neurons), rounded up to a multiple, and at most the
    largest multiple not above ``width``, so it stays within one multiple of ``count`` whenever
    ``at_least ≤ count ≤ width``. Without ``round_to``: ``count`` unchanged.

    Raises:
        PruneSettingError: ``round_to`` above ``width`` (no multiple fits the block).
        BudgetError: ``at_least`` rounded up to a multiple exceeds ``width``.
    """
    if round_to is None or round_to <= 1:
        return count
    where = f" of block {block}" if block is not None else ""
    hi = (width // round_to) * round_to
    if hi == 0:
        raise PruneSettingError(f"{name}: {round_to} exceeds the FFN width {width}{where}: "
                                f"no multiple of {round_to} fits; lower {name}")
    lo = max(1, math.ceil(max(1, at_least) / round_to)) * round_to
    if lo > hi:
        raise BudgetError(f"{name}: {at_least} neurons{where} must stay, and the next multiple of {round_to} "
                          f"({lo}) exceeds the FFN width {width}", protected=True)
    nearest = math.floor(count / round_to + 0.5) * round_to
    return min(max(nearest, lo), hi)


def uniform_widths(widths: Mapping[int, int], ratio: float, round_to: int | None = None) -> dict[int, int]:
    """The kept width of every block after a uniform cut at ``ratio`` (what :func:`prune_ffn`
    keeps in ``uniform`` mode without protected neurons): ``max(1, n - round(n · ratio))``, then
    :func:`round_kept`."""
    return {b: round_kept(max(1, n - round(n * ratio)), n, round_to, block=b) for b, n in widths.items()}


def _means(bias_compensation: Mapping[Any, Any], widths: Mapping[int, int]) -> dict[int, torch.Tensor]:
    if isinstance(bias_compensation, bool) or not isinstance(bias_compensation, Mapping):
        raise InvalidArgumentError(
            "bias_compensation: expected a mapping block -> mean activation per neuron "
            "(e.g. jas_prune.pruning.ffn_activation_stats(model, probe_loader)), got "
            f"{type(bias_compensation).__name__}")
    out: dict[int, torch.Tensor] = {}
    for key, value in bias_compensation.items():
        block = int(key)
        if isinstance(value, Mapping) and "mean" in value:  # jas_prune.neurons.activation_stats
            value = value["mean"]
        t = torch.as_tensor(value).detach().to("cpu", torch.float32)
        if t.ndim != 1:
            raise InvalidArgumentError(f"bias_compensation[{block}]: expected a 1-D tensor of mean activations")
        out[block] = t
    for block, n in widths.items():
        if block not in out:
            raise InvalidArgumentError(f"bias_compensation: no mean activations for block {block}")
        if len(out[block]) != n:
            raise InvalidArgumentError(f"bias_compensation[{block}]: {len(out[block])} means for {n} FFN neurons")
        if not torch.isfinite(out[block]).all():
            raise InvalidArgumentError(f"bias_compensation[{block}]: contains NaN or infinite values")
    return out


def _keep_uniform(scores: Mapping[int, torch.Tensor], ratio: float,
                  protect: Mapping[int, list[int]], round_to: int | None = None) -> dict[int, list[int]]:
    kept: dict[int, list[int]] = {}
    for block, s in scores.items():
        n = len(s)
        n_keep = max(1, n - round(n * ratio))
        prot = protect.get(block, [])
        if len(prot) > n_keep:
            raise BudgetError(f"protect[{block}]: {len(prot)} protected neurons but ratio {ratio} keeps only "
                              f"{n_keep} of {n}", protected=True)
        n_keep = round_kept(n_keep, n, round_to, at_least=len(prot), block=block)
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        chosen = set(prot)
        for i in order:
            if len(chosen) >= n_keep:
                break
            chosen.add(i)
        kept[block] = sorted(chosen)
    return kept


def _keep_widths(scores: Mapping[int, torch.Tensor], widths: Mapping[int, int],
                 protect: Mapping[int, list[int]]) -> dict[int, list[int]]:
    kept: dict[int, list[int]] = {}
    for block, s in scores.items():
        n = len(s)
        k = int(widths.get(block, n))
        if not 1 <= k <= n:
            raise InvalidArgumentError(f"widths[{block}]: {k} is outside [1, {n}]")
        prot = protect.get(block, [])
        if len(prot) > k:
            raise BudgetError(f"protect[{block}]: {len(prot)} protected neurons but the width is {k} of {n}",
                              protected=True)
        chosen = set(prot)
        for i in torch.sort(s, descending=True, stable=True).indices.tolist():
            if len(chosen) >= k:
                break
            chosen.add(i)
        kept[block] = sorted(chosen)
    return kept


def _keep_global(scores: Mapping[int, torch.Tensor], ratio: float, protect: Mapping[int, list[int]],
                 normalizer: str, min_keep: float | int, round_to: int | None = None) -> dict[int, list[int]]:
    ranked = ranking_scores(scores, normalizer=normalizer, min_keep=min_keep, protect=protect)
    blocks = list(ranked)
    flat = torch.cat([ranked[b] for b in blocks])
    owner = torch.cat([torch.full((len(ranked[b]),), j, dtype=torch.long) for j, b in enumerate(blocks)])
    local = torch.cat([torch.arange(len(ranked[b])) for b in blocks])
    total = len(flat)
    n_keep = max(len(blocks), total - round(total * ratio))
    forced = int(torch.isinf(flat).sum())
    if forced > n_keep:
        raise BudgetError(f"ratio: removing {ratio} of {total} FFN neurons keeps {n_keep}, but protect and "
                          f"min_keep={min_keep} force keeping {forced}",
                          protected=any(len(v) for v in protect.values()))
    top = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
    kept: dict[int, list[int]] = {b: [] for b in blocks}
    for j, i in zip(owner[top].tolist(), local[top].tolist()):
        kept[blocks[j]].append(i)
    if round_to is not None:  # each block's share, rounded; its top neurons by the same ranking
        for b in blocks:
            r = ranked[b]
            k = round_kept(len(kept[b]), len(r), round_to, at_least=int(torch.isinf(r).sum()), block=b)
            kept[b] = torch.sort(r, descending=True, stable=True).indices[:k].tolist()
    return {b: sorted(v) for b, v in kept.items()}


def _linear_head(vit: nn.Module) -> nn.Linear:
    head = getattr(vit, "head", None)
    if not isinstance(head, nn.Linear):
        raise PruneSettingError(f"head_classes: the model's head is {type(head).__name__}, not a linear classifier")
    return head


def _head_labels(class_names: Sequence[str] | None, num_classes: int) -> list[str] | int:
    """What :func:`resolve_classes` resolves a head's classes against: the names, padded with
    the outputs' indices when the names cover only the first outputs, or just the width."""
    if class_names is None:
        return num_classes
    if len(class_names) > num_classes:
        raise InvalidArgumentError(f"class_names: {len(class_names)} names for a head with {num_classes} outputs")
    return list(class_names) + [str(i) for i in range(len(class_names), num_classes)]


def resolve_head_classes(classes: Sequence[int | str] | int | str, num_classes: int,
                         class_names: Sequence[str] | None = None, name: str = "head_classes") -> list[int]:
    """Sorted unique indices of a head's outputs from class indices or names
    (:func:`jas_prune.classes.resolve_classes` against the head's ``num_classes`` outputs; names,
    when given, label the first outputs).

    Raises:
        ClassSelectionError: a class the head does not have, or an empty list (naming ``name``).
        InvalidArgumentError: more ``class_names`` than the head has outputs.
    """
    return resolve_classes(classes, _head_labels(class_names, num_classes), key=name)


def cut_head(model: nn.Module, classes: Sequence[int | str], *, example_inputs: torch.Tensor | None = None,
             class_names: Sequence[str] | None = None, dg: tp.DependencyGraph | None = None) -> list[int]:
    """Cut the classifier to ``classes`` (output rows removed through the dependency graph).

    Returns the kept original labels in output order (ascending): new output j is class
    ``result[j]``. Also recorded on the model as ``model.jas_head_classes`` (and
    ``model.jas_head_class_names`` when names are known), which :func:`save_pruned` stores.
    """
    vit, _ = find_vit(model)
    head = _linear_head(vit)
    previous = getattr(vit, "jas_head_classes", None)
    names = list(class_names) if class_names is not None else getattr(vit, "jas_head_class_names", None)
    labels = _head_labels(names, head.out_features)
    keep = resolve_classes(classes, labels, key="head_classes")
    removed = [i for i in range(head.out_features) if i not in set(keep)]
    if removed:
        dg = dg or dependency_graph(model, example_inputs)
        group = dg.get_pruning_group(head, tp.prune_linear_out_channels, removed)
        check_group(group, [(head, tp.prune_linear_out_channels)], "head_classes")
        with torch.no_grad():
            group.prune()
        vit.num_classes = len(keep)
    # a second cut composes with the first: labels always refer to the original classifier
    original = [previous[i] for i in keep] if previous is not None else keep
    vit.jas_head_classes = list(original)
    if not isinstance(labels, int):
        vit.jas_head_class_names = [labels[i] for i in keep]
    return list(original)


def remap_labels(labels: torch.Tensor, head_classes: Sequence[int]) -> torch.Tensor:
    """Original labels -> indices of a cut head (``-1`` for classes the head no longer has)."""
    labels = torch.as_tensor(labels)
    lut = torch.full((max(int(labels.max()) if labels.numel() else 0, max(head_classes)) + 1,), -1,
                     dtype=torch.long, device=labels.device)
    lut[torch.as_tensor(list(head_classes), dtype=torch.long, device=labels.device)] = torch.arange(
        len(head_classes), device=labels.device)
    return lut[labels.long()]


def prune_ffn(model: nn.Module, scores: Mapping[int, Any] | JASImportance, *, ratio: float,
              mode: str = "uniform", protect: Mapping[int, Any] | None = None,
              example_inputs: torch.Tensor | None = None,
              bias_compensation: Mapping[int, Any] | None = None,
              head_classes: Sequence[int | str] | None = None,
              class_names: Sequence[str] | None = None,
              normalizer: str = "mean", min_keep: float | int = 0.05,
              run_dir: str | None = None, round_to: int | None = None,
              keep_widths: Mapping[int, int] | None = None) -> PruneSummary:
    """Remove the least important FFN neurons of ``model`` in place.

    Args:
        model: a timm ViT (dense FFNs of the widths the scores describe).
        scores: block -> per-neuron scores (higher = keep), or a :class:`JASImportance`
            (its ``protect`` and ``run_dir`` are then used too). Only the blocks listed are pruned.
        ratio: fraction of FFN neurons REMOVED, in (0, 1). ``uniform``: every block loses
            round(n · ratio) of its n neurons (keeping at least one); ``global``: round(N · ratio)
            of all N neurons of the listed blocks, ranked across blocks after per-layer
            normalisation (``normalizer``), every layer keeping its top ``min_keep`` neurons.
        mode: ``uniform`` or ``global``.
        protect: block -> neuron indices (or bool mask) never pruned, e.g. class TopK masks.
        example_inputs: an input batch for tracing (default: a random image of the model's size).
        bias_compensation: block -> mean activation per neuron over probe tokens (a tensor, or
            the per-block dict of :func:`jas_prune.neurons.activation_stats` /
            :func:`~jas_prune.pruning.stats.ffn_activation_stats`); when given, for every removed
            neuron i, ``fc2.bias += fc2.weight[:, i] * E[act_i]`` (before the neuron goes).
        head_classes: cut the classifier to these classes (indices or names, see
            :func:`cut_head`); the label mapping is in the summary.
        class_names: names of the head's classes (to accept names and record them).
        run_dir: the run directory ``scores`` were read from (default: a JASImportance's
            ``run_dir``): scores that do not fit the model are then a FingerprintMismatchError.
        round_to: make every pruned block's kept width a multiple of this (Torch-Pruning's
            ``round_to``: aligned widths run faster): the kept count the ratio gives is rounded
            to the NEAREST multiple (:func:`round_kept`: never 0, never above the dense width,
            never below the protected count), so the removed share moves by less than one
            multiple per block. ``None`` or 1: no rounding. (With ``tp.pruner.MetaPruner`` and a
            :class:`JASImportance`, pass ``round_to`` to the pruner itself.)
        keep_widths: block -> kept width, chosen elsewhere (a budget split,
            :mod:`jas_prune.pruning.allocate`): each listed block keeps its protected neurons and
            then its highest-scoring ones up to that width (``ratio`` and ``mode`` are then only
            recorded; blocks not listed are not pruned).

    Returns:
        A :class:`PruneSummary` (kept original indices per block, widths, params before/after).

    Raises:
        InvalidArgumentError: a bad argument, named (ratio, mode, scores, protect, bias_compensation...).
        ClassSelectionError: a head class the head does not have.
        PruneSettingError: settings the model cannot meet (no fc2 bias to compensate into, no
            linear head to cut, ``round_to`` above a block's width); BudgetError: protected
            neurons exceed what the ratio keeps.
        FingerprintMismatchError: scores of ``run_dir`` for a model with other FFN widths.
    """
    ratio = _check_ratio(ratio)
    round_to = check_round_to(round_to)
    if mode not in MODES:
        raise InvalidArgumentError(f"mode: unknown '{mode}'; choose one of {', '.join(MODES)}")
    check_normalizer(normalizer)
    floor_count(1, min_keep)
    if isinstance(scores, JASImportance):
        if protect is None:
            protect = scores.protect or None
        if run_dir is None:
            run_dir = scores.run_dir
        scores = scores.scores
    score_map = clean_score_map(scores, "scores")
    vit, info = find_vit(model)
    check_score_map(score_map, info, "scores", run_dir=run_dir)
    widths = {b: len(s) for b, s in score_map.items()}
    prot = clean_protect(protect, widths, "protect")
    means = _means(bias_compensation, widths) if bias_compensation is not None else None
    if means is not None:
        for block in widths:
            if info.layers[block].fc2.bias is None:
                raise PruneSettingError(f"bias_compensation: block {block} fc2 has no bias to compensate into")
    if head_classes is not None:  # validate before touching the model
        head = _linear_head(vit)
        names = class_names if class_names is not None else getattr(vit, "jas_head_class_names", None)
        resolve_head_classes(head_classes, head.out_features, names)

    if keep_widths is not None:
        kept = _keep_widths(score_map, keep_widths, prot)
    elif mode == "uniform":
        kept = _keep_uniform(score_map, ratio, prot, round_to)
    else:
        kept = _keep_global(score_map, ratio, prot, normalizer, min_keep, round_to)

    params_before = count_params(model)
    dg = dependency_graph(model, example_inputs)
    for block, keep in kept.items():
        layer = info.layers[block]
        n = layer.hidden
        keep_set = set(keep)
        removed = [i for i in range(n) if i not in keep_set]
        if not removed:
            continue
        group = dg.get_pruning_group(layer.fc1, tp.prune_linear_out_channels, removed)
        check_group(group, ffn_group_allowed(layer), f"block {block}")
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"block {block}: Torch-Pruning refuses to remove {len(removed)} of {n} neurons")
        with torch.no_grad():
            if means is not None:
                fc2 = layer.fc2
                idx = torch.as_tensor(removed, dtype=torch.long, device=fc2.weight.device)
                mu = means[block].to(fc2.weight.device, fc2.weight.dtype)[idx]
                fc2.bias.add_(fc2.weight[:, idx] @ mu)
            group.prune()

    head_kept: list[int] | None = None
    if head_classes is not None:
        head_kept = cut_head(model, head_classes, class_names=class_names, dg=dg)
    if callable(sync := getattr(vit, "sync_config", None)):  # a Hugging Face config follows the new sizes
        sync()
    new_widths = discover_widths(vit)
    return PruneSummary(
        ratio=ratio,
        mode=mode,
        kept=kept,
        widths_before=widths,
        widths_after={b: new_widths[b] for b in kept},
        params_before=params_before,
        params_after=count_params(model),
        bias_compensation=means is not None,
        protected={b: len(v) for b, v in prot.items() if v},
        head_classes=list(getattr(vit, "jas_head_classes", [])) if head_kept is not None else None,
        head_class_names=(list(getattr(vit, "jas_head_class_names", None) or []) or None)
        if head_kept is not None else None,
        round_to=round_to,
    )
