"""The whole atlas of a run directory: choose the neurons, stream the paths and the probe images,
draw, write ``atlas/`` (``atlas.html``, one figure per class, ``atlas.json``) and return the
``metrics.json`` section with the cost and the colour check.
The colour check (:mod:`.colour`) runs on shapes classes.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..classes import choose_classes, resolve_classes
from ..data import DataSource, model_transform
from ..errors import InvalidArgumentError
from ..io import atomic_write_json, make_dir
from ..metrics import AtlasInfo
from ..models import discover_ffn
from ..rundir import RunDir
from .activations import NeuronActivations, neuron_activations
from .colour import colour_check, colour_summary, colours_of
from .figures import PathColumn, class_path_figure, input_images, overlay
from .select import Neuron, NeuronUse, class_path_neurons, neuron_use
from .settings import AtlasSettings

__all__ = ["Atlas", "build_atlas", "choose_atlas_classes"]

log = logging.getLogger("jas_prune")

#: classes named per neuron (the ones whose paths use it most)
TOP_CLASSES = 3
#: largest tile side in pixels (smaller model inputs are kept at their own size)
TILE = 112


@dataclass
class Atlas:
    """Everything the page and the figures show (M neurons, Q chosen classes, C classes)."""

    classes: list[int]
    class_names: list[str]
    layers: list[int]
    path_top: torch.Tensor  # [Q, L] each chosen class's path neuron per block (-1: no images)
    path_freq: torch.Tensor  # [Q, L]
    neurons: list[Neuron]  # the chosen classes' path neurons, then those asked for (--neurons)
    use: NeuronUse  # [C, M]
    acts: NeuronActivations  # [M, ...]
    ids: dict[int, str]  # sample position -> sample id, for the top images
    labels: dict[int, int]  # sample position -> class, for the top images
    tiles: dict[tuple[int, int], np.ndarray]  # (neuron, rank) -> overlay tile
    colour: list[dict[str, Any]] | None  # every (class, block) row of the colour check

    def path(self, q: int) -> list[int]:
        """Rows (in ``neurons``) of chosen class ``q``'s path neuron per block, block order."""
        return [self.neurons.index(Neuron(b, int(self.path_top[q, j]))) for j, b in enumerate(self.layers)
                if int(self.path_top[q, j]) >= 0]

    def users(self, m: int) -> list[int]:
        """Chosen classes whose path neuron at its block is neuron ``m``."""
        n = self.neurons[m]
        j = self.layers.index(n.block)
        return [c for q, c in enumerate(self.classes) if int(self.path_top[q, j]) == n.index]

    def top_classes(self, m: int, k: int = TOP_CLASSES) -> list[tuple[int, float]]:
        """The ``k`` classes whose paths go through neuron ``m`` most often (frequency > 0)."""
        f = self.use.frequency[:, m]
        order = torch.argsort(-f, stable=True)[:k]
        return [(int(c), float(f[c])) for c in order if f[c] > 0]


def choose_atlas_classes(source: DataSource, settings: AtlasSettings, classes: Sequence[Any] | None,
                         key: str = "report.atlas.classes") -> list[int]:
    """The classes named (resolved by name or index), else every class with probe images, capped
    at ``settings.max_classes`` (the best-populated ones, lowest index first)."""
    if classes:
        return resolve_classes(list(classes), source.class_names, key=key)

    counts = np.bincount([s.label for s in source.subset("probe")], minlength=source.num_classes)
    return sorted(choose_classes(counts, None, k=settings.max_classes))


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def build_atlas(run: RunDir, model: nn.Module, source: DataSource, *, method: str, scope: str,
                settings: AtlasSettings | None = None, classes: Sequence[Any] | None = None,
                neurons: Sequence[Neuron] = (), batch_size: int = 64, seed: int = 0,
                class_key: str = "report.atlas.classes") -> AtlasInfo:
    """Build ``run/atlas/`` from the run's ``paths/probe`` and the model; return its metrics.

    Args:
        method: the located method whose paths are read (the recipe's first).
        scope: the run's attribution scope (``cls``: class-token activation; ``all``: token mean).
        classes: classes to show (names or indices; default: ``settings.classes``, else all up
            to ``settings.max_classes``; none when only ``neurons`` are given).
        neurons: extra neurons to show (already checked with :func:`~.select.parse_neurons`).
    """
    from .page import write_page

    settings = settings or AtlasSettings()
    t0, rss0 = time.perf_counter(), _peak_rss_mb()
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    info = discover_ffn(model)
    probe = source.subset("probe")
    store = run.path_store("probe")
    chunks = lambda: store.iter_chunks(len(probe), scores=False)  # noqa: E731 - re-read per pass
    wanted = classes if classes else settings.classes
    chosen = [] if (neurons and not wanted) else choose_atlas_classes(source, settings, wanted, class_key)
    top, freq, layers = class_path_neurons(chunks(), method, chosen, max(info.widths))
    path_neurons = sorted({Neuron(layers[j], int(top[q, j])) for q in range(len(chosen))
                           for j in range(len(layers)) if int(top[q, j]) >= 0})
    all_neurons = path_neurons + [n for n in neurons if n not in path_neurons]
    if not all_neurons:
        raise InvalidArgumentError("atlas: no neuron to show (the chosen classes have no located probe images)")
    use = neuron_use(chunks(), method, all_neurons, layers, source.num_classes)
    transform = model_transform(model)
    bs = settings.batch_size or batch_size
    acts = neuron_activations(model, probe, transform, all_neurons, scope=scope, num_classes=source.num_classes,
                              k=settings.images, batch_size=bs, seed=seed)
    rows = _colour_rows(model, source, transform, all_neurons, chosen, top, layers, acts, bs, seed) \
        if path_neurons else None
    positions = [int(p) for p in acts.top_positions.flatten() if p >= 0]
    tiles = _tiles(acts, input_images(model, probe, positions, transform, seed=seed))
    atlas = Atlas(classes=chosen, class_names=list(source.class_names), layers=layers, path_top=top,
                  path_freq=freq, neurons=all_neurons, use=use, acts=acts,
                  ids={p: probe[p].id for p in positions}, labels={p: probe[p].label for p in positions}, tiles=tiles,
                  colour=rows)
    out = run.atlas
    make_dir(out, f"atlas: {out}")
    figures = [_class_figure(atlas, q, out) for q in range(len(chosen))]
    for stale in set(out.glob("class-*.png")) - set(figures):  # an earlier atlas's other classes
        stale.unlink()
    atomic_write_json(out / "atlas.json", atlas_json(atlas))
    shared = shared_table(atlas)
    page = write_page(atlas, out / "atlas.html", shared=shared)
    info_out = AtlasInfo(
        page=page.relative_to(run.root).as_posix(), method=method, scope=scope, classes=chosen,
        neurons=[str(n) for n in all_neurons], images=acts.images, k=settings.images,
        figures=[f.relative_to(run.root).as_posix() for f in figures],
        colour_check=None if rows is None else [r for r in rows if r["block"] == layers[0]],
        colour_by_block=None if rows is None else colour_summary(rows), shared=shared,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=_peak_rss_mb(), rss_growth_mb=max(0.0, _peak_rss_mb() - rss0),
        state_mb=_bytes(acts.state_bytes(), top, freq, use.frequency, use.jas_share, use.images) / 2**20,
        cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    log.info("atlas: %d classes, %d neurons, %d probe images in %.1f s -> %s", len(chosen), len(all_neurons),
             acts.images, info_out.seconds, info_out.page)
    return info_out


def _colour_rows(model: nn.Module, source: DataSource, transform: Any, neurons: list[Neuron], chosen: list[int],
                 top: torch.Tensor, layers: list[int], probe_acts: NeuronActivations, batch_size: int,
                 seed: int) -> list[dict[str, Any]] | None:
    """The colour check of every (chosen class, block): one more pass, over the test images."""
    if colours_of(source.class_names) is None:
        return None
    held = neuron_activations(model, source.subset("test"), transform, neurons, scope=probe_acts.scope,
                              num_classes=source.num_classes, k=1, batch_size=batch_size, seed=seed)
    pairs = [(c, neurons.index(Neuron(b, int(top[q, j])))) for j, b in enumerate(layers)
             for q, c in enumerate(chosen) if int(top[q, j]) >= 0]
    return colour_check(source.class_names, pairs, held, probe_acts)


def _tiles(acts: NeuronActivations, images: dict[int, np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    """(neuron row, rank) -> its top image with the heatmap over it, one colour scale per neuron."""
    tiles = {}
    for m in range(len(acts.neurons)):
        kept = acts.top_positions[m] >= 0
        maps = acts.top_maps[m][kept]
        lo, hi = (float(maps.min()), float(maps.max())) if len(maps) else (0.0, 1.0)
        for r in kept.nonzero().flatten().tolist():
            im = images[int(acts.top_positions[m, r])]
            tiles[(m, r)] = overlay(im, acts.top_maps[m, r].numpy(), lo, hi, size=min(TILE, max(im.shape[:2])))
    return tiles


def _bytes(held: int, *tensors: torch.Tensor) -> int:
    return held + sum(t.element_size() * t.numel() for t in tensors)


def neuron_lines(atlas: Atlas, m: int, q: int | None = None) -> list[str]:
    """What a figure says under a neuron: the class's shares, then the classes using it most."""
    lines = []
    if q is not None:
        c = atlas.classes[q]
        lines.append(f"on {100 * float(atlas.use.frequency[c, m]):.0f} % of paths")
        lines.append(f"JAS share {100 * float(atlas.use.jas_share[c, m]):.0f} %")
    users = atlas.users(m)
    lines.append(f"path neuron of {len(users)} class{'es' if len(users) != 1 else ''}")
    lines += [f"{atlas.class_names[c]} {100 * f:.0f} %" for c, f in atlas.top_classes(m)]
    return lines


def _class_figure(atlas: Atlas, q: int, out) -> Any:
    c = atlas.classes[q]
    cols = [PathColumn(str(atlas.neurons[m]), [atlas.tiles[(m, r)] for r in range(3) if (m, r) in atlas.tiles],
                       neuron_lines(atlas, m, q)) for m in atlas.path(q)]
    name = atlas.class_names[c]
    title = f"{name}: path neuron per block, top probe images"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return class_path_figure(out / f"class-{c:03d}-{safe}.png", title, cols)


def shared_table(atlas: Atlas, rows: int = 10) -> dict[str, Any]:
    """Neurons that are the path neuron of many chosen classes vs of one (class-specific)."""
    by = [(len(atlas.users(m)), m) for m in range(len(atlas.neurons))]
    by = [(k, m) for k, m in by if k > 0]
    by.sort(key=lambda t: (-t[0], atlas.neurons[t[1]]))
    per_block = {}
    for b in atlas.layers:
        ks = [k for k, m in by if atlas.neurons[m].block == b]
        per_block[str(b)] = {"neurons": len(ks), "specific": sum(1 for k in ks if k == 1),
                             "max_classes": max(ks) if ks else 0}
    return {"most_shared": [{"neuron": str(atlas.neurons[m]), "classes": k,
                             "names": [atlas.class_names[c] for c in atlas.users(m)][:6]}
                            for k, m in by[:rows] if k > 1],
            "specific": sum(1 for k, _ in by if k == 1), "shared": sum(1 for k, _ in by if k > 1),
            "per_block": per_block}


def atlas_json(atlas: Atlas) -> dict[str, Any]:
    """The atlas's numbers (no pictures): per class its path, per neuron its top images and use."""
    a = atlas.acts

    def num(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 6)

    return {
        "scope": a.scope, "layers": atlas.layers, "grid": list(a.grid), "images": a.images,
        "classes": [{"class": c, "name": atlas.class_names[c],
                     "path": [str(Neuron(b, int(atlas.path_top[q, j]))) if int(atlas.path_top[q, j]) >= 0 else None
                              for j, b in enumerate(atlas.layers)],
                     "frequency": [num(v) for v in atlas.path_freq[q].tolist()]}
                    for q, c in enumerate(atlas.classes)],
        "neurons": [{"neuron": str(n), "path_neuron_of": [atlas.class_names[c] for c in atlas.users(m)],
                     "top_images": [{"id": atlas.ids[p], "activation": num(v)}
                                    for p, v in zip(a.top_positions[m].tolist(), a.top_values[m].tolist()) if p >= 0],
                     "class_mean": [num(v) for v in a.mean[:, m].tolist()],
                     "class_std": [num(v) for v in a.std[:, m].tolist()],
                     "frequency": [num(v) for v in atlas.use.frequency[:, m].tolist()],
                     "jas_share": [num(v) for v in atlas.use.jas_share[:, m].tolist()]}
                    for m, n in enumerate(atlas.neurons)],
        "colour_check": atlas.colour,
    }

