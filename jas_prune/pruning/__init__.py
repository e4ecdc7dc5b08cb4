"""Pruning: per-neuron criteria -> score maps -> Torch-Pruning -> smaller FFNs.

``criteria/``  the criterion registry (``CRITERIA``), one module per criterion
``scoremap``   score maps: checks, per-layer normalisation, protection, ranking
``stats``      probe batches and the shared FFN activation pass
``graph``      Torch-Pruning's dependency graph and the FFN ``fc1``/``fc2`` groups
``plugin``     ``JASImportance``: a score map as a Torch-Pruning importance
``prune``      ``prune_ffn``: remove the neurons for real (budget, protection, bias
               compensation, head cut, ``round_to``)
``budget``     ``find_ratio``: the smallest ratio meeting a MACs / params / ONNX latency budget
``reconstruct`` refit each pruned block's ``fc2`` on calibration tokens (ridge least squares)
``choices``    the reconstruction names (importable without torch)
``calibration`` calibration images, cached batches, random class subsets
``redundancy`` reconstruction-aware scores: discount neurons the others can linearly reconstruct
``finetune``   the optional short fine-tune, identical for every criterion

Names are imported on first use, so that importing the package (or the criterion registry, which
the CLI reads for its help and recipe checks) costs neither Torch-Pruning nor timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

#: public name -> submodule that defines it
_EXPORTS = {
    "CRITERIA": "criteria",
    "Criterion": "criteria",
    "CriterionScores": "criteria",
    "MasksRef": "criteria",
    "ScoringInputs": "criteria",
    "criterion_scores": "criteria",
    "ScoreMap": "scoremap",
    "NORMALIZERS": "scoremap",
    "check_score_map": "scoremap",
    "normalize_layer_scores": "scoremap",
    "ranking_scores": "scoremap",
    "ActivationStats": "stats",
    "ffn_activation_stats": "stats",
    "dependency_graph": "graph",
    "example_inputs_for": "graph",
    "JASImportance": "plugin",
    "MODES": "prune",
    "PruneSummary": "prune",
    "prune_ffn": "prune",
    "cut_head": "prune",
    "remap_labels": "prune",
    "count_params": "prune",
    "discover_widths": "prune",
    "RECONSTRUCTIONS": "choices",
    "TARGETS": "choices",
    "ReconstructionReport": "reconstruct",
    "SequentialReconstructor": "reconstruct",
    "LinearFit": "reconstruct",
    "draw_class_subsets": "calibration",
    "round_kept": "prune",
    "uniform_widths": "prune",
    "check_round_to": "prune",
    "Budget": "budget",
    "find_ratio": "budget",
    "hidden_covariance": "redundancy",
    "redundancy_scores": "redundancy",
}
# ``finetune`` and ``reconstruct`` are not exported here: the names are also the submodules', and
# importing a submodule would rebind them (use ``jas_prune.reconstruct`` or
# ``from jas_prune.pruning.reconstruct import reconstruct``).

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .criteria import CRITERIA, Criterion, CriterionScores, MasksRef, ScoringInputs, criterion_scores
    from .graph import dependency_graph, example_inputs_for
    from .plugin import JASImportance
    from .prune import MODES, PruneSummary, count_params, cut_head, discover_widths, prune_ffn, remap_labels
    from .scoremap import NORMALIZERS, ScoreMap, check_score_map, normalize_layer_scores, ranking_scores
    from .budget import Budget, find_ratio
    from .calibration import draw_class_subsets
    from .prune import check_round_to, round_kept, uniform_widths
    from .choices import RECONSTRUCTIONS, TARGETS
    from .reconstruct import LinearFit, ReconstructionReport, SequentialReconstructor
    from .redundancy import hidden_covariance, redundancy_scores
    from .stats import ActivationStats, ffn_activation_stats


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
