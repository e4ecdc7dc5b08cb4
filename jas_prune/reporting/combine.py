"""One report over runs of the same recipe that differ only in ``runtime.seed``: mean ± sample
std of the pruning table, the trade-off plot and the CLS-mask protocol."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import OutputDirError, RecipeError, one_line
from ..io import atomic_write_text, make_dir
from ..metrics import Metrics, SemanticCheck, read_metrics
from ..lock import RunDirLock
from ..recipe import Recipe, load_recipe
from ..rundir import RunDir
from .figset import FigureList, cls_mask_figures, pruning_figures
from .format import mean_std
from .rundata import class_names_of, load_masks_or_none, semantic_of
from .stats import as_metrics, paired_differences, prune_stats
from .summary import summary_section
from .tables import cls_mask_section, figures_section, paired_section, pruned_section, semantic_section

__all__ = ["combine_reports", "render_combined", "COMBINE_FREE_KEYS"]

log = logging.getLogger("jas_prune")

#: The only recipe key that may differ between combined runs.
COMBINE_FREE_KEYS = ("runtime.seed",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _check_same_recipe(run_dirs: Sequence[Path], recipes: Sequence[Recipe], runs: Sequence[Metrics]) -> None:
    """Refuse runs whose resolved recipes (or model weights) differ beyond ``runtime.seed``."""
    flat = [_flatten(r.model_dump(mode="json", by_alias=True)) for r in recipes]
    ref = flat[0]
    for d, other, m in zip(run_dirs[1:], flat[1:], runs[1:]):
        for key in sorted(set(ref) | set(other)):
            if key not in COMBINE_FREE_KEYS and ref.get(key, "<missing>") != other.get(key, "<missing>"):
                raise RecipeError(f"--combine: {d} differs from {run_dirs[0]} in {key} "
                                  f"({ref.get(key, '<missing>')!r} vs {other.get(key, '<missing>')!r}); "
                                  f"only {', '.join(COMBINE_FREE_KEYS)} may differ between combined runs")
        a = runs[0].fingerprint.model if runs[0].fingerprint is not None else None
        b = m.fingerprint.model if m.fingerprint is not None else None
        if a and b and a != b:
            raise RecipeError(f"--combine: {d} differs from {run_dirs[0]} in the model weights "
                              f"(fingerprint.model {b[:12]}… vs {a[:12]}…)")


def _mean_semantic(semantics: Sequence[SemanticCheck]) -> tuple[SemanticCheck | None, dict[str, float | None]]:
    """The semantic check averaged over runs, and the std of each figure."""
    from ..semantic import GROUPS

    if not semantics:
        return None, {}
    sds: dict[str, float | None] = {}
    mean: dict[str, float | None] = {}
    for k, _ in GROUPS:
        mean[k], sds[k] = mean_std([s.mean.get(k) for s in semantics])
    aucs = {}
    for k in ("auc", "auc_shape", "auc_colour"):
        aucs[k], sds[k] = mean_std([getattr(s, k) for s in semantics])
    return SemanticCheck(mean=mean, pairs=semantics[0].pairs, **aucs), sds


def render_combined(run_dirs: Sequence[Path], runs: Sequence[Metrics | Any], recipe_text: str,
                    figures: Sequence[tuple[str, str]] = (), *, seeds: Sequence[Any] = (),
                    class_names: Sequence[str] | None = None, semantics: Sequence[SemanticCheck] = ()) -> str:
    """Markdown of the combined report (mean ± sample std over runs)."""
    runs = [as_metrics(m) for m in runs]
    seeds = list(seeds) or ["?"] * len(runs)
    lines = [f"# jas-prune combined report ({len(runs)} runs)", "",
             "Runs (same recipe, different `runtime.seed`): "
             + ", ".join(f"`{d}` (seed {s})" for d, s in zip(run_dirs, seeds)) + ".", ""]
    semantic, sem_sd = _mean_semantic(semantics)
    lines += summary_section(runs, class_names, semantic)
    lines += figures_section(figures)
    lines += pruned_section(prune_stats(runs), class_names, combined=True)
    lines += paired_section(paired_differences(runs), len(runs))
    lines += cls_mask_section(runs)
    lines += semantic_section(semantic, sem_sd)
    lines += ["## Settings", "", f"Shared by every run except `runtime.seed` ({', '.join(map(str, seeds))}); "
              "shown with the first run's seed.", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _parsed_recipe(run: RunDir) -> Recipe:
    try:
        return load_recipe(run.recipe)
    except RecipeError as exc:
        raise RecipeError(f"--combine: {run.recipe} cannot be parsed by this jas-prune ({one_line(exc)})") from None


def combine_reports(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                    runs: Sequence[Metrics] | None = None) -> Path:
    """Write ``OUT/report.md`` + ``OUT/figures/`` over runs that differ only in ``runtime.seed``.

    Args:
        runs: the runs' metrics when the caller holds them (default: each ``metrics.json``).

    Raises:
        OutputDirError: a directory that is not a run, the same run twice, or OUT being one of them.
        RunDirLockedError: another process holds OUT.
        RecipeError: recipes (or model weights) that differ in anything but ``runtime.seed``, naming
            the key, or a recipe this jas-prune cannot parse.
        MetricsSchemaError: a ``metrics.json`` of another schema version.
    """
    dirs = [Path(d) for d in run_dirs]
    rds = [RunDir(d) for d in dirs]
    target = RunDir(out)
    if len(dirs) < 2:
        raise OutputDirError("--combine: give at least two run directories")
    resolved = [d.resolve() for d in dirs]
    for d, r, rd in zip(dirs, resolved, rds):
        if resolved.count(r) > 1:
            raise OutputDirError(f"--combine: {d} is given twice")
        for f in (rd.metrics, rd.recipe):
            if not f.is_file():
                raise OutputDirError(f"--combine: {d} has no {f.name} (not a jas-prune run directory)")
    if target.root.resolve() in resolved:
        raise OutputDirError(f"--out {target.root}: is one of the combined runs; choose a separate directory")
    make_dir(target.root, f"--out {target.root}")
    with RunDirLock(target).acquire("report --combine"):  # one writer: refused at once if held
        return _combine(dirs, rds, target, runs)


def _combine(dirs: list[Path], rds: list[RunDir], target: RunDir, runs: Sequence[Metrics] | None) -> Path:
    """The combined report of runs already checked to be run directories, written into ``target``."""
    metrics = list(runs) if runs is not None else [read_metrics(rd.metrics) for rd in rds]
    recipes = [_parsed_recipe(rd) for rd in rds]
    _check_same_recipe(dirs, recipes, metrics)
    masks0 = load_masks_or_none(rds[0])
    names = class_names_of(metrics[0], masks0)
    semantics = []
    for rd, m in zip(rds, metrics):
        try:
            s, _ = semantic_of(m, load_masks_or_none(rd))
        except Exception as exc:  # noqa: BLE001
            log.warning("report: semantic check of %s skipped (%s)", rd.root, exc)
            s = None
        if s is not None:
            semantics.append(s)
    if len(semantics) != len(metrics):
        semantics = []
    figs = FigureList(target)
    pruning_figures(figs, metrics, names)
    cls_mask_figures(figs, metrics)
    text = render_combined(dirs, metrics, rds[0].recipe.read_text(encoding="utf-8"), figs.items,
                           seeds=[r.runtime.seed for r in recipes], class_names=names, semantics=semantics)
    return atomic_write_text(target.report, text)
