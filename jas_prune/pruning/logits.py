"""Closed-form compensation of the attention logits for pruned query/key channels.

When head dimensions are removed (:func:`jas_prune.pruning.attention.prune_attention`), a kept
head's logit loses the pruned channels' term: with kept channels ``S`` and pruned ``P``,

    dense:  z_ij = s · (q_S,i · k_S,j + q_P,i · k_P,j)        pruned:  z'_ij = s · q_S,i · k_S,j

The keys' pruned channels are regressed on the kept ones over calibration tokens (ridge, float64,
the ``prune.calibration`` damping): ``k_P ≈ B k_S + b``. Then
``q_P · k_P ≈ (Bᵀ q_P) · k_S + q_P · b``; the last term is the same for every key of a query and
the softmax ignores it, so the whole correction folds into the kept **query** rows, which are a
linear function of the attention input as ``q_P`` is:

    W_q,S ← W_q,S + (s_dense / s_pruned) · Bᵀ W_q,P        b_q,S ← b_q,S + (s_dense / s_pruned) · Bᵀ b_q,P

No module is added (ONNX export and ``save_pruned`` see the same structure). The logits become
exact when the pruned key channels are affine in the kept ones. Folding into the queries (not the
keys) is deliberate: a residual of a query regression would leave a per-*key* term, which the
softmax does not ignore. The ordinary least-squares ``B`` minimises the residual covariance of the
keys in the Loewner order, so it minimises the logit error ``Σ_ij (q_P,i · r_j)²`` for any query
statistics; ridge damping departs from that only by the damping.

Two candidates (``LOGIT_COMPENSATIONS``), declared before any measurement:

- ``affine``: one regression over all calibration tokens (CORP's affine recovery of the keys);
- ``centered``: the keys centred per image before the regression — a per-image constant of the
  residual is again the same for every key of a query, so this fits exactly the part of the
  logits the softmax sees.

:class:`~jas_prune.pruning.reconstruct.SequentialReconstructor` applies it after the head
dimensions were pruned and before the attention output projection is refit, and keeps it only
when the block's calibration error after that refit is lower with it.

Every family reads and writes its queries and keys through the slots of its attention layout
(:class:`QKAccess` over :class:`~jas_prune.models.heads.AttentionLayout`, the one attention pruning
uses); attention with rotary embeddings (Eva) or query/key norms is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..errors import PruneSettingError, UnsupportedModelError
from ..models.heads import AttentionLayout
from .choices import LOGIT_COMPENSATIONS

__all__ = ["LOGIT_COMPENSATIONS", "QKAccess", "qk_access", "HeadMap", "match_heads",
           "QueryDelta", "fit_query_delta", "LogitCompensation"]

# ------------------------------------------------------------------------------- per family
@dataclass(frozen=True)
class QKAccess:
    """A family's queries and keys per head, read and written through the slots of its
    :class:`~jas_prune.models.heads.AttentionLayout` (the layout attention pruning uses: a fused
    ``qkv`` with its bias or ``q_bias``, or separate ``q/k/v_proj``), and its logit scale."""

    layout: AttentionLayout

    def _rows(self, attn: nn.Module, role: str) -> tuple[Tensor | None, Tensor | None]:
        """Views ``[H, d, D]`` and ``[H, d]`` of the weight and bias rows of ``role`` (q or k)."""
        H = int(getattr(attn, self.layout.heads_attr))
        out: dict[int, Tensor] = {}
        for slot in self.layout.channels(attn):
            t = slot.tensor
            if role not in slot.roles or slot.dim != 0 or t.ndim not in (1, 2):
                continue
            n = t.shape[0] // len(slot.roles)
            c = slot.roles.index(role)
            out[t.ndim] = t[c * n:(c + 1) * n].view(H, n // H, *t.shape[1:])
        return out.get(2), out.get(1)

    def query(self, attn: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Query weight ``[H, d, D]`` and bias ``[H, d]`` (None without one)."""
        w, b = self._rows(attn, "q")
        return w.detach(), (b.detach() if b is not None else None)

    def key(self, attn: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Key weight ``[H, d, D]`` and bias ``[H, d]`` (None without one)."""
        w, b = self._rows(attn, "k")
        return w.detach(), (b.detach() if b is not None else None)

    def add_query(self, attn: nn.Module, dw: Tensor, db: Tensor) -> None:
        """Add ``dw [H, d, D]`` and ``db [H, d]`` to the query weight and bias, in place."""
        w, b = self._rows(attn, "q")
        with torch.no_grad():
            w += dw.to(w)
            if b is not None:
                b += db.to(b)
            elif bool(db.any()):
                raise PruneSettingError("prune.attention.logits: the queries have no bias to take the correction")

    def parameters(self, attn: nn.Module) -> list[Tensor]:
        """The tensors :meth:`add_query` changes (to restore them exactly)."""
        return [slot.tensor for slot in self.layout.channels(attn) if "q" in slot.roles]

    def scale(self, attn: nn.Module) -> float:
        """The factor of ``q · k`` in the logits."""
        return float(getattr(attn, self.layout.scale_attr))


def qk_access(model: nn.Module) -> QKAccess:
    """The query/key access of ``model``'s family, after checking every block's logits are
    ``scale · q · k`` of linear queries and keys.

    Raises:
        UnsupportedModelError: a family without attention pruning, rotary embeddings (they
            rotate the kept channels pairwise; the correction would not commute) or query/key
            norms (named, one line).
    """
    from .attention import layout_of

    try:
        vit, heads, layout = layout_of(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"prune.attention.logits: {str(exc).removeprefix('prune.attention: ')}") from None
    for h in heads:
        where = f"prune.attention.logits: block {h.index}"
        if layout.rope(vit, h.attn) is not None:
            raise UnsupportedModelError(f"{where} rotates queries and keys (RoPE); the logits are not bilinear in "
                                        "the kept channels — use logits: none")
        if any(not isinstance(getattr(h.attn, n, None) or nn.Identity(), nn.Identity) for n in ("q_norm", "k_norm")):
            raise UnsupportedModelError(f"{where} normalises queries and keys (qk_norm); the logits are not linear "
                                        "in the kept channels — use logits: none")
        access = QKAccess(layout)
        if access._rows(h.attn, "q")[0] is None or access._rows(h.attn, "k")[0] is None:
            raise UnsupportedModelError(f"{where}: no query/key weights in the family's attention layout")
    return QKAccess(layout)


# ------------------------------------------------------------------------------- channel map
@dataclass(frozen=True)
class HeadMap:
    """Pruned head ``i`` is dense head ``heads[i]``; its key/query channel ``t`` is the dense
    head's channel ``kept[i][t]``; ``pruned[i]`` are the dense channels it lost."""

    heads: list[int]
    kept: list[list[int]]
    pruned: list[list[int]]


def match_heads(access: QKAccess, attn: nn.Module, dense: nn.Module, block: int) -> HeadMap:
    """Find each pruned key channel among the dense ones (pruning copies the key rows unchanged),
    so the compensation needs no record of what was kept — it works on Torch-Pruning's output too.

    Raises:
        PruneSettingError: a pruned head whose key rows are not rows of one dense head.
    """
    wk, bk = access.key(attn)
    wd, bd = access.key(dense)
    rows = torch.cat([wk, bk[..., None]], -1) if bk is not None else wk  # [H', d', D(+1)]
    drows = torch.cat([wd, bd[..., None]], -1) if bd is not None else wd  # [H, d, D(+1)]
    H, d = drows.shape[:2]
    flat = drows.reshape(H * d, -1).double()
    heads, kept = [], []
    for i in range(rows.shape[0]):
        dist = torch.cdist(rows[i].double(), flat)  # [d', H·d]
        tol = 1e-6 * (1.0 + flat.norm(dim=1).max())
        found = None
        for g in range(H):
            if g in heads:
                continue
            best = dist[:, g * d:(g + 1) * d].min(1)
            if bool((best.values <= tol).all()) and len(set(best.indices.tolist())) == rows.shape[1]:
                found = (g, best.indices.tolist())
                break
        if found is None:
            raise PruneSettingError(f"prune.attention.logits: block {block}: the key weights of pruned head {i} "
                                    "are not rows of one dense head; the logits cannot be compensated")
        heads.append(found[0])
        kept.append(found[1])
    return HeadMap(heads, kept, [[j for j in range(d) if j not in set(k)] for k in kept])


# ------------------------------------------------------------------------------- the fit
@dataclass
class QueryDelta:
    """The correction of the kept query weights (``[H', d', D]``, ``[H', d']``) and what the key
    regression achieved: ``residual`` and ``energy`` are the mean squared error of predicting the
    pruned key channels with the regression and with their (per-candidate) mean alone."""

    access: QKAccess
    weight: Tensor
    bias: Tensor
    residual: float
    energy: float
    tokens: int

    def apply(self, attn: nn.Module) -> None:
        """Fold the correction into ``attn``'s query weights (in place)."""
        self.access.add_query(attn, self.weight, self.bias)

    @contextmanager
    def applied(self, attn: nn.Module) -> Iterator[None]:
        """``attn`` with the correction for the duration of the block, then exactly as before."""
        saved = [(t, t.detach().clone()) for t in self.access.parameters(attn)]
        self.apply(attn)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, before in saved:
                    t.copy_(before)


def _keys(w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    """Keys of one head ``[..., T, d]`` from the attention input ``x [..., T, D]`` (float64)."""
    k = x.double() @ w.double().T
    return k + b.double() if b is not None else k


def fit_query_delta(access: QKAccess, attn: nn.Module, dense: nn.Module, inputs: Iterable[Tensor], *,
                    candidate: str, damping: float, block: int = 0) -> QueryDelta | None:
    """The query correction of one block from its attention inputs ``[B, T, D]`` (the pruned
    network's, as the projection refit sees them); None when no kept head lost a channel.

    Raises:
        PruneSettingError: an unknown candidate (named), or key rows not found in the dense model.
    """
    from .linfit import LinearFit

    if candidate not in LOGIT_COMPENSATIONS[1:]:
        raise PruneSettingError(f"prune.attention.logits: {candidate!r} is not one of {', '.join(LOGIT_COMPENSATIONS)}")
    hm = match_heads(access, attn, dense, block)
    todo = [i for i, p in enumerate(hm.pruned) if p]
    wq, _ = access.query(attn)
    if not todo:
        return None
    wkd, bkd = access.key(dense)
    fits = {i: LinearFit(len(hm.kept[i]), len(hm.pruned[i])) for i in todo}
    for x in inputs:
        x = x.detach()
        for i in todo:
            g = hm.heads[i]
            k = _keys(wkd[g], bkd[g] if bkd is not None else None, x)  # [B, T, d]
            if candidate == "centered":
                k = k - k.mean(-2, keepdim=True)
            fits[i].add(k[..., hm.kept[i]], k[..., hm.pruned[i]])
    wqd, bqd = access.query(dense)
    ratio = access.scale(dense) / access.scale(attn)
    dw = torch.zeros(wq.shape, dtype=torch.float64)
    db = torch.zeros(wq.shape[:2], dtype=torch.float64)
    residual = energy = 0.0
    for i in todo:
        g, P = hm.heads[i], hm.pruned[i]
        B, b, _ = fits[i].solve(damping)  # B [|P|, d'] ; k_P ≈ B k_S + b
        residual += fits[i].error(B, b)
        mu = fits[i].sum_y / fits[i].count
        energy += fits[i].energy() - float(mu @ mu)
        dw[i] = ratio * (B.T @ wqd[g, P].double())
        if bqd is not None:
            db[i] = ratio * (B.T @ bqd[g, P].double())
    return QueryDelta(access, dw, db, residual, energy, next(iter(fits.values())).count)


@dataclass
class LogitCompensation:
    """One block of :class:`~jas_prune.pruning.reconstruct.ReconstructionReport` ``.logits``:
    the block's calibration error after the attention projection refit, without and with the
    compensation; ``kept`` when it was lower with it. ``key_residual``/``key_energy``: the key
    regression's mean squared error and the pruned key channels' variance (summed over heads)."""

    block: int
    candidate: str
    error_without: float
    error_with: float
    kept: bool
    key_residual: float
    key_energy: float
    tokens: int
    seconds: float
