"""Old home of the pruning criteria and the JAS plugin; everything now lives in
:mod:`jas_prune.pruning`. This module re-exports the old names so existing imports keep working.

| old name | now in |
|---|---|
| ``JASImportance`` | ``jas_prune.pruning.plugin`` |
| ``ScoreMap``, ``NORMALIZERS``, ``normalize_layer_scores``, ``ranking_scores``, ``check_score_map`` | ``jas_prune.pruning.scoremap`` |
| ``ActivationStats``, ``ffn_activation_stats`` | ``jas_prune.pruning.stats`` |
| ``dependency_graph``, ``example_inputs_for`` | ``jas_prune.pruning.graph`` |
| ``criterion_scores`` | ``jas_prune.pruning.criteria`` |
| ``CRITERIA`` (a tuple of names here) | ``jas_prune.pruning.criteria.CRITERIA`` (the registry; ``.names()``) |
| ``activation_scores``, ``variance_scores`` | ``jas_prune.pruning.criteria.activation`` |
| ``magnitude_scores`` / ``taylor_scores`` / ``random_scores`` / ``vit_slim_scores`` | ``jas_prune.pruning.criteria.<name>`` |
"""

from __future__ import annotations

from .pruning.criteria import CRITERIA as _REGISTRY
from .pruning.criteria import criterion_scores
from .pruning.criteria.activation import activation_scores, variance_scores
from .pruning.criteria.magnitude import magnitude_scores
from .pruning.criteria.random import random_scores
from .pruning.criteria.taylor import taylor_scores
from .pruning.criteria.vit_slim import vit_slim_scores
from .pruning.graph import dependency_graph, example_inputs_for
from .pruning.plugin import JASImportance
from .pruning.scoremap import NORMALIZERS, ScoreMap, check_score_map, normalize_layer_scores, ranking_scores
from .pruning.stats import ActivationStats, ffn_activation_stats

__all__ = [
    "ScoreMap",
    "NORMALIZERS",
    "CRITERIA",
    "JASImportance",
    "ActivationStats",
    "ffn_activation_stats",
    "activation_scores",
    "variance_scores",
    "random_scores",
    "magnitude_scores",
    "taylor_scores",
    "vit_slim_scores",
    "criterion_scores",
    "normalize_layer_scores",
    "ranking_scores",
    "check_score_map",
    "dependency_graph",
    "example_inputs_for",
]

#: every registered criterion's name, in registry order (the old tuple)
CRITERIA = _REGISTRY.names()
