"""The attribution engine: batched, hook-based passes over a timm ViT.

A *neuron* ``(l, i)`` is unit ``i`` of the post-activation FFN hidden of block ``l``, read and
scaled at the scope's token positions (``cls``: the class token; ``all``: every token, with
``v̄`` and ``g`` summed over positions). ``F`` is the softmax probability of the target class.

**JAS of a set S** with quadrature nodes ``α_k`` and weights ``w_k`` (``w_k = 1/m`` for the
Riemann rules), where ``g_u(α_k) = ∂F/∂u`` with every neuron of S scaled by ``α_k`` jointly and
every other neuron of S's layers held (clamped) at its clean value:

- ``formula="paper"`` (the released code): ``(Σ_{u∈S} v̄_u) · Σ_k w_k Σ_{u∈S} g_u(α_k)``, which for
  ``left``/``right`` is exactly ``(Σ_u v̄_u / m) · Σ_k Σ_u g_u(α_k)`` — a product of sums. For
  ``trapezoid``/``gauss`` the ``1/m`` becomes the rule's weight of each node.
- ``formula="ig"``: ``Σ_{u∈S} Σ_k w_k v_u g_u(α_k)`` — integrated gradients of the clamped network
  along the straight path from "S zeroed" to clean, so it satisfies completeness
  ``≈ F(x) − F(x with S zeroed, rest of S's layers clamped)``. For ``scope="all"`` the product
  ``v·g`` is taken per token position before summing (each (neuron, token) is one IG input
  variable); summing ``v`` and ``g`` separately first would break completeness.

**Layer-progressive locating** (Alg. 1 / Alg. 3): for each located layer ``l`` in order, with the
path P found so far, the path neurons of earlier layers are scaled by ``α_k``, every other neuron
of those layers is clamped to its clean value, and either the whole of layer ``l`` is scaled
(``candidates="layer_scaled"``, the released code: one batched pass per layer) or each candidate
alone (``candidates="exact"``). Each candidate ``j`` is scored as ``JAS(P ∪ {j})`` and the top-K
are kept; with ``topk > 1`` *all* K neurons of every earlier layer enter both sums (the released
TopK script used only the last of them — a bug that is deliberately not reproduced).

**Speed** (layer-progressive JAS): the residual stream entering the block being located, with
the path found so far applied, is kept between layers for every (image, step) row, together with
its *tangent* — its derivative along the path direction (every path neuron perturbed by 1, or by
its clean value for ``ig``). A layer's pass then runs only from that block to the output, one
``torch.autograd.grad`` gives the gradients of the whole layer and the cotangent of the kept
stream, and the path neurons' summed gradient is the dot product of that cotangent with the
tangent (the chain rule: the path neurons reach F only through the stream). After the top-K are
picked, the stream and its tangent advance through the block with forward-mode autograd
(``torch.autograd.forward_ad``; attention in PyTorch's math kernel, which has forward-mode
derivatives). So a layer costs a forward and backward of the blocks from it to the output plus one
block of forward-mode, instead of the whole network twice; the final path JAS costs one suffix pass.
A model whose block has an operation without a forward-mode derivative falls back to the reverse
route (each pass edits the path neurons of every earlier block and backpropagates to the first),
which gives the same numbers to rounding. Gradients are taken with respect to the clamp tensors
only (parameters are frozen for the call and restored afterwards), and blocks before the first
edited one run on one image per chunk or once per image.

**Precision**: quadrature nodes and weights, the clean ``v̄``, every accumulator and the returned
scores are float32 (float64 for a float64 model): a bfloat16/float16 model runs its forward and
backward in its own dtype, its gradients are cast to float32 before they are weighted and summed.

**Attention heads** (``units`` with ``heads``): a head's output before the attention output
projection is a unit too (:mod:`.sites`: value ``‖v_h‖``, gradient along its clean direction).
Every per-unit quantity is keyed by a :class:`~.sites.Site` (block, unit kind); the located
sites run in forward order (a block's heads before its FFN), the path grows site by site, and a
block's heads already in the path are edits of the passes that score its FFN neurons (the kept
stream enters that block). ``units: [ffn]`` runs exactly the computations of an FFN-only engine.

The methods (``jas``, the paper's baselines and ``joint_ig`` — every located block scaled
together, one set of m passes: the fast pruning importance) are defined in :mod:`.methods` on top
of the primitives here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import AttributionSettingError, InvalidArgumentError
from ..models import FFNInfo, discover_ffn, num_outputs
from ..neurons import write_scope
from ..torchutil import forward_ad_ready, frozen_eval, model_device, model_dtype
from .methods import METHODS
from .quadrature import quadrature_rule
from .settings import LocateSettings, ResolvedSettings
from .sites import FFN, HEADS, Site, SiteOps

__all__ = ["LocateResult", "JointAttribution", "Pass", "PATH_MODES", "accumulation_dtype"]

#: How the path neurons' gradients are obtained: ``tangent`` (forward-mode, kept stream; the
#: default) or ``reverse`` (every pass backpropagates to the first edited block). Same numbers
#: to rounding; ``reverse`` exists as the fallback and for benchmarks.
PATH_MODES = ("tangent", "reverse")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attribution is accumulated in: float64 for a float64 model, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class LocateResult:
    """Per-image neuron paths and scores.

    Attributes:
        paths: ``[B, L, K]`` neuron indices, layer order, best first.
        jas: ``[B]`` JAS of each whole path under the same settings.
        scores: L tensors ``[B, n_l]``: for ``jas`` the candidate scores ``JAS(P ∪ {j})`` at each
            layer; for baselines the per-neuron statistic they rank by.
        layers: block indices located (length L).
        targets: ``[B]`` the class whose softmax probability is F.
        probs: ``[B]`` clean F.
        settings: the resolved settings.
        head_paths: ``[B, L, Kh]`` head indices per located block when heads were located
            (``attribution.units``), else None; ``paths`` is then ``[B, 0, K]`` if FFN neurons
            were not located.
        head_scores: L tensors ``[B, heads]`` (as ``scores``), or None.
        head_layers: block indices whose heads were located (``[]`` without heads).
    """

    paths: Tensor
    jas: Tensor
    scores: list[Tensor]
    layers: list[int]
    targets: Tensor
    probs: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    head_paths: Tensor | None = None
    head_scores: list[Tensor] | None = None
    head_layers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.paths.shape[0])


class _Stop(Exception):
    """Raised by a block's forward hook to end a forward whose remaining blocks are not needed."""


@contextlib.contextmanager
def _hooks(info: FFNInfo, ops: dict[Site, SiteOps], act_fns: dict[Site, Callable[[Tensor], Tensor | None]],
           enter: tuple[int, Callable[[Tensor], Tensor]] | None = None,
           leave: tuple[int, Callable[[Tensor], None]] | None = None) -> Iterator[None]:
    """All the engine's hooks for one forward, removed on exit (also when the forward raises).

    Args:
        act_fns: per site, a function of the site tensor (reads it, or returns its replacement).
        enter: ``(block, fn)``: the block's input (first positional argument) is replaced by
            ``fn(input)``.
        leave: ``(block, fn)``: ``fn(output)`` sees the block's output (and may raise :class:`_Stop`).
    """
    handles = []
    try:
        for site, fn in act_fns.items():
            handles.append(ops[site].hook(fn))
        if enter is not None:
            blk_in, fn_in = enter

            def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (fn_in(args[0]),) + tuple(args[1:])

            handles.append(info.layers[blk_in].block.register_forward_pre_hook(pre))
        if leave is not None:
            blk_out, fn_out = leave

            def post(_mod: nn.Module, _args: Any, out: Tensor) -> None:
                fn_out(out)

            handles.append(info.layers[blk_out].block.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def _writer(clamps: dict[Site, Tensor], l: Site, scope: str) -> Callable[[Tensor], Tensor]:
    def fn(out: Tensor) -> Tensor:
        return write_scope(out, clamps[l], scope)

    return fn


@contextlib.contextmanager
def _linear_tangents(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Forward-mode through every ``nn.Linear`` under ``modules`` as one extra matmul.

    PyTorch's forward-mode rule of ``addmm`` also multiplies by the weight's (zero) tangent; here
    the primal runs as usual and the tangent is ``tangent(x) @ W^T`` (frozen weights, no bias).
    """
    handles = []
    stash: dict[int, Tensor | None] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        primal, tangent = fwAD.unpack_dual(args[0])
        stash[id(mod)] = tangent
        return (primal,) + tuple(args[1:])

    def post(mod: nn.Module, _args: Any, out: Tensor) -> Tensor:
        tangent = stash.pop(id(mod), None)
        return out if tangent is None else fwAD.make_dual(out, torch.nn.functional.linear(tangent, mod.weight))

    try:
        for root in modules:
            for mod in root.modules():
                if type(mod) is nn.Linear:
                    handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_ad_unsupported(exc: BaseException) -> bool:
    return isinstance(exc, NotImplementedError) or (isinstance(exc, RuntimeError) and "forward AD" in str(exc))


@dataclass
class _Stream:
    """The residual stream entering block ``block`` with the path found so far applied.

    ``primal`` is ``[B, T, D]`` per image while no path neuron is edited upstream (``per_image``),
    else ``[B·m, T, D]`` per (image, step) row ``b·m + k``; ``tangent`` (same shape, ``None`` = 0)
    is its derivative along the path direction.
    """

    block: int
    primal: Tensor
    tangent: Tensor | None
    per_image: bool

    def rows(self, b: Tensor, k: Tensor, m: int) -> Tensor:
        return b if self.per_image else b * m + k


# A per-layer edit of a pass: ("path", P [B, K]) scales the K path neurons, ("scaled", None) the
# whole layer, ("exact", None) the row's candidate only.
_Spec = tuple[str, "Tensor | None"]


@dataclass
class _Rows:
    """The (image, step[, candidate]) rows of a pass, image-major."""

    b: Tensor
    k: Tensor
    j: Tensor | None
    slot: Tensor  # accumulation slot of each row (image, or image × candidate)
    n_slots: int


@dataclass
class Pass:
    """What one call of the engine shares between its layers: the images, their targets, the
    clean activations, the quadrature and the path found so far (``path[site]`` is ``[B, K]``).

    Every per-unit dict is keyed by :class:`~.sites.Site` (block, unit kind); ``sites`` lists the
    located ones in forward order, ``ops`` how to reach each, ``dirs`` each head site's clean
    direction per channel (accumulation dtype)."""

    x: Tensor
    targets: Tensor
    clean: dict[Site, Tensor]
    vbar: dict[Site, Tensor]
    nodes: Tensor
    weights: Tensor
    s: ResolvedSettings
    ops: dict[Site, SiteOps] = field(default_factory=dict)
    dirs: dict[Site, Tensor] = field(default_factory=dict)
    path: dict[Site, Tensor] = field(default_factory=dict)
    stream: _Stream | None = None  # the kept stream (path mode ``tangent``); None: reverse route

    @property
    def sites(self) -> list[Site]:
        return sorted(self.ops)


class JointAttribution:
    """Captum-style JAS attribution of a timm ViT's FFN neurons (stateless between calls).

    Args:
        model: the ViT (left unchanged).
        path_mode: ``tangent`` (default) or ``reverse`` — how the path neurons' gradients are
            obtained (:data:`PATH_MODES`; the same numbers to rounding, ``tangent`` is faster).

    Example:
        >>> ja = JointAttribution(model)
        >>> res = ja.attribute(images, target=labels, steps=20, topk=1)
        >>> res.paths.shape  # [B, depth, 1]
    """

    def __init__(self, model: nn.Module, *, path_mode: str = "tangent") -> None:
        if path_mode not in PATH_MODES:
            raise InvalidArgumentError(f"path_mode: must be one of {', '.join(PATH_MODES)}, got {path_mode!r}")
        self.model = model
        self.info = discover_ffn(model)
        num_outputs(model)  # a model without a classifier has no class probability to attribute
        self.path_mode = path_mode
        forward_ad_ready()

    # ------------------------------------------------------------------ public
    def attribute(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None = None, *,
                  settings: LocateSettings | ResolvedSettings | None = None, **kwargs: Any) -> LocateResult:
        """Locate the neuron path of every image.

        Args:
            inputs: images ``[B, C, H, W]``.
            target: class per image (``[B]`` tensor/list or one int); ``None`` = the model's clean
                prediction.
            settings: a :class:`LocateSettings` (or one already resolved for this model); or the
                same as keywords (``method``, ``steps``, ``topk``, ``scope``, ``formula``,
                ``quadrature``, ``candidates``, ``layers``, ``internal_batch_size``).

        Returns:
            A :class:`LocateResult` (CPU tensors; float32, or float64 for a float64 model).
        """
        s = self._resolve(settings, kwargs)
        x = self._inputs(inputs)
        ops = self._site_ops(s)
        sites = sorted(ops)
        with frozen_eval(self.model):
            clean, probs_all, entry = self._clean(x, s, ops, entry=sites[0].block)
            targets = self._targets(target, probs_all)
            probs = probs_all.gather(1, targets[:, None])[:, 0]
            st = self._pass(x, targets, clean, s, ops)
            if self.path_mode == "tangent":
                st.stream = _Stream(sites[0].block, entry, None, per_image=True)
            scores: dict[Site, Tensor] = {}
            # a method yields its sites' scores in order; the path grows before the next site
            for site, sc in zip(sites, METHODS.get(s.method).layer_scores(self, st)):
                scores[site] = sc
                st.path[site] = sc.topk(s.head_topk if site.slot == HEADS else s.topk, dim=1).indices
            jas = self.path_score(st)
        out_dtype = accumulation_dtype(x.dtype)
        out_settings = s.as_dict()
        out_settings["target"] = "pred" if target is None else "given"
        by_kind = {slot: [site for site in sites if site.slot == slot] for slot in (FFN, HEADS)}

        def stacked(slot: int, k: int) -> Tensor:
            if not by_kind[slot]:
                return torch.empty(x.shape[0], 0, k, dtype=torch.long)
            return torch.stack([st.path[site] for site in by_kind[slot]], dim=1).cpu()

        heads = bool(by_kind[HEADS])
        return LocateResult(
            paths=stacked(FFN, s.topk),
            jas=jas.to(out_dtype).cpu(),
            scores=[scores[site].to(out_dtype).cpu() for site in by_kind[FFN]],
            layers=[site.block for site in by_kind[FFN]],
            targets=targets.cpu(),
            probs=probs.to(out_dtype).cpu(),
            settings=out_settings,
            head_paths=stacked(HEADS, s.head_topk) if heads else None,
            head_scores=[scores[site].to(out_dtype).cpu() for site in by_kind[HEADS]] if heads else None,
            head_layers=[site.block for site in by_kind[HEADS]],
        )

    def path_jas(self, inputs: Tensor, target: Tensor | int | Sequence[int] | None, paths: Tensor | None, *,
                 settings: LocateSettings | ResolvedSettings | None = None, head_paths: Tensor | None = None,
                 **kwargs: Any) -> Tensor:
        """JAS of given paths ``[B, L, K]`` (or ``[B, L]``) over the settings' blocks (``[B]``, CPU).

        Only ``steps``, ``scope``, ``formula``, ``quadrature``, ``layers``, ``units`` and
        ``internal_batch_size`` matter here. ``head_paths`` (same layout, head indices) is needed
        when ``units`` has ``heads``; ``paths`` when it has ``ffn``.
        """
        s = self._resolve(settings, kwargs)
        x = self._inputs(inputs)
        ops = self._site_ops(s)
        given = {FFN: ("paths", paths, "neuron"), HEADS: ("head_paths", head_paths, "head")}
        path: dict[Site, Tensor] = {}
        for slot in sorted({site.slot for site in ops}):
            name, p, what = given[slot]
            if p is None:
                raise AttributionSettingError(f"path_jas: {name} is needed for attribution.units {list(s.units)}")
            p = torch.as_tensor(p)
            if p.ndim == 2:
                p = p.unsqueeze(-1)
            if p.ndim != 3 or p.shape[0] != x.shape[0] or p.shape[1] != len(s.blocks):
                raise AttributionSettingError(
                    f"path_jas: {name} must be [B={x.shape[0]}, L={len(s.blocks)}, K], got {tuple(p.shape)}")
            p = p.to(device=x.device, dtype=torch.long)
            for i, l in enumerate(s.blocks):
                n = ops[Site(l, slot)].units
                if p[:, i].numel() and (p[:, i].min() < 0 or p[:, i].max() >= n):
                    raise AttributionSettingError(f"path_jas: {what} index out of range 0..{n - 1} in block {l}")
                path[Site(l, slot)] = p[:, i]
        with frozen_eval(self.model):
            clean, probs_all, _ = self._clean(x, s, ops)
            targets = self._targets(target, probs_all)
            st = self._pass(x, targets, clean, s, ops)
            st.path = path
            jas = self.path_score(st)
        return jas.to(accumulation_dtype(x.dtype)).cpu()

    # ------------------------------------------------------------------ setup
    def _resolve(self, settings: LocateSettings | ResolvedSettings | None, kwargs: dict[str, Any]) -> ResolvedSettings:
        if settings is None:
            settings = LocateSettings(**kwargs)
        elif kwargs:
            raise AttributionSettingError(f"attribution: pass settings= or keywords, not both ({', '.join(kwargs)})")
        if isinstance(settings, ResolvedSettings):
            return settings
        return settings.resolve(self.info)

    def _site_ops(self, s: ResolvedSettings) -> dict[Site, SiteOps]:
        """The located sites of this model, in forward order."""
        ops: dict[Site, SiteOps] = {}
        heads = None
        if "heads" in s.units:
            from ..models.heads import discover_heads

            heads = discover_heads(self.info)
        for l in s.blocks:
            if heads is not None:
                h = heads[l]
                ops[Site(l, HEADS)] = SiteOps(Site(l, HEADS), h.proj, h.heads, h.head_dim)
            if "ffn" in s.units:
                ops[Site(l, FFN)] = SiteOps(Site(l, FFN), self.info.layers[l].act, self.info.layers[l].hidden)
        return ops

    def _pass(self, x: Tensor, targets: Tensor, clean: dict[Site, Tensor], s: ResolvedSettings,
              ops: dict[Site, SiteOps]) -> Pass:
        acc = accumulation_dtype(x.dtype)
        nodes, weights = quadrature_rule(s.quadrature, s.steps, device=x.device, dtype=acc)
        vbar = {l: self._vbar(ops[l].norms(clean[l].to(acc)), s.scope) for l in ops}
        dirs = {l: ops[l].direction(clean[l].to(acc)) for l in ops if ops[l].grouped}
        return Pass(x, targets, clean, vbar, nodes, weights, s, ops, dirs)

    def _inputs(self, inputs: Tensor) -> Tensor:
        x = torch.as_tensor(inputs)
        if x.ndim != 4:
            raise AttributionSettingError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise AttributionSettingError("images: empty batch")
        return x.detach().to(device=model_device(self.model), dtype=model_dtype(self.model))

    def _targets(self, target: Any, probs: Tensor) -> Tensor:
        B, C = probs.shape
        if target is None:
            return probs.argmax(1)
        t = torch.as_tensor(target, device=probs.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise AttributionSettingError(f"target: class indices must be integers, got {t.dtype}")
        t = t.long()
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise AttributionSettingError(f"target: expected {B} class indices, got shape {tuple(t.shape)}")
        if (t < 0).any() or (t >= C).any():
            raise AttributionSettingError(f"target: class index out of range 0..{C - 1}")
        return t.clone()

    def _chunk(self, rows_total: int, per_pass: int, s: ResolvedSettings) -> int:
        if s.internal_batch_size is not None:
            return s.internal_batch_size
        return per_pass if s.candidates == "exact" and s.method == "jas" else rows_total

    @torch.no_grad()
    def _clean(self, x: Tensor, s: ResolvedSettings, ops: dict[Site, SiteOps],
               entry: int | None = None) -> tuple[dict[Site, Tensor], Tensor, Tensor | None]:
        """Clean scope activations of every located site, clean softmax (accumulation dtype)
        and, with ``entry``, the clean input of that block ``[B, T, D]`` — in one forward."""
        store: dict[Site, list[Tensor]] = {l: [] for l in ops}
        entries: list[Tensor] = []

        def saver(l: Site) -> Any:
            def fn(out: Tensor) -> None:
                store[l].append((out[:, 0] if s.scope == "cls" else out).detach())

            return fn

        def keep(h: Tensor) -> Tensor:
            entries.append(h.detach())
            return h

        acc = accumulation_dtype(x.dtype)
        chunk = s.internal_batch_size or x.shape[0]
        probs = []
        with _hooks(self.info, ops, {l: saver(l) for l in ops}, None if entry is None else (entry, keep)):
            for i in range(0, x.shape[0], chunk):
                probs.append(torch.softmax(self.model(x[i:i + chunk]).to(acc), dim=-1))
        return ({l: torch.cat(v) for l, v in store.items()}, torch.cat(probs),
                torch.cat(entries) if entries else None)

    @staticmethod
    def _vbar(clean: Tensor, scope: str) -> Tensor:
        return clean if scope == "cls" else clean.sum(1)

    def _rows(self, B: int, m: int, n: int | None, device: torch.device) -> _Rows:
        if n is None:
            b = torch.arange(B, device=device).repeat_interleave(m)
            k = torch.arange(m, device=device).repeat(B)
            return _Rows(b, k, None, b, B)
        b = torch.arange(B, device=device).repeat_interleave(n * m)
        j = torch.arange(n, device=device).repeat_interleave(m).repeat(B)
        k = torch.arange(m, device=device).repeat(B * n)
        return _Rows(b, k, j, b * n + j, B * n)

    @staticmethod
    def _clamp(clean: Tensor, b: Tensor, alpha: Tensor, spec: _Spec, j: Tensor | None, scope: str,
               op: SiteOps) -> Tensor:
        """The values an edited site's scope positions are held at, per row: the clean hidden of
        the row's image with the spec's units scaled by the row's ``α`` (model dtype)."""
        kind, P = spec
        v = clean.index_select(0, b)
        n = v.shape[-1]
        if op.grouped and kind != "scaled":
            unit = torch.ones(b.shape[0], op.units, device=v.device, dtype=alpha.dtype)
            idx = P.index_select(0, b) if kind == "path" else j[:, None]
            mult = op.expand(unit.scatter_(1, idx, alpha[:, None].expand(-1, idx.shape[1])))
        elif kind == "scaled":
            mult = alpha[:, None].expand(-1, n)
        else:
            mult = torch.ones(b.shape[0], n, device=v.device, dtype=alpha.dtype)
            if kind == "path":
                idx = P.index_select(0, b)
                mult.scatter_(1, idx, alpha[:, None].expand(-1, idx.shape[1]))
            else:
                mult.scatter_(1, j[:, None], alpha[:, None])
        return (v * (mult if scope == "cls" else mult[:, None, :])).to(v.dtype)

    def _direction(self, st: Pass, l: Site, b: Tensor) -> Tensor:
        """Tangent of site ``l``'s scope hidden along the path direction, per row of images
        ``b``: at the path neurons 1 (``paper``: the sum of their gradients) or their clean value
        (``ig``: the sum of value × gradient), 0 elsewhere; at path heads their clean direction
        (``paper``) or clean value (``ig``)."""
        v = st.clean[l].index_select(0, b)
        P = st.path[l].index_select(0, b)
        op = st.ops[l]
        if op.grouped:
            unit = torch.zeros(P.shape[0], op.units, device=v.device, dtype=v.dtype).scatter_(1, P, 1.0)
            mask = op.expand(unit)
            src = v if st.s.formula == "ig" else st.dirs[l].index_select(0, b).to(v.dtype)
            return src * (mask if st.s.scope == "cls" else mask[:, None, :])
        if st.s.scope == "all":
            P = P[:, None, :].expand(-1, v.shape[1], -1)
        src = v.gather(-1, P) if st.s.formula == "ig" else torch.ones(P.shape, dtype=v.dtype, device=v.device)
        return torch.zeros_like(v).scatter_(-1, P, src)

    # ------------------------------------------------------------------ passes
    def _passes(self, st: Pass, specs: dict[int, _Spec], rows: _Rows, chunk: int, reduce: dict[int, str],
                stream: _Stream | None = None) -> Iterator[tuple[slice, dict[int, Tensor], Tensor | None]]:
        """Run the rows in chunks; per chunk yield the reduced gradients of every edited block and,
        when ``stream`` has a tangent, each row's derivative of F along the path direction.

        The reduced gradient of block l is ``[R, n]`` (accumulation dtype): ``∂F/∂u``
        (``reduce[l] == "grad"``) or ``v_u · ∂F/∂u`` (``"ig"``), summed over token positions for
        scope ``all``. Without a stream the forward starts from the images and the blocks before
        the first edited one run once per image; with one it starts at ``stream.block`` from the
        kept stream (blocks before it run on one image only, their output unused).
        """
        x, targets, clean, nodes, scope = st.x, st.targets, st.clean, st.nodes, st.s.scope
        acc, m = nodes.dtype, st.s.steps
        R = rows.b.shape[0]
        for r0 in range(0, R, chunk):
            sl = slice(r0, min(R, r0 + chunk))
            b, k = rows.b[sl], rows.k[sl]
            j = rows.j[sl] if rows.j is not None else None
            b_lo, b_hi = int(b[0]), int(b[-1])
            alpha = nodes[k]
            clamps = {l: self._clamp(clean[l], b, alpha, spec, j, scope, st.ops[l]).requires_grad_(True)
                      for l, spec in specs.items()}
            tangent = None
            if stream is None:
                local = b - b_lo
                enter = (min(specs).block, lambda h: h.index_select(0, local))
                x_in = x[b_lo:b_hi + 1]
            else:
                brow = stream.rows(b, k, m)
                r = stream.primal.index_select(0, brow)
                if stream.tangent is not None:
                    tangent = stream.tangent.index_select(0, brow)
                    r.requires_grad_(True)
                enter = (stream.block, lambda h, r=r: r)
                x_in = x[b_lo:b_lo + 1]
            order = sorted(clamps)
            wrt = [clamps[l] for l in order] + ([r] if tangent is not None else [])
            with torch.enable_grad(), _hooks(self.info, st.ops, {l: _writer(clamps, l, scope) for l in specs}, enter):
                logits = self.model(x_in)
                F = torch.softmax(logits.to(acc), dim=-1).gather(1, targets.index_select(0, b)[:, None])
                grads = torch.autograd.grad(F.sum(), wrt, allow_unused=True)
            out: dict[int, Tensor] = {}
            for l, g in zip(order, grads):
                g = torch.zeros_like(clamps[l], dtype=acc) if g is None else g.to(acc)
                if st.ops[l].grouped:  # a head: along its clean direction (grad) or value (ig)
                    d = clean[l].index_select(0, b).to(acc) if reduce[l] == "ig" else st.dirs[l].index_select(0, b)
                    g = st.ops[l].unit_sum(g * d)
                elif reduce[l] == "ig":
                    g = g * clean[l].index_select(0, b).to(acc)
                out[l] = g if scope == "cls" else g.sum(1)
            dots = None
            if tangent is not None:
                g_r = grads[-1]
                dots = (torch.zeros(b.shape[0], device=x.device, dtype=acc) if g_r is None
                        else (g_r.to(acc) * tangent.to(acc)).flatten(1).sum(1))
            yield sl, out, dots

    def _advance(self, st: Pass, to_block: int) -> None:
        """Move the kept stream from its block to the input of ``to_block``: forward-mode through
        the blocks between, the path neurons of located blocks scaled by each row's ``α`` (their
        tangent the path direction), every other neuron of those blocks held at its clean value."""
        stream, s, x, scope = st.stream, st.s, st.x, st.s.scope
        assert stream is not None and stream.block < to_block
        B, m = x.shape[0], s.steps
        rows = self._rows(B, m, None, x.device)
        R = rows.b.shape[0]
        chunk = s.internal_batch_size or R
        edited = [l for l in st.path if stream.block <= l.block < to_block]
        primals, tangents = [], []
        for r0 in range(0, R, chunk):
            b, k = rows.b[r0:r0 + chunk], rows.k[r0:r0 + chunk]
            brow = stream.rows(b, k, m)
            r = stream.primal.index_select(0, brow)
            t = torch.zeros_like(r) if stream.tangent is None else stream.tangent.index_select(0, brow)
            got: list[Tensor] = []

            def leave(out: Tensor) -> None:
                p, tan = fwAD.unpack_dual(out)
                got.extend([p, torch.zeros_like(p) if tan is None else tan])
                raise _Stop

            with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH), \
                    _linear_tangents([self.info.layers[i].block for i in range(stream.block, to_block)]):
                clamps = {l: fwAD.make_dual(self._clamp(st.clean[l], b, st.nodes[k], ("path", st.path[l]), None, scope,
                                                        st.ops[l]),
                                            self._direction(st, l, b)) for l in edited}
                with _hooks(self.info, st.ops, {l: _writer(clamps, l, scope) for l in edited},
                            (stream.block, lambda h: fwAD.make_dual(r, t)), (to_block - 1, leave)):
                    try:
                        self.model(x[int(b[0]):int(b[0]) + 1])
                    except _Stop:
                        pass
            primals.append(got[0])
            tangents.append(got[1])
        st.stream = _Stream(to_block, torch.cat(primals), torch.cat(tangents), per_image=False)

    def _stream_at(self, st: Pass, layer: int) -> _Stream | None:
        """The kept stream advanced to block ``layer`` (None: reverse route, also after a model
        turned out to lack forward-mode derivatives). Path sites of that block itself (the heads
        before its FFN) stay edits of the passes."""
        if st.stream is not None and st.stream.block < layer:
            try:
                self._advance(st, layer)
            except (NotImplementedError, RuntimeError) as exc:
                if not _forward_ad_unsupported(exc):
                    raise
                st.stream = None
        return st.stream

    def jas_layer(self, st: Pass, layer: Site) -> Tensor:
        """Candidate scores ``JAS(P ∪ {j})`` ``[B, n]`` of site ``layer`` given the path ``st.path``."""
        s, x, path = st.s, st.x, st.path
        B, n, m = x.shape[0], st.ops[layer].units, s.steps
        exact = s.candidates == "exact"
        rows = self._rows(B, m, n if exact else None, x.device)
        stream = self._stream_at(st, layer.block)
        specs: dict[Site, _Spec] = {l: ("path", P) for l, P in path.items()
                                    if stream is None or l.block >= stream.block}
        specs[layer] = ("exact" if exact else "scaled", None)
        red = "ig" if s.formula == "ig" else "grad"
        acc = st.nodes.dtype
        a_path = torch.zeros(rows.n_slots, device=x.device, dtype=acc)
        a_cur = torch.zeros(rows.n_slots if exact else B, 1 if exact else n, device=x.device, dtype=acc)
        chunk = self._chunk(rows.b.shape[0], B * m, s)
        for sl, g, dots in self._passes(st, specs, rows, chunk, {l: red for l in specs}, stream):
            w = st.weights[rows.k[sl]]
            b, slot = rows.b[sl], rows.slot[sl]
            for l, P in path.items():
                if l in g:
                    a_path.index_add_(0, slot, w * g[l].gather(1, P.index_select(0, b)).sum(1))
            if dots is not None:
                a_path.index_add_(0, slot, w * dots)
            if exact:
                a_cur.index_add_(0, slot, (w * g[layer].gather(1, rows.j[sl][:, None])[:, 0])[:, None])
            else:
                a_cur.index_add_(0, b, w[:, None] * g[layer])
        a_path = a_path.view(B, n) if exact else a_path[:, None]
        a_cur = a_cur.view(B, n)
        if s.formula == "ig":
            return a_path + a_cur
        v_path = self._v_path(st.vbar, path, B, x, acc)
        return (v_path[:, None] + st.vbar[layer]) * (a_path + a_cur)

    @staticmethod
    def _v_path(vbar: dict[Site, Tensor], path: dict[Site, Tensor], B: int, x: Tensor, acc: torch.dtype) -> Tensor:
        v = torch.zeros(B, device=x.device, dtype=acc)
        for l, P in path.items():
            v = v + vbar[l].gather(1, P).sum(1)
        return v

    def path_score(self, st: Pass) -> Tensor:
        """JAS ``[B]`` of the whole path ``st.path`` (all its layers edited jointly).

        When the kept stream has reached the last located block (after layer-progressive
        locating) this is one pass from there; otherwise one pass over the whole network.
        """
        s, x, path = st.s, st.x, st.path
        B, m = x.shape[0], s.steps
        acc = st.nodes.dtype
        rows = self._rows(B, m, None, x.device)
        last = max(path).block
        stream = st.stream if st.stream is not None and st.stream.block == last else None
        specs: dict[Site, _Spec] = {l: ("path", P) for l, P in path.items() if stream is None or l.block == last}
        red = "ig" if s.formula == "ig" else "grad"
        a = torch.zeros(B, device=x.device, dtype=acc)
        chunk = s.internal_batch_size or rows.b.shape[0]
        for sl, g, dots in self._passes(st, specs, rows, chunk, {l: red for l in specs}, stream):
            w, b = st.weights[rows.k[sl]], rows.b[sl]
            for l in specs:
                a.index_add_(0, b, w * g[l].gather(1, path[l].index_select(0, b)).sum(1))
            if dots is not None:
                a.index_add_(0, b, w * dots)
        if s.formula == "ig":
            return a
        return self._v_path(st.vbar, path, B, x, acc) * a

    def knowledge_layer(self, st: Pass, layer: Site) -> Tensor:
        """Integrated gradients ``[B, n]`` of every unit of site ``layer`` scaled alone."""
        s, x = st.s, st.x
        B, n, m = x.shape[0], st.ops[layer].units, s.steps
        rows = self._rows(B, m, None, x.device)
        a = torch.zeros(B, n, device=x.device, dtype=st.nodes.dtype)
        chunk = s.internal_batch_size or rows.b.shape[0]
        for sl, g, _ in self._passes(st, {layer: ("scaled", None)}, rows, chunk, {layer: "ig"}):
            a.index_add_(0, rows.b[sl], st.weights[rows.k[sl]][:, None] * g[layer])
        return a

    def joint_ig(self, st: Pass) -> dict[Site, Tensor]:
        """Integrated gradients ``[B, n]`` of every neuron of every located block, all of them
        scaled by ``α_k`` together (one set of ``m`` passes instead of one per block).

        The located blocks' scope hiddens move jointly on the straight line from zero to their
        clean values, so the scores of all neurons sum to ``F(x) − F(x with every located FFN
        zeroed)`` as the steps grow (completeness over the whole set).
        """
        s, x = st.s, st.x
        B, m = x.shape[0], s.steps
        rows = self._rows(B, m, None, x.device)
        acc = {l: torch.zeros(B, st.ops[l].units, device=x.device, dtype=st.nodes.dtype) for l in st.sites}
        specs: dict[Site, _Spec] = {l: ("scaled", None) for l in st.sites}
        chunk = s.internal_batch_size or rows.b.shape[0]
        for sl, g, _ in self._passes(st, specs, rows, chunk, {l: "ig" for l in specs}):
            w = st.weights[rows.k[sl]][:, None]
            for l in st.sites:
                acc[l].index_add_(0, rows.b[sl], w * g[l])
        return acc

    def influence_pattern(self, st: Pass) -> dict[Site, Tensor]:
        """Weighted mean over ``α_k`` of ``∂F(α_k x)/∂h_l`` ``[B, n]`` for every located site
        (for a head, the derivative along its clean direction)."""
        s, x, targets, nodes = st.s, st.x, st.targets, st.nodes
        acc = nodes.dtype
        B, m = x.shape[0], s.steps
        rows = self._rows(B, m, None, x.device)
        sites = st.sites
        acc_by_layer = {l: torch.zeros(B, st.ops[l].units, device=x.device, dtype=acc) for l in sites}
        chunk = s.internal_batch_size or rows.b.shape[0]
        R = rows.b.shape[0]
        for r0 in range(0, R, chunk):
            sl = slice(r0, min(R, r0 + chunk))
            b, k = rows.b[sl], rows.k[sl]
            xs = (x.index_select(0, b) * nodes[k].view(-1, 1, 1, 1).to(x.dtype)).requires_grad_(True)
            hid: dict[Site, Tensor] = {}

            def keeper(l: Site) -> Any:
                def fn(out: Tensor) -> None:
                    hid[l] = out

                return fn

            with torch.enable_grad(), _hooks(self.info, st.ops, {l: keeper(l) for l in sites}):
                F = torch.softmax(self.model(xs).to(acc), dim=-1).gather(1, targets.index_select(0, b)[:, None])
                grads = torch.autograd.grad(F.sum(), [hid[l] for l in sites], allow_unused=True)
            w = st.weights[k]
            for l, g in zip(sites, grads):
                if g is None:
                    continue
                g = g.to(acc)
                g = g[:, 0] if s.scope == "cls" else g
                if st.ops[l].grouped:
                    g = st.ops[l].unit_sum(g * st.dirs[l].index_select(0, b))
                g = g if s.scope == "cls" else g.sum(1)
                acc_by_layer[l].index_add_(0, b, w[:, None] * g)
        return acc_by_layer
