"""``jas-prune atlas RUN_DIR``: the atlas of a finished run, from its ``recipe.yaml``, its
``paths/probe`` and the model the recipe names (checked against the run's weights digest).

Everything is checked before anything is written: a refused command leaves the run directory as
it was. On success ``atlas/`` is (re)written, ``metrics.json`` gets its ``atlas`` section and
``report.md`` is rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import FingerprintMismatchError, OutputDirError, StageNotAvailableError
from ..metrics import AtlasInfo
from ..rundir import RunDir
from ..atlas.select import parse_neurons
from ..atlas.settings import AtlasSettings

__all__ = ["atlas_command", "split_list"]


def split_list(values: Sequence[str]) -> list[str]:
    """``("a,b", "c")`` -> ``["a", "b", "c"]`` (repeated options and comma lists both work)."""
    return [v.strip() for value in values for v in str(value).split(",") if v.strip()]


def _open(run: RunDir):
    """The run's recipe and metrics, refusing a directory that is not a located run."""
    from ..errors import JasPruneError
    from ..metrics import read_metrics
    from ..recipe import load_recipe

    if not run.root.is_dir():
        raise OutputDirError(f"{run.root}: not a directory (give a jas-prune run directory)")
    if not run.recipe.is_file() or not run.metrics.is_file():
        raise OutputDirError(f"{run.root}: no recipe.yaml / metrics.json (not a jas-prune run directory)")
    try:
        recipe = load_recipe(run.recipe)
    except JasPruneError as exc:
        raise OutputDirError(f"{run.recipe}: cannot be read ({exc})") from None
    metrics = read_metrics(run.metrics)
    if recipe.attribution is None or metrics.locate is None or not run.paths_dir("probe").is_dir():
        raise StageNotAvailableError(f"{run.root}: holds no located probe paths (paths/probe; the recipe needs "
                                     "an attribution section)")
    return recipe, metrics


def atlas_command(run_dir: str | Path, *, classes: Sequence[str] = (), neurons: Sequence[str] = (),
                  images: int | None = None) -> AtlasInfo:
    """Build the atlas of ``run_dir`` and record it (see the module docstring).

    Raises:
        OutputDirError: not a run directory. StageNotAvailableError: no located paths.
        InvalidArgumentError / ClassSelectionError: a bad ``--neurons`` / ``--classes`` entry.
        FingerprintMismatchError: the model the recipe names is not the one the run located.
    """
    import torch

    from ..classes import resolve_classes
    from ..data import source_for
    from ..io import atomic_write_json
    from ..lock import RunDirLock
    from ..models import discover_ffn, load_model
    from ..pathstore import weights_digest
    from ..atlas.build import build_atlas

    run = RunDir(run_dir)
    recipe, metrics = _open(run)
    settings = recipe.report.atlas or AtlasSettings()
    changes = {"images": images} if images is not None else {}
    if neurons and not classes:  # --neurons alone: only those neurons, not the recipe's classes
        changes["classes"] = None
    if changes:
        settings = AtlasSettings.model_validate({**settings.model_dump(), **changes})
    with RunDirLock(run).acquire("atlas"):
        m, seed = recipe.model, recipe.runtime.seed
        source = source_for(recipe.data, seed)
        if classes:
            resolve_classes(classes, source.class_names, key="--classes")  # refused before the model loads
        torch.manual_seed(seed)  # a random-init model is the run's only under the run's seed
        model = load_model(m.name, checkpoint=m.checkpoint, pretrained=m.pretrained, num_classes=m.num_classes)
        cuda = recipe.runtime.device != "cpu" and torch.cuda.is_available()
        model = model.to(device="cuda" if cuda else "cpu", dtype=getattr(torch, recipe.runtime.dtype)).eval()
        want = metrics.fingerprint.model if metrics.fingerprint is not None else None
        if want is not None and weights_digest(model) != want:
            raise FingerprintMismatchError(f"{run.root}: the model '{m.name}' loaded now is not the one the run "
                                           f"located (weights digest differs from metrics.json fingerprint.model)")
        layers = metrics.locate.layers
        layers = list(range(discover_ffn(model).depth)) if layers is None else (
            list(range(layers)) if isinstance(layers, int) else list(layers))
        chosen = parse_neurons(split_list(neurons), layers, discover_ffn(model).widths)
        metrics.atlas = build_atlas(run, model, source, method=recipe.attribution.methods[0],
                                    scope=recipe.attribution.scope, settings=settings, classes=classes,
                                    neurons=chosen, batch_size=recipe.data.batch_size, seed=seed,
                                    class_key="--classes")
        atomic_write_json(run.metrics, metrics.to_dict())
        from .single import write_report

        write_report(run.root)
    return metrics.atlas
