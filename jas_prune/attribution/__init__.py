"""Attribution: neuron paths of a ViT with the Joint Attribution Score and the paper's baselines.

- :mod:`.settings` — :class:`LocateSettings`, validated once, resolved against a model once;
- :mod:`.quadrature` — the α-quadratures;
- :mod:`.engine` — :class:`JointAttribution`, the batched hook-based passes;
- :mod:`.methods` — :data:`METHODS`, the registry of methods;
- :mod:`.builtin` — the registered methods (``jas``, ``activation``, ``influence_pattern``,
  ``knowledge``, ``joint_ig``);
- :mod:`.api` — :func:`locate` and :func:`path_jas`.
"""

from __future__ import annotations

from . import builtin  # noqa: F401  (registers the built-in methods)
from .api import locate, path_jas
from .engine import JointAttribution, LocateResult
from .methods import METHODS, AttributionMethod
from .quadrature import quadrature_rule
from .settings import (
    CANDIDATES,
    FORMULAS,
    QUADRATURES,
    SCOPES,
    UNITS,
    SETTING_NAMES,
    TARGETS,
    LocateSettings,
    ResolvedSettings,
)

__all__ = [
    "locate",
    "path_jas",
    "JointAttribution",
    "LocateResult",
    "METHODS",
    "AttributionMethod",
    "LocateSettings",
    "ResolvedSettings",
    "quadrature_rule",
    "SETTING_NAMES",
    "FORMULAS",
    "QUADRATURES",
    "CANDIDATES",
    "TARGETS",
    "SCOPES",
    "UNITS",
]
