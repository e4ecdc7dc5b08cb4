"""The least-squares machinery every refit shares: a ridge solve that survives singular Gram
matrices, and :class:`LinearFit`, the streaming statistics of a linear map over calibration tokens
(the FFN and attention refits of :mod:`.reconstruct`, the OBS selection of
:mod:`.criteria.obs` and the logit compensation of :mod:`.logits` all read them)."""

from __future__ import annotations


import torch
from torch import Tensor

from jas_prune.errors import InvalidArgumentError

__all__ = ["ridge_solve", "LinearFit"]


def ridge_solve(a: Tensor, b: Tensor) -> tuple[Tensor, str]:
    """Solve ``a x = b`` for a symmetric positive semi-definite ``a`` (float64).

    Cholesky first; when it fails (``a`` singular or indefinite by rounding) or yields non-finite
    values, the eigen-decomposition pseudo-inverse (eigenvalues below ``n·eps·max`` dropped).
    Returns the solution and the solver used (``cholesky`` or ``eigh``).
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
        if bool(torch.isfinite(x).all()):
            return x, "cholesky"
    w, v = torch.linalg.eigh(a)
    cutoff = w.abs().max().clamp_min(torch.finfo(a.dtype).tiny) * a.shape[0] * torch.finfo(a.dtype).eps
    inv = torch.where(w > cutoff, 1.0 / w.clamp_min(cutoff), torch.zeros_like(w))
    return v @ (inv[:, None] * (v.T @ b)), "eigh"


class LinearFit:
    """Streaming sufficient statistics of a linear map ``y ≈ h Wᵀ + b`` over tokens.

    :meth:`add` takes any number of token rows at a time; everything is accumulated in float64, so
    the memory is O(n_in² + n_in·n_out) whatever the number of tokens, and the statistics of
    several batches equal those of their concatenation (up to float64 rounding).
    """

    def __init__(self, n_in: int, n_out: int, *, device: torch.device | str = "cpu") -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.count = 0
        self.sum_h = torch.zeros(self.n_in, **f64)
        self.sum_y = torch.zeros(self.n_out, **f64)
        self.sum_hh = torch.zeros(self.n_in, self.n_in, **f64)
        self.sum_hy = torch.zeros(self.n_in, self.n_out, **f64)
        self.sum_yy = torch.zeros((), **f64)

    def add(self, h: Tensor, y: Tensor) -> None:
        """Accumulate token rows: ``h [..., n_in]`` and ``y [..., n_out]`` with the same leading shape."""
        h2 = h.detach().reshape(-1, self.n_in).to(self.sum_hh.device, torch.float64)
        y2 = y.detach().reshape(-1, self.n_out).to(self.sum_hh.device, torch.float64)
        if h2.shape[0] != y2.shape[0]:
            raise InvalidArgumentError(f"y: {y2.shape[0]} token rows for {h2.shape[0]} rows of h")
        self.count += h2.shape[0]
        self.sum_h += h2.sum(0)
        self.sum_y += y2.sum(0)
        self.sum_hh += h2.T @ h2
        self.sum_hy += h2.T @ y2
        self.sum_yy += (y2 * y2).sum()

    def _check(self) -> None:
        if self.count == 0:
            raise InvalidArgumentError("loader: no calibration tokens were accumulated")

    def error(self, weight: Tensor, bias: Tensor | None) -> float:
        """Mean over tokens of ``‖h Wᵀ + b − y‖²`` (exact, from the statistics)."""
        self._check()
        n = self.count
        w = weight.detach().to(self.sum_hh.device, torch.float64)  # [n_out, n_in]
        quad = (w @ self.sum_hh * w).sum() - 2.0 * (w.T * self.sum_hy).sum()
        err = quad + self.sum_yy
        if bias is not None:
            b = bias.detach().to(self.sum_hh.device, torch.float64)
            err = err + 2.0 * (b * (w @ self.sum_h)).sum() - 2.0 * (b * self.sum_y).sum() + n * (b * b).sum()
        return max(float(err) / n, 0.0)

    def energy(self) -> float:
        """Mean over tokens of ``‖y‖²`` (the error of predicting zero)."""
        self._check()
        return float(self.sum_yy) / self.count

    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``E[h]``, ``E[y]``, ``Cov(h)``, ``Cov(h, y)`` (population, float64)."""
        self._check()
        n = self.count
        mu_h, mu_y = self.sum_h / n, self.sum_y / n
        c_hh = self.sum_hh / n - torch.outer(mu_h, mu_h)
        c_hy = self.sum_hy / n - torch.outer(mu_h, mu_y)
        return mu_h, mu_y, 0.5 * (c_hh + c_hh.T), c_hy

    def solve(self, damping: float, *, intercept: bool = True) -> tuple[Tensor, Tensor | None, str]:
        """Ridge least squares: ``(weight [n_out, n_in], bias [n_out] or None, solver)``.

        The ridge term is ``damping · mean(diag(A))`` on the diagonal of ``A`` (``Cov(h)`` with an
        intercept, the raw second moment without); the intercept itself is not damped.
        """
        if intercept:
            mu_h, mu_y, a, rhs = self.moments()
        else:
            self._check()
            a, rhs = self.sum_hh / self.count, self.sum_hy / self.count
        scale = float(a.diagonal().mean()) if a.numel() else 0.0
        ridge = damping * (scale if scale > 0 else 1.0)
        a = a + ridge * torch.eye(self.n_in, dtype=a.dtype, device=a.device)
        x, solver = ridge_solve(a, rhs)  # [n_in, n_out]
        weight = x.T.contiguous()
        bias = (mu_y - mu_h @ x) if intercept else None
        return weight, bias, solver

    def solve_bias(self, weight: Tensor) -> Tensor:
        """The error-minimising bias for a fixed ``weight``: ``E[y] − E[h] Wᵀ``."""
        self._check()
        w = weight.detach().to(self.sum_hh.device, torch.float64)
        return self.sum_y / self.count - w @ (self.sum_h / self.count)
