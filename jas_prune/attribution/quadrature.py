"""Quadrature rules on ``[0, 1]`` for the JAS integral over the scaling factor α."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..errors import AttributionSettingError

__all__ = ["QUADRATURES", "quadrature_rule"]

#: the rules :func:`quadrature_rule` knows (the recipe's ``attribution.quadrature`` values)
QUADRATURES = ("left", "right", "trapezoid", "gauss")


def quadrature_rule(name: str, steps: int, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes ``α_k`` and weights ``w_k`` (summing to 1) of a quadrature on ``[0, 1]``.

    Args:
        name: ``left`` | ``right`` | ``trapezoid`` | ``gauss``.
        steps: number of nodes ``m`` (``trapezoid`` needs ``m ≥ 2``).
    """
    if name not in QUADRATURES:
        raise AttributionSettingError(f"attribution.quadrature: must be one of {', '.join(QUADRATURES)}, got {name!r}")
    least = 2 if name == "trapezoid" else 1
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < least:
        raise AttributionSettingError(f"attribution.steps: must be an integer ≥ {least}, got {steps!r}")
    m = steps
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
