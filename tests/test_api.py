"""The fixed public names of SPEC §5."""

import importlib

import torch_pruning as tp


def test_public_names():
    import jas_prune

    for name in ("load_model", "locate", "JASImportance", "load_pruned"):
        assert callable(getattr(jas_prune, name)), name
    assert issubclass(jas_prune.JASImportance, tp.importance.Importance)


def test_locate_stays_the_function_after_the_engine_is_imported():
    import jas_prune

    importlib.import_module("jas_prune.attribution")
    from jas_prune.attribution import LocateResult  # noqa: F401

    assert callable(jas_prune.locate) and jas_prune.locate.__name__ == "locate"
    assert jas_prune.locate is jas_prune.attribution.locate
