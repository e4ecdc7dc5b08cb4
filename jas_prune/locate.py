"""Joint Attribution Score (JAS) neuron-path locating and the paper's baselines.

SPEC §2 defines every setting; the short version:

* A *neuron* ``(l, i)`` is unit ``i`` of the post-activation FFN hidden of block ``l``, read and
  scaled at the *scope*'s token positions (``cls``: the class token; ``all``: every token, with
  ``v̄`` and ``g`` summed over positions).
* ``F`` is the softmax probability of the target class (the label, or the clean prediction).
* **JAS of a set S** with quadrature nodes ``α_k`` and weights ``w_k`` (``w_k = 1/m`` for the
  Riemann rules), where ``g_u(α_k) = ∂F/∂u`` with every neuron of S scaled by ``α_k`` jointly and
  every other neuron of S's layers held (clamped) at its clean value:

  - ``formula="paper"`` (the released code): ``(Σ_{u∈S} v̄_u) · Σ_k w_k Σ_{u∈S} g_u(α_k)``, which for
    ``left``/``right`` is exactly ``(Σ_u v̄_u / m) · Σ_k Σ_u g_u(α_k)`` — a product of sums. For
    ``trapezoid``/``gauss`` the ``1/m`` becomes the rule's weight of each node (the same nodes and
    weights as the ``ig`` form, so both forms are the same quadrature of the same integrand).
  - ``formula="ig"``: ``Σ_{u∈S} Σ_k w_k v_u g_u(α_k)`` — integrated gradients of the clamped network
    along the straight path from "S zeroed" to clean, so it satisfies completeness
    ``≈ F(x) − F(x with S zeroed, rest of S's layers clamped)``. For ``scope="all"`` the product
    ``v·g`` is taken per token position before summing (each (neuron, token) is one IG input
    variable); summing ``v`` and ``g`` separately first would break completeness.

* Quadratures (``steps = m`` gradient evaluations for every rule): ``left`` ``α_k = k/m``,
  ``k = 0..m−1`` (the released code, default); ``right`` ``k = 1..m`` (the paper's Eq. 3);
  ``trapezoid`` ``α_k = k/(m−1)``, ``k = 0..m−1`` with halved end weights (needs ``m ≥ 2``);
  ``gauss`` Gauss–Legendre nodes and weights mapped to ``[0, 1]``.

**Layer-progressive locating** (Alg. 1 / Alg. 3): for each located layer ``l`` in order, with the
path P found so far, the path neurons of earlier layers are scaled by ``α_k``, every other neuron
of those layers is clamped to its clean value (a constant, even though upstream changed), and
either the whole of layer ``l`` is scaled (``candidates="layer_scaled"``, the released code: one
batched pass per layer) or each candidate alone (``candidates="exact"``). Each candidate ``j`` is
scored as ``JAS(P ∪ {j})`` and the top-K are kept. With ``topk > 1`` *all* K neurons of every
earlier layer enter both sums. (The released TopK script only used the last of the K neurons of
each earlier layer in the sums — a bug that is deliberately not reproduced.)

**Speed**: one clean forward for every layer's activations; per located layer one forward over
images × steps (chunked by ``internal_batch_size``) and one ``torch.autograd.grad`` with respect
to the clamp tensors only (parameters are frozen for the call and restored afterwards). The part
of the network before the first edited block runs once per image and is expanded to the
(image, step) rows by a pre-hook. With the default settings the paths are those of the released
code on the same weights and images.

Baselines (same path format; ``scores`` holds the statistic they rank by):

* ``activation`` — top-K clean activations ``v̄`` per layer (App. C.2);
* ``influence_pattern`` — the input interpolated from zero (``x·α_k``), per layer the top-K of the
  quadrature-weighted mean of ``∂F/∂h_l`` (plain mean for ``left``/``right``), as the paper's
  comparison was run (App. C.3);
* ``knowledge`` — per-neuron integrated gradients of each layer scaled alone (App. B), with the
  chosen quadrature (``left`` = Riemann sum as in Knowledge Neurons).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import JasPruneError, RecipeError
from .models import FFNInfo, discover_ffn
from .neurons import check_scope, model_device, model_dtype, resolve_layers, write_scope

__all__ = [
    "METHODS",
    "FORMULAS",
    "QUADRATURES",
    "CANDIDATES",
    "TARGETS",
    "AttributionSettingError",
    "LocateResult",
    "JointAttribution",
    "locate",
    "path_jas",
    "quadrature_rule",
]

METHODS = ("jas", "activation", "influence_pattern", "knowledge")
FORMULAS = ("paper", "ig")
QUADRATURES = ("left", "right", "trapezoid", "gauss")
CANDIDATES = ("layer_scaled", "exact")
TARGETS = ("label", "pred")
SCOPES = ("cls", "all")


class AttributionSettingError(RecipeError, ValueError):
    """An invalid ``attribution.*`` setting (the message names it)."""


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
    """

    paths: Tensor
    jas: Tensor
    scores: list[Tensor]
    layers: list[int]
    targets: Tensor
    probs: Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.paths.shape[0])


def _err(key: str, msg: str) -> AttributionSettingError:
    return AttributionSettingError(f"attribution.{key}: {msg}")


def _choice(key: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise _err(key, f"must be one of {', '.join(options)}, got {value!r}")
    return str(value)


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(key, f"must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def quadrature_rule(name: str, steps: int, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes ``α_k`` and weights ``w_k`` (summing to 1) of a quadrature on ``[0, 1]``.

    Args:
        name: ``left`` | ``right`` | ``trapezoid`` | ``gauss``.
        steps: number of nodes ``m`` (``trapezoid`` needs ``m ≥ 2``).
    """
    _choice("quadrature", name, QUADRATURES)
    m = _positive_int("steps", steps, 2 if name == "trapezoid" else 1)
    k = torch.arange(m, dtype=torch.float64)
    if name == "left":
        nodes, weights = k / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    elif name == "right":
        nodes, weights = (k + 1) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    elif name == "trapezoid":
        nodes = k / (m - 1)
        weights = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (m - 1)
    else:
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(m)
        nodes, weights = torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    return nodes.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class _Settings:
    method: str
    steps: int
    topk: int
    scope: str
    formula: str
    quadrature: str
    candidates: str
    layers: tuple[int, ...]
    internal_batch_size: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "steps": self.steps, "topk": self.topk, "scope": self.scope,
            "formula": self.formula, "quadrature": self.quadrature, "candidates": self.candidates,
            "layers": list(self.layers), "internal_batch_size": self.internal_batch_size,
        }


def _validate(info: FFNInfo, *, method: Any = "jas", steps: Any = 20, topk: Any = 1, scope: Any = "cls",
              formula: Any = "paper", quadrature: Any = "left", candidates: Any = "layer_scaled",
              layers: Any = None, internal_batch_size: Any = None) -> _Settings:
    method = _choice("method", method, METHODS)
    formula = _choice("formula", formula, FORMULAS)
    quadrature = _choice("quadrature", quadrature, QUADRATURES)
    candidates = _choice("candidates", candidates, CANDIDATES)
    scope = _choice("scope", scope, SCOPES)
    steps = _positive_int("steps", steps, 2 if quadrature == "trapezoid" else 1)
    topk = _positive_int("topk", topk)
    if internal_batch_size is not None:
        internal_batch_size = _positive_int("internal_batch_size", internal_batch_size)
    try:
        check_scope(info, scope, key="attribution.scope")
        idx = resolve_layers(info, layers, key="attribution.layers")
    except JasPruneError as exc:  # RecipeError (layers), UnsupportedModelError (cls scope)
        raise AttributionSettingError(str(exc)) from None
    for l in idx:
        width = info.layers[l].hidden
        if topk > width:
            raise _err("topk", f"{topk} exceeds the FFN width {width} of block {l}")
    return _Settings(method, steps, topk, scope, formula, quadrature, candidates, tuple(idx),
                     internal_batch_size)


@contextlib.contextmanager
def _prepared(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the call; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def _hooks(info: FFNInfo, act_fns: dict[int, Any], expand: tuple[int, Tensor] | None) -> Iterator[None]:
    handles = []
    try:
        for l, fn in act_fns.items():
            handles.append(info.layers[l].act.register_forward_hook(fn))
        if expand is not None:
            blk_idx, local = expand

            def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0].index_select(0, local),) + tuple(args[1:])

            handles.append(info.layers[blk_idx].block.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()


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


class JointAttribution:
    """Captum-style JAS attribution of a timm ViT's FFN neurons (stateless between calls).

    Example:
        >>> ja = JointAttribution(model)
        >>> res = ja.attribute(images, target=labels, steps=20, topk=1)
        >>> res.paths.shape  # [B, depth, 1]
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.info = discover_ffn(model)

    # ------------------------------------------------------------------ public
    def attribute(
        self,
        inputs: Tensor,
        target: Tensor | int | Sequence[int] | None = None,
        *,
        method: str = "jas",
        steps: int = 20,
        topk: int = 1,
        scope: str = "cls",
        formula: str = "paper",
        quadrature: str = "left",
        candidates: str = "layer_scaled",
        layers: int | Sequence[int] | None = None,
        internal_batch_size: int | None = None,
    ) -> LocateResult:
        """Locate the neuron path of every image.

        Args:
            inputs: images ``[B, C, H, W]``.
            target: class per image (``[B]`` tensor/list or one int); ``None`` = the model's clean
                prediction.
            method, steps, topk, scope, formula, quadrature, candidates, layers,
                internal_batch_size: see :func:`locate` and SPEC §2.

        Returns:
            A :class:`LocateResult` (CPU tensors).
        """
        s = _validate(self.info, method=method, steps=steps, topk=topk, scope=scope, formula=formula,
                      quadrature=quadrature, candidates=candidates, layers=layers,
                      internal_batch_size=internal_batch_size)
        x = self._inputs(inputs)
        with _prepared(self.model):
            clean, probs_all = self._clean(x, s)
            targets = self._targets(target, probs_all)
            probs = probs_all.gather(1, targets[:, None])[:, 0]
            nodes, weights = quadrature_rule(s.quadrature, s.steps, device=x.device, dtype=x.dtype)
            vbar = {l: self._vbar(clean[l], s.scope) for l in s.layers}
            scores: list[Tensor] = []
            path: dict[int, Tensor] = {}
            if s.method == "jas":
                for l in s.layers:
                    sc = self._jas_layer(x, targets, clean, vbar, path, l, nodes, weights, s)
                    scores.append(sc)
                    path[l] = sc.topk(s.topk, dim=1).indices
            elif s.method == "activation":
                for l in s.layers:
                    scores.append(vbar[l])
                    path[l] = vbar[l].topk(s.topk, dim=1).indices
            elif s.method == "knowledge":
                for l in s.layers:
                    sc = self._knowledge_layer(x, targets, clean, l, nodes, weights, s)
                    scores.append(sc)
                    path[l] = sc.topk(s.topk, dim=1).indices
            else:
                ip = self._influence_pattern(x, targets, nodes, weights, s)
                for l in s.layers:
                    scores.append(ip[l])
                    path[l] = ip[l].topk(s.topk, dim=1).indices
            jas = self._path_score(x, targets, clean, vbar, path, nodes, weights, s)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        settings = s.as_dict()
        settings["target"] = "pred" if target is None else "given"
        return LocateResult(
            paths=torch.stack([path[l] for l in s.layers], dim=1).cpu(),
            jas=jas.to(out_dtype).cpu(),
            scores=[sc.to(out_dtype).cpu() for sc in scores],
            layers=list(s.layers),
            targets=targets.cpu(),
            probs=probs.to(out_dtype).cpu(),
            settings=settings,
        )

    def path_jas(
        self,
        inputs: Tensor,
        target: Tensor | int | Sequence[int] | None,
        paths: Tensor,
        *,
        steps: int = 20,
        scope: str = "cls",
        formula: str = "paper",
        quadrature: str = "left",
        layers: int | Sequence[int] | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor:
        """JAS of given paths ``[B, L, K]`` (or ``[B, L]``) over ``layers`` (``[B]``, CPU)."""
        s = _validate(self.info, steps=steps, scope=scope, formula=formula, quadrature=quadrature,
                      layers=layers, internal_batch_size=internal_batch_size)
        x = self._inputs(inputs)
        paths = torch.as_tensor(paths)
        if paths.ndim == 2:
            paths = paths.unsqueeze(-1)
        if paths.ndim != 3 or paths.shape[0] != x.shape[0] or paths.shape[1] != len(s.layers):
            raise AttributionSettingError(
                f"path_jas: paths must be [B={x.shape[0]}, L={len(s.layers)}, K], got {tuple(paths.shape)}"
            )
        paths = paths.to(device=x.device, dtype=torch.long)
        for i, l in enumerate(s.layers):
            n = self.info.layers[l].hidden
            if paths[:, i].numel() and (paths[:, i].min() < 0 or paths[:, i].max() >= n):
                raise AttributionSettingError(f"path_jas: neuron index out of range 0..{n - 1} in block {l}")
        with _prepared(self.model):
            clean, probs_all = self._clean(x, s)
            targets = self._targets(target, probs_all)
            nodes, weights = quadrature_rule(s.quadrature, s.steps, device=x.device, dtype=x.dtype)
            vbar = {l: self._vbar(clean[l], s.scope) for l in s.layers}
            path = {l: paths[:, i] for i, l in enumerate(s.layers)}
            jas = self._path_score(x, targets, clean, vbar, path, nodes, weights, s)
        return jas.to(torch.float64 if x.dtype == torch.float64 else torch.float32).cpu()

    # ------------------------------------------------------------------ helpers
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

    def _chunk(self, rows_total: int, per_pass: int, s: _Settings) -> int:
        if s.internal_batch_size is not None:
            return s.internal_batch_size
        return per_pass if s.candidates == "exact" and s.method == "jas" else rows_total

    @torch.no_grad()
    def _clean(self, x: Tensor, s: _Settings) -> tuple[dict[int, Tensor], Tensor]:
        """Clean scope activations of every located block and clean softmax, in one forward."""
        store: dict[int, list[Tensor]] = {l: [] for l in s.layers}

        def saver(l: int) -> Any:
            def fn(_m: nn.Module, _i: Any, out: Tensor) -> None:
                store[l].append((out[:, 0] if s.scope == "cls" else out).detach())

            return fn

        chunk = s.internal_batch_size or x.shape[0]
        probs = []
        with _hooks(self.info, {l: saver(l) for l in s.layers}, None):
            for i in range(0, x.shape[0], chunk):
                probs.append(torch.softmax(self.model(x[i:i + chunk]), dim=-1))
        return {l: torch.cat(v) for l, v in store.items()}, torch.cat(probs)

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

    def _passes(
        self,
        x: Tensor,
        targets: Tensor,
        clean: dict[int, Tensor],
        specs: dict[int, _Spec],
        rows: _Rows,
        nodes: Tensor,
        chunk: int,
        scope: str,
        reduce: dict[int, str],
    ) -> Iterator[tuple[slice, dict[int, Tensor]]]:
        """Run the rows in chunks; per chunk yield the reduced gradients of every edited block.

        The reduced gradient of block l is ``[R, n]``: ``∂F/∂u`` (``reduce[l] == "grad"``) or
        ``v_u · ∂F/∂u`` (``"ig"``), summed over token positions for scope ``all``.
        """
        first = min(specs)
        R = rows.b.shape[0]
        for r0 in range(0, R, chunk):
            sl = slice(r0, min(R, r0 + chunk))
            b, k = rows.b[sl], rows.k[sl]
            j = rows.j[sl] if rows.j is not None else None
            b_lo, b_hi = int(b[0]), int(b[-1])
            alpha = nodes[k]
            clamps: dict[int, Tensor] = {}
            for l, (kind, P) in specs.items():
                v = clean[l].index_select(0, b)
                n = v.shape[-1]
                if kind == "scaled":
                    mult = alpha[:, None].expand(-1, n)
                else:
                    mult = torch.ones(b.shape[0], n, device=x.device, dtype=x.dtype)
                    if kind == "path":
                        idx = P.index_select(0, b)
                        mult.scatter_(1, idx, alpha[:, None].expand(-1, idx.shape[1]))
                    else:
                        mult.scatter_(1, j[:, None], alpha[:, None])
                c = v * (mult if scope == "cls" else mult[:, None, :])
                clamps[l] = c.requires_grad_(True)

            def writer(l: int) -> Any:
                def fn(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
                    return write_scope(out, clamps[l], scope)

                return fn

            local = b - b_lo
            with torch.enable_grad(), _hooks(self.info, {l: writer(l) for l in specs}, (first, local)):
                logits = self.model(x[b_lo:b_hi + 1])
                F = torch.softmax(logits, dim=-1).gather(1, targets.index_select(0, b)[:, None])
                order = sorted(clamps)
                grads = torch.autograd.grad(F.sum(), [clamps[l] for l in order], allow_unused=True)
            out: dict[int, Tensor] = {}
            for l, g in zip(order, grads):
                if g is None:
                    g = torch.zeros_like(clamps[l])
                if reduce[l] == "ig":
                    g = g * clean[l].index_select(0, b)
                out[l] = g if scope == "cls" else g.sum(1)
            yield sl, out

    def _jas_layer(self, x: Tensor, targets: Tensor, clean: dict[int, Tensor], vbar: dict[int, Tensor],
                   path: dict[int, Tensor], layer: int, nodes: Tensor, weights: Tensor, s: _Settings) -> Tensor:
        """Candidate scores ``JAS(P ∪ {j})`` ``[B, n]`` of block ``layer``."""
        B, n, m = x.shape[0], self.info.layers[layer].hidden, s.steps
        exact = s.candidates == "exact"
        rows = self._rows(B, m, n if exact else None, x.device)
        specs: dict[int, _Spec] = {l: ("path", P) for l, P in path.items()}
        specs[layer] = ("exact" if exact else "scaled", None)
        red = "ig" if s.formula == "ig" else "grad"
        a_path = torch.zeros(rows.n_slots, device=x.device, dtype=x.dtype)
        a_cur = torch.zeros(rows.n_slots if exact else B, 1 if exact else n, device=x.device, dtype=x.dtype)
        chunk = self._chunk(rows.b.shape[0], B * m, s)
        for sl, g in self._passes(x, targets, clean, specs, rows, nodes, chunk, s.scope,
                                  {l: red for l in specs}):
            w = weights[rows.k[sl]]
            b, slot = rows.b[sl], rows.slot[sl]
            for l, P in path.items():
                a_path.index_add_(0, slot, w * g[l].gather(1, P.index_select(0, b)).sum(1))
            if exact:
                a_cur.index_add_(0, slot, (w * g[layer].gather(1, rows.j[sl][:, None])[:, 0])[:, None])
            else:
                a_cur.index_add_(0, b, w[:, None] * g[layer])
        a_path = a_path.view(B, n) if exact else a_path[:, None]
        a_cur = a_cur.view(B, n)
        if s.formula == "ig":
            return a_path + a_cur
        v_path = self._v_path(vbar, path, B, x)
        return (v_path[:, None] + vbar[layer]) * (a_path + a_cur)

    @staticmethod
    def _v_path(vbar: dict[int, Tensor], path: dict[int, Tensor], B: int, x: Tensor) -> Tensor:
        v = torch.zeros(B, device=x.device, dtype=x.dtype)
        for l, P in path.items():
            v = v + vbar[l].gather(1, P).sum(1)
        return v

    def _path_score(self, x: Tensor, targets: Tensor, clean: dict[int, Tensor], vbar: dict[int, Tensor],
                    path: dict[int, Tensor], nodes: Tensor, weights: Tensor, s: _Settings) -> Tensor:
        """JAS ``[B]`` of the whole path (all its layers edited jointly)."""
        B, m = x.shape[0], s.steps
        rows = self._rows(B, m, None, x.device)
        specs: dict[int, _Spec] = {l: ("path", P) for l, P in path.items()}
        red = "ig" if s.formula == "ig" else "grad"
        a = torch.zeros(B, device=x.device, dtype=x.dtype)
        chunk = s.internal_batch_size or rows.b.shape[0]
        for sl, g in self._passes(x, targets, clean, specs, rows, nodes, chunk, s.scope,
                                  {l: red for l in specs}):
            w, b = weights[rows.k[sl]], rows.b[sl]
            for l, P in path.items():
                a.index_add_(0, b, w * g[l].gather(1, P.index_select(0, b)).sum(1))
        if s.formula == "ig":
            return a
        return self._v_path(vbar, path, B, x) * a

    def _knowledge_layer(self, x: Tensor, targets: Tensor, clean: dict[int, Tensor], layer: int,
                         nodes: Tensor, weights: Tensor, s: _Settings) -> Tensor:
        """Integrated gradients ``[B, n]`` of every neuron of block ``layer`` scaled alone."""
        B, n, m = x.shape[0], self.info.layers[layer].hidden, s.steps
        rows = self._rows(B, m, None, x.device)
        a = torch.zeros(B, n, device=x.device, dtype=x.dtype)
        chunk = s.internal_batch_size or rows.b.shape[0]
        for sl, g in self._passes(x, targets, clean, {layer: ("scaled", None)}, rows, nodes, chunk,
                                  s.scope, {layer: "ig"}):
            a.index_add_(0, rows.b[sl], weights[rows.k[sl]][:, None] * g[layer])
        return a

    def _influence_pattern(self, x: Tensor, targets: Tensor, nodes: Tensor, weights: Tensor,
                           s: _Settings) -> dict[int, Tensor]:
        """Weighted mean over ``α_k`` of ``∂F(α_k x)/∂h_l`` ``[B, n]`` for every located block."""
        B, m = x.shape[0], s.steps
        rows = self._rows(B, m, None, x.device)
        acc = {l: torch.zeros(B, self.info.layers[l].hidden, device=x.device, dtype=x.dtype) for l in s.layers}
        chunk = s.internal_batch_size or rows.b.shape[0]
        R = rows.b.shape[0]
        for r0 in range(0, R, chunk):
            sl = slice(r0, min(R, r0 + chunk))
            b, k = rows.b[sl], rows.k[sl]
            xs = (x.index_select(0, b) * nodes[k].view(-1, 1, 1, 1)).requires_grad_(True)
            hid: dict[int, Tensor] = {}

            def keeper(l: int) -> Any:
                def fn(_m: nn.Module, _i: Any, out: Tensor) -> None:
                    hid[l] = out

                return fn

            with torch.enable_grad(), _hooks(self.info, {l: keeper(l) for l in s.layers}, None):
                F = torch.softmax(self.model(xs), dim=-1).gather(1, targets.index_select(0, b)[:, None])
                grads = torch.autograd.grad(F.sum(), [hid[l] for l in s.layers], allow_unused=True)
            w = weights[k]
            for l, g in zip(s.layers, grads):
                if g is None:
                    continue
                g = g[:, 0] if s.scope == "cls" else g.sum(1)
                acc[l].index_add_(0, b, w[:, None] * g)
        return acc


def _labels_for(target: str, labels: Any) -> Any:
    target = _choice("target", target, TARGETS)
    if target == "pred":
        return None
    if labels is None:
        raise _err("target", "'label' needs the images' labels (pass labels, or use target 'pred')")
    return labels


def locate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int] | None,
    *,
    method: str = "jas",
    steps: int = 20,
    topk: int = 1,
    scope: str = "cls",
    formula: str = "paper",
    quadrature: str = "left",
    candidates: str = "layer_scaled",
    target: str = "label",
    layers: int | Sequence[int] | None = None,
    internal_batch_size: int | None = None,
) -> LocateResult:
    """Find each image's neuron path (top-K FFN neurons per layer).

    Args:
        model: timm ViT with ``blk.mlp.fc1 -> act -> fc2`` blocks (left unchanged).
        images: ``[B, C, H, W]``, preprocessed; moved to the model's device and dtype.
        labels: ``[B]`` ground-truth classes (needed for ``target="label"``).
        method: ``jas`` | ``activation`` | ``influence_pattern`` | ``knowledge``.
        steps: quadrature nodes m (default 20).
        topk: neurons kept per layer (K). All K neurons of every earlier layer enter both sums
            of JAS(P ∪ {j}); the released TopK script used only the last of them (a bug that is
            not reproduced).
        scope: ``cls`` (class token, the paper) | ``all`` (every token).
        formula: ``paper`` (product of sums, the released code) | ``ig``.
        quadrature: ``left`` (released code) | ``right`` (Eq. 3) | ``trapezoid`` | ``gauss``.
        candidates: ``layer_scaled`` (released code) | ``exact`` (each candidate scaled alone).
        target: ``label`` (F = probability of the label) | ``pred`` (of the clean prediction).
        layers: ``None`` (all blocks), a prefix depth, or a list of block indices.
        internal_batch_size: max (image, step) rows per forward (peak memory bound); ``None``
            = all rows of a layer at once (for ``exact``: images × steps rows at a time).

    Returns:
        :class:`LocateResult` with ``paths`` ``[B, L, K]``, ``jas`` ``[B]``, ``scores``, ...

    Raises:
        AttributionSettingError: an invalid setting (a ``RecipeError`` and ``ValueError``).
    """
    given = _labels_for(target, labels)
    res = JointAttribution(model).attribute(
        images, given, method=method, steps=steps, topk=topk, scope=scope, formula=formula,
        quadrature=quadrature, candidates=candidates, layers=layers, internal_batch_size=internal_batch_size,
    )
    res.settings["target"] = target
    return res


def path_jas(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int] | None,
    paths: Tensor,
    *,
    steps: int = 20,
    scope: str = "cls",
    formula: str = "paper",
    quadrature: str = "left",
    layers: int | Sequence[int] | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    """JAS ``[B]`` of given paths under the settings (e.g. baseline paths for Table 1).

    Args:
        targets: class per image whose probability is F (``None`` = clean prediction).
        paths: ``[B, L, K]`` (or ``[B, L]``) neuron indices for the blocks in ``layers``.
    """
    return JointAttribution(model).path_jas(
        images, targets, paths, steps=steps, scope=scope, formula=formula, quadrature=quadrature,
        layers=layers, internal_batch_size=internal_batch_size,
    )
