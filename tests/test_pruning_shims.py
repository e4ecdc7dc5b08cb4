"""The old modules jas_prune.importance and jas_prune.prune still offer every old name, and
each is the object that now lives in jas_prune.pruning (one definition, not a copy)."""

from __future__ import annotations

import importlib

import pytest

OLD = {
    "jas_prune.importance": {
        "JASImportance": "jas_prune.pruning.plugin",
        "ScoreMap": "jas_prune.pruning.scoremap",
        "NORMALIZERS": "jas_prune.pruning.scoremap",
        "normalize_layer_scores": "jas_prune.pruning.scoremap",
        "ranking_scores": "jas_prune.pruning.scoremap",
        "check_score_map": "jas_prune.pruning.scoremap",
        "ActivationStats": "jas_prune.pruning.stats",
        "ffn_activation_stats": "jas_prune.pruning.stats",
        "dependency_graph": "jas_prune.pruning.graph",
        "example_inputs_for": "jas_prune.pruning.graph",
        "criterion_scores": "jas_prune.pruning.criteria",
        "activation_scores": "jas_prune.pruning.criteria.activation",
        "variance_scores": "jas_prune.pruning.criteria.activation",
        "magnitude_scores": "jas_prune.pruning.criteria.magnitude",
        "taylor_scores": "jas_prune.pruning.criteria.taylor",
        "random_scores": "jas_prune.pruning.criteria.random",
        "vit_slim_scores": "jas_prune.pruning.criteria.vit_slim",
    },
    "jas_prune.prune": {
        "MODES": "jas_prune.pruning.prune",
        "PruneSummary": "jas_prune.pruning.prune",
        "prune_ffn": "jas_prune.pruning.prune",
        "cut_head": "jas_prune.pruning.prune",
        "resolve_head_classes": "jas_prune.pruning.prune",
        "remap_labels": "jas_prune.pruning.prune",
        "count_params": "jas_prune.pruning.prune",
        "discover_widths": "jas_prune.pruning.prune",
        "finetune": "jas_prune.pruning.finetune",
        "BudgetError": "jas_prune.errors",
        "PruneSettingError": "jas_prune.errors",
    },
}


@pytest.mark.parametrize("old", sorted(OLD))
def test_old_names_are_the_new_objects(old):
    module = importlib.import_module(old)
    for name, home in OLD[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name), f"{old}.{name}"
    assert set(module.__all__) >= set(OLD[old]) - {"discover_widths"}


def test_old_criteria_tuple_and_package_exports():
    import jas_prune
    from jas_prune import importance, pruning
    from jas_prune.errors import JasPruneError
    from jas_prune.pruning.criteria import CRITERIA

    assert importance.CRITERIA == CRITERIA.names()
    assert importance.CRITERIA[:7] == ("jas", "vit_slim", "magnitude", "taylor", "activation", "variance", "random")
    for name in pruning.__all__:
        assert getattr(pruning, name) is not None, name
    assert jas_prune.JASImportance is pruning.JASImportance and jas_prune.prune_ffn is pruning.prune_ffn
    assert issubclass(importance.JASImportance, object) and issubclass(pruning.prune.PruneSettingError, JasPruneError)
