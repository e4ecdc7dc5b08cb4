"""Pruning statistics of one run, or mean ± std over runs of one recipe, the best method per
budget, and the paired per-run difference "JAS − best baseline".

Entries of ``prune.class_subsets`` (random class subsets, other ones in every run) are pooled: per
run, the mean over that run's subsets of the same size; then mean ± std over runs, like any other
setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..metrics import Metrics, PrunedEntry
from .format import mean_std

__all__ = ["PruneStat", "PairedDifference", "prune_stats", "best_per_budget", "paired_differences", "as_metrics",
           "RECONSTRUCTION_ORDER"]

#: how reconstructions are ordered in tables and figures (cheapest first)
RECONSTRUCTION_ORDER = ("none", "bias", "lsq")


def as_metrics(metrics: Metrics | Mapping[str, Any]) -> Metrics:
    """Typed metrics (a mapping is read as the current schema: MetricsSchemaError otherwise)."""
    return metrics if isinstance(metrics, Metrics) else Metrics.from_dict(metrics)


def _recon_rank(name: str) -> int:
    return RECONSTRUCTION_ORDER.index(name) if name in RECONSTRUCTION_ORDER else len(RECONSTRUCTION_ORDER)


@dataclass
class PruneStat:
    """One pruning setting, over one or more runs (``*_std`` is None for a single run).

    ``classes`` is the class subset of ``prune.classes`` (None: every class); pooled random
    subsets (``prune.class_subsets``) have ``classes`` None and ``subset_size`` set, their figures
    being per run the mean over ``subsets`` subsets.
    """

    method: str
    ratio: float
    bias_compensation: bool
    classes: tuple[int, ...] | None
    top1: float
    top5: float | None
    params: float | None
    macs: float | None
    dense_top1: float | None
    removed: float
    checkpoint: str | None = None
    top1_std: float | None = None
    top5_std: float | None = None
    kept: float | None = None
    kept_std: float | None = None
    dense_top1_std: float | None = None
    runs: int = 1
    reconstruction: str = "none"
    #: whether the entries name their reconstruction (older runs knew only bias compensation)
    recorded_reconstruction: bool = False
    subset_size: int | None = None
    subsets: int | None = None
    test_images: float | None = None
    importance_seconds: float | None = None
    reconstruction_seconds: float | None = None
    calibration_images: float | None = None
    top1_runs: list[float] = field(default_factory=list)

    @property
    def general(self) -> bool:
        """Every class (neither ``prune.classes`` nor pooled subsets)."""
        return self.classes is None and self.subset_size is None

    @property
    def selection(self) -> tuple:
        """What the setting was pruned for: ``("all",)``, ``("classes", ...)`` or ``("subsets", size)``."""
        if self.subset_size is not None:
            return ("subsets", self.subset_size)
        return ("all",) if self.classes is None else ("classes", *self.classes)

    @property
    def cost_seconds(self) -> float | None:
        """Importance + reconstruction seconds (None when the importance cost is unknown)."""
        if self.importance_seconds is None:
            return None
        return self.importance_seconds + (self.reconstruction_seconds or 0.0)


def _selection(e: PrunedEntry) -> tuple:
    if e.class_subset is not None:
        return ("subsets", len(e.classes or []))
    return ("all",) if e.classes is None else ("classes", *(int(c) for c in e.classes))


def _per_run(metrics: Metrics) -> dict[tuple, dict[str, Any]]:
    """(selection, ratio, reconstruction, method) -> this run's figures (subsets averaged)."""
    dense = metrics.dense.top1 if metrics.dense is not None else None
    groups: dict[tuple, list[PrunedEntry]] = {}
    for e in metrics.pruned or []:
        groups.setdefault((_selection(e), float(e.ratio), e.reconstruction_name, e.method), []).append(e)
    out = {}
    for key, es in groups.items():
        if key[0][0] != "subsets":
            es = es[-1:]  # one entry per setting (the last written)

        def m(get) -> float | None:
            return mean_std([get(e) for e in es])[0]

        out[key] = {
            "top1": m(lambda e: e.top1), "top5": m(lambda e: e.top5), "params": m(lambda e: e.params),
            "macs": m(lambda e: e.macs), "dense": m(lambda e: e.dense_top1 or dense),
            "kept": m(lambda e: e.top1 / (e.dense_top1 or dense) if (e.dense_top1 or dense) else None),
            "removed": m(lambda e: e.removed_fraction if e.removed_fraction is not None else e.ratio),
            "test_images": m(lambda e: e.test_images), "importance_seconds": m(lambda e: e.importance_seconds),
            "reconstruction_seconds": m(lambda e: e.reconstruction_seconds),
            "calibration_images": m(lambda e: e.calibration_images),
            "checkpoint": es[0].checkpoint, "classes": None if key[0][0] == "subsets" else es[0].classes,
            "subsets": len(es) if key[0][0] == "subsets" else None,
            "recorded": any(e.reconstruction is not None for e in es)}
    return out


def prune_stats(runs: Sequence[Metrics | Mapping[str, Any]]) -> list[PruneStat]:
    """The ``pruned`` entries of one or more runs grouped by (selection, ratio, reconstruction, method).

    Top-1, top-5, params, MACs and "kept" (top-1 / dense top-1 of the same images) are averaged
    over the runs that have the setting; std is the sample std over runs.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for metrics in map(as_metrics, runs):
        for key, rec in _per_run(metrics).items():
            groups.setdefault(key, []).append(rec)
    out = []
    for (sel, ratio, recon, method), rs in groups.items():
        def ms(k: str) -> tuple[float | None, float | None]:
            return mean_std([r[k] for r in rs])

        top1, top1_sd = ms("top1")
        top5, top5_sd = ms("top5")
        dense, dense_sd = ms("dense")
        kept, kept_sd = ms("kept")
        removed, _ = ms("removed")
        classes = rs[0]["classes"]
        out.append(PruneStat(
            method=method, ratio=ratio, bias_compensation=recon == "bias",
            classes=None if classes is None else tuple(int(c) for c in classes), top1=top1 or 0.0, top5=top5,
            params=ms("params")[0], macs=ms("macs")[0], dense_top1=dense,
            removed=removed if removed is not None else ratio, checkpoint=rs[0]["checkpoint"], top1_std=top1_sd,
            top5_std=top5_sd, kept=kept, kept_std=kept_sd, dense_top1_std=dense_sd, runs=len(rs),
            reconstruction=recon, recorded_reconstruction=any(r["recorded"] for r in rs),
            subset_size=sel[1] if sel[0] == "subsets" else None,
            subsets=rs[0]["subsets"], test_images=ms("test_images")[0],
            importance_seconds=ms("importance_seconds")[0], reconstruction_seconds=ms("reconstruction_seconds")[0],
            calibration_images=ms("calibration_images")[0], top1_runs=[r["top1"] for r in rs]))
    out.sort(key=lambda s: (not s.general, s.subset_size or 0, s.classes or (), s.ratio,
                            _recon_rank(s.reconstruction), -s.top1, s.method))
    return out


def best_per_budget(stats: Sequence[PruneStat]) -> list[PruneStat]:
    """The best setting (highest top-1; ties: higher top-5, then method name, then the cheaper
    reconstruction) per (selection, ratio)."""
    best: dict[tuple, PruneStat] = {}

    def rank(s: PruneStat) -> tuple:
        return (-s.top1, -(s.top5 or 0.0), s.method, _recon_rank(s.reconstruction))

    for s in stats:
        key = (s.selection, s.ratio)
        cur = best.get(key)
        if cur is None or rank(s) < rank(cur):
            best[key] = s
    return sorted(best.values(), key=lambda s: (not s.general, s.subset_size or 0, s.classes or (), s.ratio))


@dataclass
class PairedDifference:
    """Per run, top-1 of ``method`` minus the best other criterion's top-1 at one setting."""

    selection: tuple
    ratio: float
    reconstruction: str
    method: str
    #: one per run: (difference, best other criterion in that run)
    per_run: list[tuple[float, str]]

    @property
    def mean(self) -> float:
        return mean_std([d for d, _ in self.per_run])[0] or 0.0

    @property
    def std(self) -> float | None:
        return mean_std([d for d, _ in self.per_run])[1]

    @property
    def low(self) -> float:
        return min(d for d, _ in self.per_run)

    @property
    def high(self) -> float:
        return max(d for d, _ in self.per_run)

    @property
    def wins(self) -> int:
        """Runs where ``method`` is at least as good as every other criterion."""
        return sum(d >= 0 for d, _ in self.per_run)


def paired_differences(runs: Sequence[Metrics | Mapping[str, Any]], method: str = "jas") -> list[PairedDifference]:
    """For every (selection, ratio, reconstruction) that ``method`` and at least one other criterion
    have in every run: per run, ``method``'s top-1 minus the best other criterion's (pooled
    subsets: each run's mean over its subsets)."""
    per_run = [_per_run(m) for m in map(as_metrics, runs)]
    settings = sorted({k[:3] for pr in per_run for k in pr if k[3] == method},
                      key=lambda k: (k[0] != ("all",), k[0], k[1], _recon_rank(k[2])))
    out = []
    for sel, ratio, recon in settings:
        rows = []
        for pr in per_run:
            mine = pr.get((sel, ratio, recon, method))
            others = {k[3]: v["top1"] for k, v in pr.items() if k[:3] == (sel, ratio, recon) and k[3] != method}
            if mine is None or not others:
                break
            best = max(sorted(others), key=lambda m: others[m])
            rows.append((mine["top1"] - others[best], best))
        else:
            out.append(PairedDifference(sel, ratio, recon, method, rows))
    return out
