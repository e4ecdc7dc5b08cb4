"""Attention pruning: whole heads and head dimensions, through Torch-Pruning's dependency graph.

A head of block l is the slice ``h·d:(h+1)·d`` of the attention output projection's input
(:mod:`jas_prune.models.heads`). Removing channels there goes through
``DependencyGraph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs)``, which
removes the projection's input columns and the matching query, key and value rows of the fused
``qkv`` (the graph maps a value channel through ``unbind`` to all three); :func:`check_group`
refuses a group that would change anything else. Then ``num_heads``/``head_dim``/``attn_dim``
are set (:func:`~jas_prune.pruning.graph.update_attention_geometry`).

- ``heads``: the fraction of each block's heads removed (lowest scores first, one kept at least).
- ``head_dims``: the fraction of each kept head's dimensions removed — the same dimension
  indices in every head of a block (the fused ``qkv`` reshape needs one ``head_dim``), query/key
  and value channels together (as Torch-Pruning's ``prune_head_dims``), ranked by the
  dimension's score summed over the block's heads. The attention logits keep their temperature:
  the query rows are multiplied by ``sqrt(d'/d)`` and ``scale`` set to ``d'^-0.5``, so the fused
  kernel (which divides by ``sqrt(d')``) and the explicit path agree with the masked model.

Every family registers where its heads' parameters are (:class:`~jas_prune.models.heads.AttentionLayout`).
timm ``VisionTransformer`` and Hugging Face ViT/DeiT go through the dependency graph as above;
for timm Eva, BEiT and RelPos the graph cannot see the heads (``q_bias``/``v_bias`` concatenated
outside the projection, per-head relative-position tables, rotary pairs: its groups there span
the whole residual stream or map channels to the wrong heads), so the query/key/value channels,
the projection columns and the per-head tables are sliced here, slot by slot, after checking
each tensor has the size the geometry says. RoPE dimensions are removed in rotary pairs.

Scores per head and per dimension come from :data:`HEAD_CRITERIA` (``jas``, ``magnitude``,
``taylor``, ``activation``, ``random``, ``hessian``, ``vit_slim``; ``obs`` and ``obs_jas``
registered by :mod:`jas_prune.pruning.criteria.obs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import BudgetError, PruneSettingError, UnsupportedModelError
from ..models import FAMILIES
from ..models.heads import AttentionLayout, HeadLayer, Slot, discover_heads
from ..registry import Registry
from ..schema import Strict
from .choices import LOGIT_COMPENSATIONS
from .graph import check_group, dependency_graph, find_vit, update_attention_geometry

__all__ = ["AttentionSettings", "AttentionSummary", "HeadScores", "HEAD_CRITERIA", "head_scores",
           "prune_attention", "check_attention", "head_groups", "attention_macs", "SUPPORTED_FAMILIES"]

#: Families whose heads and head dimensions :func:`prune_attention` removes (those registering
#: an attention layout).
SUPPORTED_FAMILIES = tuple(f.name for f in FAMILIES if f.attention is not None)


class AttentionSettings(Strict):
    """The recipe's ``prune.attention``: what share of the attention to remove.

    Attributes:
        heads: fraction of each block's heads removed, in [0, 1).
        head_dims: fraction of each kept head's dimensions removed, in [0, 1).
        logits: compensation of the attention logits for the removed query/key channels
            (:mod:`jas_prune.pruning.logits`), fit with the reconstruction's calibration images.
    """

    heads: float = Field(default=0.0, ge=0.0, lt=1.0)
    head_dims: float = Field(default=0.0, ge=0.0, lt=1.0)
    logits: Literal[LOGIT_COMPENSATIONS] = "none"

    @model_validator(mode="after")
    def _something(self) -> "AttentionSettings":
        if self.heads == 0 and self.head_dims == 0:
            raise ValueError("set heads and/or head_dims above 0 (or leave prune.attention out)")
        if self.logits != "none" and self.head_dims == 0:
            raise ValueError(f"logits: '{self.logits}' compensates removed query/key channels; "
                             "set head_dims above 0 (or logits: none)")
        return self

    def identity(self, reconstructs: bool = True) -> dict[str, Any]:
        """What a pruned entry is made with: ``logits`` only when set and applied (it needs a
        reconstruction's calibration images), so older runs still resume."""
        return self.model_dump(exclude={"logits"} if self.logits == "none" or not reconstructs else None)


@dataclass
class HeadScores:
    """Per block: a score per head ``[H]`` and per head dimension ``[d]`` (higher = keep), and
    heads never removed (a class selection's head masks)."""

    heads: dict[int, Tensor]
    dims: dict[int, Tensor]
    protect: dict[int, list[int]] = field(default_factory=dict)
    #: cumulative scores (``obs``), as :attr:`CriterionScores.cumulative`
    cumulative: bool = False


@dataclass
class AttentionSummary:
    """What :func:`prune_attention` did (kept = original indices, sorted)."""

    heads_ratio: float
    dims_ratio: float
    kept_heads: dict[int, list[int]] = field(default_factory=dict)
    kept_dims: dict[int, list[int]] = field(default_factory=dict)
    heads_before: dict[int, int] = field(default_factory=dict)
    head_dim_before: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads_ratio, "head_dims": self.dims_ratio,
                "kept_heads": {str(k): v for k, v in self.kept_heads.items()},
                "kept_dims": {str(k): len(v) for k, v in self.kept_dims.items()},
                "heads_before": {str(k): v for k, v in self.heads_before.items()},
                "head_dim_before": {str(k): v for k, v in self.head_dim_before.items()}}


def layout_of(model: nn.Module) -> tuple[nn.Module, tuple[HeadLayer, ...], AttentionLayout]:
    vit, info = find_vit(model)
    layout = FAMILIES.get(info.family).attention
    if layout is None:
        raise UnsupportedModelError(f"prune.attention: model family {info.family} is not supported "
                                    f"(heads and head dimensions are pruned in {', '.join(SUPPORTED_FAMILIES)} only)")
    return vit, discover_heads(info), layout


def _heads_of(model: nn.Module) -> tuple[nn.Module, tuple[HeadLayer, ...]]:
    vit, heads, _ = layout_of(model)
    return vit, heads


def head_groups(model: nn.Module, example_inputs: Tensor | None = None,
                dg: Any = None) -> Iterator[tuple[HeadLayer, Any]]:
    """(head layer, group) per block: the Torch-Pruning group of every channel of the projection
    input (all selected), for group importances (magnitude, Taylor) per channel."""
    import torch_pruning as tp

    _, heads = _heads_of(model)
    dg = dg or dependency_graph(model, example_inputs)
    for h in heads:
        yield h, dg.get_pruning_group(h.proj, tp.prune_linear_in_channels, list(range(h.proj.in_features)))


def _allowed(h: HeadLayer, layout: AttentionLayout) -> list[tuple[nn.Module, Any]]:
    """What a head group may change: the rows of every q/k/v projection, the projection's columns."""
    import torch_pruning as tp

    rows = [(s.owner, tp.prune_linear_out_channels) for s in layout.channels(h.attn)
            if isinstance(s.owner, nn.Linear) and s.name == "weight"]
    return rows + [(h.proj, tp.prune_linear_in_channels)]


def channel_members(h: HeadLayer, layout: AttentionLayout, fn: Callable[[Tensor, Tensor | None], Tensor]) -> Tensor:
    """A score per projection-input channel ``[H·d]``: the mean over the group's members — the
    projection's column and each q/k/v weight's rows of that channel (a fused ``qkv`` is one
    member, its three rows summed) — of ``fn(rows, grads)`` (``[n, fan] -> [n]``). Torch-Pruning's
    group importances reduce the same way (``group_reduction="mean"``, no bias), which a test
    checks on the families its graph handles."""
    A = h.proj.in_features
    w, g = h.proj.weight, h.proj.weight.grad
    members = [fn(w.t(), None if g is None else g.t())]
    for s in layout.channels(h.attn):
        t = s.tensor
        if s.name != "weight" or t.ndim != 2:
            continue
        rows, grads = (t, t.grad) if s.dim == 0 else (t.t(), None if t.grad is None else t.grad.t())
        members.append(sum(fn(rows[i * A:(i + 1) * A], None if grads is None else grads[i * A:(i + 1) * A])
                           for i in range(len(s.roles))))
    return torch.stack(members).mean(0)


def per_channel(channel_scores: Mapping[int, Tensor], model: nn.Module) -> HeadScores:
    """Head scores (sum over a head's channels) and dimension scores (sum over heads) from a
    score per projection-input channel ``[H·d]``."""
    _, heads = _heads_of(model)
    out = HeadScores({}, {})
    for h in heads:
        s = channel_scores[h.index].detach().float().cpu().view(h.heads, h.head_dim)
        out.heads[h.index], out.dims[h.index] = s.sum(1), s.sum(0)
    return out


# ------------------------------------------------------------------------------- criteria
@dataclass(frozen=True)
class HeadCriterion:
    """A pruning criterion's scores of heads and head dimensions (same name as in ``prune.methods``)."""

    name: str
    score: Callable[[Any], HeadScores]  # (ScoringInputs) -> HeadScores


HEAD_CRITERIA: Registry[HeadCriterion] = Registry("attention criterion")


def _magnitude(inputs: Any) -> HeadScores:
    import torch_pruning as tp

    _, heads, layout = layout_of(inputs.model)
    if not layout.graph:  # the same group L2 importance, over the family's own slots
        with torch.no_grad():
            return per_channel({h.index: channel_members(h, layout, lambda w, _g: w.detach().pow(2).sum(1))
                                for h in heads}, inputs.model)
    scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    return per_channel({h.index: scorer(g) for h, g in head_groups(inputs.model, inputs.example_inputs)},
                       inputs.model)


def _taylor(inputs: Any) -> HeadScores:
    from .criteria.taylor import taylor_scores

    def groups(model: nn.Module, example: Tensor | None) -> Iterator[tuple[int, Any]]:
        return ((h.index, g) for h, g in head_groups(model, example))

    def modules(model: nn.Module) -> list[nn.Module]:
        """Whose weight gradients the scores read: a fused ``qkv`` and the projection, or the
        whole attention (separate q/k/v projections)."""
        return [m for h in _heads_of(model)[1]
                for m in ((h.attn.qkv, h.proj) if isinstance(getattr(h.attn, "qkv", None), nn.Linear) else (h.attn,))]

    def explicit(model: nn.Module) -> dict[int, Tensor]:
        _, heads, layout = layout_of(model)
        with torch.no_grad():
            return {h.index: channel_members(h, layout, lambda w, g: (w * g).abs().sum(1)).float().cpu()
                    for h in heads}

    graph = layout_of(inputs.model)[2].graph
    ch = taylor_scores(inputs.model, inputs.require_loader("taylor"), example_inputs=inputs.example_inputs,
                       classes=inputs.classes, device=inputs.device, max_batches=inputs.max_batches,
                       groups=groups, modules=modules, score=None if graph else explicit)
    return per_channel(ch, inputs.model)


def _random(inputs: Any) -> HeadScores:
    _, heads = _heads_of(inputs.model)
    gen = torch.Generator().manual_seed(int(inputs.seed) + 7919)  # not the FFN criterion's stream
    return HeadScores({h.index: torch.rand(h.heads, generator=gen) for h in heads},
                      {h.index: torch.rand(h.head_dim, generator=gen) for h in heads})


def _activation(inputs: Any) -> HeadScores:
    """Mean |value| of each projection-input channel over the probe tokens."""
    from .stats import device_of, iter_batches, no_images
    from ..torchutil import frozen_eval

    model = inputs.model
    _, heads = _heads_of(model)
    sums = {h.index: torch.zeros(h.proj.in_features, dtype=torch.float64) for h in heads}
    count = {"tokens": 0, "images": 0}

    def hook(block: int) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().double()
            sums[block] += x.reshape(-1, x.shape[-1]).sum(0).cpu()

        return fn

    hs = [h.proj.register_forward_pre_hook(hook(h.index)) for h in heads]
    try:
        with torch.no_grad(), frozen_eval(model):
            for images, labels in iter_batches(inputs.require_loader("activation"), classes=inputs.classes,
                                               device=device_of(model, inputs.device), max_batches=inputs.max_batches):
                model(images)
                count["images"] += len(labels)
    finally:
        for h in hs:
            h.remove()
    if count["images"] == 0:
        raise no_images(inputs.classes)
    return per_channel({b: s.float() for b, s in sums.items()}, model)


def _jas(inputs: Any) -> HeadScores:
    """Head JAS (:func:`jas_head_importance`). JAS does not score single dimensions: they are
    ranked by magnitude."""
    heads, protect = jas_head_importance(inputs)
    return HeadScores(heads, _magnitude(inputs).dims, protect)


def jas_head_importance(inputs: Any) -> tuple[dict[int, Tensor], dict[int, list[int]]]:
    """Head JAS: the mean candidate score of each head over the probe images — from the run's
    head masks when it located heads, else located afresh (``units: [heads]``) on the loader —
    and the heads a class selection's head masks protect."""
    if inputs.masks is not None:
        from ..aggregate import load_masks

        masks = load_masks(inputs.masks.run_dir)
        if masks.heads is not None:
            imp = masks.heads.importance_for("mean")
            valid = masks.heads.counts > 0
            if inputs.classes is not None:
                keep = torch.zeros_like(valid)
                keep[list(inputs.classes)] = True
                valid &= keep
            mean = imp[valid].mean(0)
            protect = {}
            if inputs.classes is not None:  # class-specialised: the classes' head masks stay
                top = masks.heads.topk[list(inputs.classes)].any(0)
                protect = {int(b): top[i].nonzero()[:, 0].tolist() for i, b in enumerate(masks.heads.layers)}
            return {int(b): mean[i] for i, b in enumerate(masks.heads.layers)}, protect
    return located_head_scores(inputs), {}


def located_head_scores(inputs: Any) -> dict[int, Tensor]:
    """Mean per-head candidate score JAS(P ∪ {h}) over the loader's images (``units: [heads]``)."""
    from ..attribution import LocateSettings, locate
    from .stats import device_of, iter_batches, no_images

    model = inputs.model
    settings = {**inputs.locate_settings, "units": ("heads",)}
    settings.pop("method", None)
    s = LocateSettings(method="jas", **settings)
    total: dict[int, Tensor] = {}
    seen = 0
    for images, labels in iter_batches(inputs.require_loader("jas"), classes=inputs.classes,
                                       device=device_of(model, inputs.device), max_batches=inputs.max_batches):
        r = locate(model, images, labels, s)
        for b, sc in zip(r.head_layers, r.head_scores):
            total[b] = total.get(b, 0) + sc.sum(0)
        seen += len(labels)
    if seen == 0:
        raise no_images(inputs.classes)
    return {b: v / seen for b, v in total.items()}


def _channel_scale_hooks(heads: tuple[HeadLayer, ...], scale: Callable[[HeadLayer, Tensor], Tensor]) -> list[Any]:
    """Pre-hooks multiplying each projection's input (the concatenated heads ``[..., H·d]``) by
    ``scale(h, input)`` (broadcast over it)."""
    return [h.proj.register_forward_pre_hook(lambda _m, a, h=h: (a[0] * scale(h, a[0]),)) for h in heads]


def _hessian(inputs: Any) -> HeadScores:
    """OBD of a head's (and a head dimension's) scale α at 1: ½·E[g²], g the per-image derivative
    of the cross-entropy with respect to α — the empirical-Fisher diagonal of the scale, the
    FFN ``hessian`` criterion's Hessian, for a removal Δα = 1. Per-image derivatives come from one
    backward pass per batch: a ones tensor ``[B, 1, H·d]`` multiplies each projection input,
    and its gradient at (b, c) is Σ_t v_btc ∂L_b/∂v_btc."""
    from ..torchutil import frozen_eval
    from .stats import device_of, iter_batches, no_images

    model = inputs.model
    _, heads = _heads_of(model)
    ones: dict[int, Tensor] = {}
    sums_h = {h.index: torch.zeros(h.heads, dtype=torch.float64) for h in heads}
    sums_d = {h.index: torch.zeros(h.head_dim, dtype=torch.float64) for h in heads}
    seen = 0

    def scale(h: HeadLayer, v: Tensor) -> Tensor:
        ones[h.index] = torch.ones(v.shape[0], *([1] * (v.ndim - 2)), v.shape[-1], dtype=v.dtype, device=v.device,
                                   requires_grad=True)
        return ones[h.index]

    hooks = _channel_scale_hooks(heads, scale)
    try:
        with frozen_eval(model), torch.enable_grad():
            for images, labels in iter_batches(inputs.require_loader("hessian"), classes=inputs.classes,
                                               device=device_of(model, inputs.device), max_batches=inputs.max_batches):
                ones.clear()
                loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
                grads = torch.autograd.grad(loss, [ones[h.index] for h in heads])
                for h, g in zip(heads, grads):
                    g = g.detach().double().reshape(len(labels), h.heads, h.head_dim).cpu()
                    sums_h[h.index] += g.sum(2).pow(2).sum(0)
                    sums_d[h.index] += g.sum(1).pow(2).sum(0)
                seen += len(labels)
    finally:
        for hk in hooks:
            hk.remove()
    if seen == 0:
        raise no_images(inputs.classes)
    return HeadScores({b: (0.5 * v / seen).float() for b, v in sums_h.items()},
                      {b: (0.5 * v / seen).float() for b, v in sums_d.items()})


def _vit_slim(inputs: Any) -> HeadScores:
    """ViT-Slim's attention search: a soft mask per head and per head dimension (init 1) scales
    the head outputs (``v_h,j · m_h · m_j``), trained alone with cross-entropy + λ·Σ|m| on the
    probe data (``prune.vit_slim`` options, as for the FFN neurons); scores |m|."""
    from .criteria.vit_slim import VitSlimOptions, train_soft_masks
    from .stats import device_of

    model = inputs.model
    _, heads = _heads_of(model)
    opts = inputs.options_as(VitSlimOptions, "vit_slim")
    dev = device_of(model, inputs.device)
    mh = {h.index: nn.Parameter(torch.ones(h.heads, device=dev)) for h in heads}
    md = {h.index: nn.Parameter(torch.ones(h.head_dim, device=dev)) for h in heads}

    def install() -> list[Any]:
        return _channel_scale_hooks(heads, lambda h, _v: (mh[h.index][:, None] * md[h.index][None, :]).flatten())

    train_soft_masks(model, inputs.require_loader("vit_slim"), [*mh.values(), *md.values()], install,
                     lam=float(opts.lambda_), epochs=float(opts.epochs), lr=float(opts.lr), classes=inputs.classes,
                     device=dev)
    return HeadScores({b: m.detach().abs().float().cpu() for b, m in mh.items()},
                      {b: m.detach().abs().float().cpu() for b, m in md.items()})


for _name, _fn in (("jas", _jas), ("magnitude", _magnitude), ("taylor", _taylor), ("activation", _activation),
                   ("random", _random), ("hessian", _hessian), ("vit_slim", _vit_slim)):
    HEAD_CRITERIA.add(HeadCriterion(_name, _fn))


def stage_head_scores(ctx: Any, method: str, classes: list[int] | None, example: Tensor,
                      masks: Any) -> HeadScores | None:
    """The pipeline's head scores of ``method`` on the dense model and the probe images (of
    ``classes``) when the recipe has ``prune.attention`` or a ``prune.budget`` spending over heads
    or head dimensions, else None."""
    p = ctx.recipe.prune
    if p.attention is None and (p.budget is None or not set(p.budget.units) - {"ffn"}):
        return None
    from .criteria import ScoringInputs

    loader, _ = ctx.loader("probe", classes)
    settings = ctx.locate.settings.as_dict() if ctx.locate is not None else {}
    resolved = getattr(ctx, "prune", None)  # the criterion's recipe options (prune.vit_slim)
    options = resolved.settings.options_for(method) if resolved is not None else None
    return head_scores(method, ScoringInputs(model=ctx.model, loader=loader, classes=classes,
                                             seed=ctx.recipe.runtime.seed, device=ctx.device, example_inputs=example,
                                             masks=masks, locate_settings=settings, options=options))


def check_head_methods(methods: list[str], key: str = "prune.attention") -> None:
    """Refuse ``prune.attention`` (or the setting ``key``) with a criterion that cannot score
    heads (before any work).

    Raises:
        PruneSettingError: naming the first such criterion and those that can.
    """
    from . import criteria  # noqa: F401  its modules register their head scores too (obs)

    for method in methods:
        if method not in HEAD_CRITERIA.names():
            raise PruneSettingError(f"{key}: criterion '{method}' cannot score attention heads; use "
                                    f"{', '.join(HEAD_CRITERIA.names())}")


def head_scores(method: str, inputs: Any) -> HeadScores:
    """Scores of a registered attention criterion (``prune.methods`` name) for ``inputs``
    (:class:`~jas_prune.pruning.criteria.ScoringInputs`).

    Raises:
        PruneSettingError: a criterion that cannot score heads (naming it and those that can).
    """
    check_head_methods([method])
    return HEAD_CRITERIA.get(method).score(inputs)


# ------------------------------------------------------------------------------- pruning
def _lowest(scores: Tensor, ratio: float, protect: list[int] = (), block: int | None = None) -> list[int]:
    n = len(scores)
    k = min(n - 1, round(n * ratio))
    if len(protect) > n - k:
        raise BudgetError(f"prune.attention.heads: block {block} keeps {n - k} of {n} heads but the class head "
                          f"masks protect {len(protect)}; lower prune.attention.heads or attribution.topk",
                          protected=True)
    order = [i for i in torch.sort(scores.float(), stable=True).indices.tolist() if i not in set(protect)]
    return sorted(order[:k])


def _dims_to_remove(scores: Tensor, ratio: float, rope: str | None) -> list[int]:
    """The head dimensions removed: the lowest-scoring share, or with RoPE the lowest-scoring
    share of rotary pairs (``interleaved``: dims 2i and 2i+1; ``half``: i and i+d/2), both
    dimensions of a pair together (a rotation mixes them)."""
    if rope is None:
        return _lowest(scores, ratio)
    d = len(scores)
    pairs = [(2 * i, 2 * i + 1) for i in range(d // 2)] if rope == "interleaved" else \
        [(i, i + d // 2) for i in range(d // 2)]
    pair_scores = torch.stack([scores[a] + scores[b] for a, b in pairs])
    return sorted(j for p in _lowest(pair_scores, ratio) for j in pairs[p])


def _take(owner: nn.Module, name: str, dim: int, index: Tensor) -> None:
    """Keep the entries ``index`` of ``owner.name`` along ``dim`` (a parameter or buffer), and a
    ``nn.Linear``'s sizes with them."""
    t = getattr(owner, name)
    new = t.detach().index_select(dim, index.to(t.device)).clone()
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        owner._buffers[name] = new
    if isinstance(owner, nn.Linear) and name == "weight":
        owner.out_features, owner.in_features = new.shape
    elif isinstance(owner, nn.Linear) and name == "bias":
        owner.out_features = new.shape[0]


def _check_size(slot: Slot, want: int, what: str, b: int) -> None:
    got = slot.tensor.shape[slot.dim]
    if got != want:
        raise RuntimeError(f"prune.attention: block {b}: {type(slot.owner).__name__}.{slot.name} has {got} entries "
                           f"along dim {slot.dim}, not {want} ({what}); refusing to slice an unknown layout")


def _slice_heads(vit: nn.Module, h: HeadLayer, layout: AttentionLayout, keep_h: list[int],
                 keep_d: list[int]) -> None:
    """Remove heads and head dimensions by slicing every slot of the layout (checked first)."""
    H, d = h.heads, h.head_dim
    A = H * d
    keep_ch = torch.tensor([i * d + j for i in keep_h for j in keep_d], dtype=torch.long)
    channels, per_head = layout.channels(h.attn), layout.per_head(vit, h.attn)
    for s in channels:
        _check_size(s, len(s.roles) * A, f"{len(s.roles)} x {H} heads x {d} dims", h.index)
    for s in per_head:
        _check_size(s, H, f"{H} heads", h.index)
    if h.proj.in_features != A:
        raise RuntimeError(f"prune.attention: block {h.index}: projection input {h.proj.in_features} != {A}")
    for s in channels:
        _take(s.owner, s.name, s.dim, torch.cat([i * A + keep_ch for i in range(len(s.roles))]))
    for s in per_head:
        _take(s.owner, s.name, s.dim, torch.tensor(keep_h, dtype=torch.long))
    _take(h.proj, "weight", 1, keep_ch)
    h.proj.in_features = len(keep_ch)
    for m in h.attn.modules():  # the attention and its per-head modules (relative position MLP/table)
        if isinstance(getattr(m, "num_heads", None), int):
            m.num_heads = len(keep_h)
    setattr(h.attn, layout.heads_attr, len(keep_h))
    for attr, value in (("head_dim", len(keep_d)), ("attn_dim", len(keep_ch))):
        if isinstance(getattr(h.attn, attr, None), int):
            setattr(h.attn, attr, value)
    rope_keep = getattr(h.attn, "jas_rope_keep", None)
    if rope_keep is not None:
        h.attn.jas_rope_keep = rope_keep[torch.tensor(keep_d, dtype=torch.long, device=rope_keep.device)]


def _keep_temperature(attn: nn.Module, layout: AttentionLayout, heads: int, d: int, d_new: int) -> None:
    """Query rows (and biases) times ``sqrt(d'/d)`` and the scale set to ``d'^-0.5``: both the
    fused kernel (dividing by ``sqrt(d')``) and the explicit path see the logits of the dense
    model with those dimensions zeroed."""
    f = math.sqrt(d_new / d)
    A = heads * d_new
    for s in layout.channels(attn):
        t = s.tensor
        for i, role in enumerate(s.roles):
            if role == "q":
                t.narrow(s.dim, i * A, A).mul_(f)
    setattr(attn, layout.scale_attr, d_new ** -0.5)


def check_attention(model: nn.Module,
                    settings: AttentionSettings) -> tuple[nn.Module, tuple[HeadLayer, ...], AttentionLayout]:
    """Refuse ``prune.attention`` on a model it cannot prune (before any work); returns the ViT,
    its attention layers and its family's layout.

    Raises:
        UnsupportedModelError: a family without an attention layout (named); ``heads`` where a
            relative-position table is shared by all blocks; ``head_dims`` with query/key norms
            (``qk_norm``: their statistics would change).
    """
    vit, layers, layout = layout_of(model)
    shared = layout.shared(vit)
    if settings.heads and shared:
        raise UnsupportedModelError(f"prune.attention.heads: {find_vit(model)[1].family}: {shared}, so heads "
                                    "cannot be removed per block; prune head_dims only")
    for h in layers:
        layout.channels(h.attn)  # a layout the family cannot slice refuses here
        if settings.head_dims and not isinstance(getattr(h.attn, "q_norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"prune.attention.head_dims: block {h.index} normalises queries and keys "
                                        "(qk_norm); removing dimensions would change the norms — prune heads only")
    return vit, layers, layout


def prune_attention(model: nn.Module, scores: HeadScores | None, *, heads: float = 0.0, head_dims: float = 0.0,
                    example_inputs: Tensor | None = None,
                    settings: AttentionSettings | None = None,
                    keep: Mapping[int, tuple[int, int]] | None = None) -> AttentionSummary | None:
    """Remove the lowest-scoring heads and head dimensions of every block, in place.

    Args:
        scores: per block, head and dimension scores (:func:`head_scores`).
        heads: fraction of each block's heads removed (round(H · heads), one kept at least).
        head_dims: fraction of each block's head dimensions removed (same indices in every head;
            with RoPE, that fraction of the rotary pairs).
        settings: ``prune.attention`` (its ``heads``/``head_dims`` replace the two above).
        keep: block -> (kept heads, kept dimensions per head), chosen elsewhere (a budget split,
            :mod:`jas_prune.pruning.allocate`); replaces the two shares (recorded as the shares
            of the whole model removed). Blocks not listed keep everything.

    Returns:
        The summary; None when ``scores`` is None (nothing to prune: no ``prune.attention``).

    Raises:
        UnsupportedModelError: a family without an attention layout (named); ``head_dims`` with
            query/key norms (``qk_norm``: their statistics would change); ``heads`` where a
            relative-position table is shared by all blocks.
        PruneSettingError: a ratio outside [0, 1).
    """
    import torch_pruning as tp

    if scores is None:
        return None
    if settings is not None:
        heads, head_dims = settings.heads, settings.head_dims
    for name, r in (("heads", heads), ("head_dims", head_dims)):
        if not 0.0 <= float(r) < 1.0:
            raise PruneSettingError(f"prune.attention.{name}: {r!r} is outside [0, 1)")
    if keep is not None:
        heads, head_dims = _shares(layout_of(model)[1], keep)
    vit, layers, layout = check_attention(model, AttentionSettings.model_construct(heads=heads, head_dims=head_dims))
    summary = AttentionSummary(float(heads), float(head_dims))
    plan: dict[int, tuple[HeadLayer, list[int], list[int]]] = {}
    for h in layers:
        if h.index not in scores.heads:
            continue
        if keep is not None:
            kh, kd = keep.get(h.index, (h.heads, h.head_dim))
            gone_h = _lowest(scores.heads[h.index], 1 - kh / h.heads, scores.protect.get(h.index, []), h.index)
            gone_d = _dims_to_remove(scores.dims[h.index], 1 - kd / h.head_dim, layout.rope(vit, h.attn))
        else:
            gone_h = _lowest(scores.heads[h.index], heads, scores.protect.get(h.index, []), h.index) if heads else []
            gone_d = _dims_to_remove(scores.dims[h.index], head_dims, layout.rope(vit, h.attn)) if head_dims else []
        plan[h.index] = (h, gone_h, gone_d)
        summary.heads_before[h.index], summary.head_dim_before[h.index] = h.heads, h.head_dim
    if layout.elastic is not None and plan:
        from ..models.elastic import make_attention_elastic

        make_attention_elastic(model)
    dg = dependency_graph(model, example_inputs) if layout.graph else None
    new_heads: dict[nn.Module, int] = {}
    for b, (h, gone_h, gone_d) in plan.items():
        H, d = h.heads, h.head_dim
        keep_h = [i for i in range(H) if i not in set(gone_h)]
        keep_d = [j for j in range(d) if j not in set(gone_d)]
        summary.kept_heads[b], summary.kept_dims[b] = keep_h, keep_d
        idxs = sorted({i * d + j for i in gone_h for j in range(d)} | {i * d + j for i in keep_h for j in gone_d})
        new_heads[layout.channels(h.attn)[0].owner] = len(keep_h)
        if not idxs:
            continue
        with torch.no_grad():
            if dg is not None:
                group = dg.get_pruning_group(h.proj, tp.prune_linear_in_channels, idxs)
                check_group(group, _allowed(h, layout), f"prune.attention: block {b}")
                group.prune()
            else:
                _slice_heads(vit, h, layout, keep_h, keep_d)
            if gone_d:  # keep the logits' temperature: q·k over d' dims, scaled as over d
                _keep_temperature(h.attn, layout, len(keep_h), d, len(keep_d))
    if dg is not None:
        update_attention_geometry(vit, new_heads)
    return summary


def _shares(layers: tuple[HeadLayer, ...], keep: Mapping[int, tuple[int, int]]) -> tuple[float, float]:
    """(share of all heads, share of the kept heads' dimensions) that ``keep`` removes; checks it."""
    heads = kept_h = dims = kept_d = 0
    for h in layers:
        kh, kd = keep.get(h.index, (h.heads, h.head_dim))
        if not (1 <= kh <= h.heads and 1 <= kd <= h.head_dim):
            raise PruneSettingError(f"prune.attention: block {h.index} cannot keep {kh} of {h.heads} heads with "
                                    f"{kd} of {h.head_dim} dimensions")
        heads, kept_h = heads + h.heads, kept_h + kh
        dims, kept_d = dims + kh * h.head_dim, kept_d + kh * kd
    return 1 - kept_h / heads, 1 - kept_d / dims


def attention_macs(model: nn.Module, tokens: int) -> int:
    """Multiply-accumulates of the attention matmuls (``q·kᵀ`` and ``attn·v``) of one image:
    ``2·T²·H·d`` per block (the part of a block's cost that grows with the tokens squared;
    Torch-Pruning's count, :func:`jas_prune.evaluate.count_params_macs`, includes it)."""
    _, info = find_vit(model)
    total = 0
    for h in discover_heads(info):
        total += 2 * tokens * tokens * h.heads * h.head_dim
    return total
