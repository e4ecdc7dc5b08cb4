"""Locate: every image of a partition, chunk by chunk, into ``paths/<part>/`` (resumable).

The probe partition is located with every ``attribution.method`` (masks, importance); with
``evaluate.intervention`` the test partition is located with the methods of the paper's Table 1.
Under torchrun every rank runs these stages: rank 0 checks the fingerprint and lists the chunks
still to do, the ranks take every ``world``-th of them, and all chunks are on disk when the
stage returns (on every rank).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ...errors import FingerprintMismatchError, NonFiniteOutputError
from ...metrics import LocateMetrics
from ...rundir import CHUNK_SIZE
from .base import STAGES, Stage

__all__ = ["TABLE1_METHODS", "paths_fingerprint", "check_resumable", "locate_part"]

log = logging.getLogger("jas_prune")

#: Methods compared in the paper's Table 1 (located on the test partition).
TABLE1_METHODS = ("jas", "activation", "influence_pattern")


def _methods(ctx, part: str) -> list[str]:
    return list(ctx.recipe.attribution.methods) if part == "probe" else list(TABLE1_METHODS)


def paths_fingerprint(ctx, part: str) -> dict[str, Any]:
    """What ``paths/<part>/`` results depend on: model weights, image selection, settings."""
    settings = ctx.locate.settings.as_dict()
    return {
        "model": ctx.digest,
        "data": {**ctx.source.selection_fingerprint(), "partition": part},
        # units [ffn] is what paths/ always held: left out, so older runs still resume
        "attribution": {**{k: v for k, v in settings.items()
                           if k != "internal_batch_size" and not (k == "units" and v == ["ffn"])},
                        "methods": _methods(ctx, part), "chunk_size": CHUNK_SIZE, "dtype": ctx.recipe.runtime.dtype},
    }


def _parts(recipe) -> list[str]:
    if recipe.attribution is None:
        return []
    return ["probe"] + (["test"] if recipe.evaluate.intervention else [])


def check_resumable(ctx) -> None:
    """On ``--resume``, compare the stored model digest and ``paths/`` fingerprints before
    anything is rewritten.

    Raises:
        FingerprintMismatchError: naming the part (model, data, attribution) that differs.
    """
    stored = ctx.metrics.fingerprint.model if ctx.metrics.fingerprint is not None else None
    if stored is not None and stored != ctx.digest:  # also guards runs without paths/ (pruned entries)
        raise FingerprintMismatchError(
            f"--resume {ctx.run.root}: the stored results were computed with a different model (weights digest "
            f"{stored[:12]}… vs {ctx.digest[:12]}…); use a new --out directory or restore the original settings")
    for part in _parts(ctx.recipe):
        store = ctx.run.path_store(part)
        if (store.root / "fingerprint.json").exists():
            store.check_or_write_fingerprint(paths_fingerprint(ctx, part), resume=True)


def _check_finite(r: Any, chunk: list, where: str) -> None:
    """Refuse NaN/Inf model outputs or attribution scores, naming the image (and block)."""
    bad = (~torch.isfinite(r.probs)).nonzero()
    if len(bad):
        raise NonFiniteOutputError(f"{where}: model output is not finite for image {chunk[int(bad[0, 0])].id}")
    for block, sc in zip(r.layers, r.scores):
        bad = (~torch.isfinite(sc)).nonzero()
        if len(bad):
            raise NonFiniteOutputError(f"{where}: attribution scores are not finite for image "
                                       f"{chunk[int(bad[0, 0])].id} in block {block}")


def locate_part(ctx, part: str, *, resume: bool) -> None:
    """Locate every image of ``part`` that has no finished chunk yet; ``metrics.locate``
    (``locate_test``) counts the images of all ranks, its ``seconds`` is the slowest rank's."""
    from tqdm.auto import tqdm

    from ...attribution import locate

    dist = ctx.dist
    methods = _methods(ctx, part)
    samples = ctx.source.subset(part)
    store = ctx.run.path_store(part)
    with dist.stage(f"checking paths/{part}") as plan:
        if dist.is_root:  # one rank reads and writes the fingerprint: no race on it
            store.check_or_write_fingerprint(paths_fingerprint(ctx, part), resume=resume)
            removed = store.remove_partial()
            if removed:
                log.info("locate %s: removed %d unfinished write(s) of an interrupted run", part, len(removed))
            for path, why in store.remove_damaged(lambda i: [samples[j].id for j in store.chunk_range(i, len(samples))],
                                                  len(samples)):
                log.warning("locate %s: %s is damaged (%s); locating its images again", part, path, why)
            plan.value = store.pending(len(samples))
    pending: list[int] = plan.values[0]
    mine = pending[dist.rank::dist.world]  # a fresh run: chunk i on rank i % world
    done_before = store.n_chunks(len(samples)) - len(pending)
    with dist.stage(f"locating {part}") as work:
        t0 = time.perf_counter()
        n_new = 0
        bar = tqdm(mine, desc=f"locate {part} ({'+'.join(methods)})", unit="chunk", mininterval=2,
                   disable=not dist.is_root)
        for i in bar:
            dist.check_peers(f"locating {part}")  # another rank failed: stop now, not after our share
            rng = store.chunk_range(i, len(samples))
            chunk = [samples[j] for j in rng]
            x, y = ctx.images(chunk)
            x = x.to(ctx.device, dtype=ctx.dtype)
            results = {}
            for method in methods:
                r = locate(ctx.model, x, y.to(ctx.device), ctx.locate_settings(method))
                _check_finite(r, chunk, f"locate {part} ({method})")
                results[method] = r
            layers = results[methods[0]].layers
            store.write_chunk(i, store.chunk_tensors(rng, y, results),
                              {"ids": [s.id for s in chunk], "layers": layers, "methods": methods})
            n_new += len(chunk)
        work.value = (n_new, time.perf_counter() - t0)
        if dist.enabled:
            log.info("locate %s: rank %d/%d located %d images in %.1f s", part, dist.rank, dist.world,
                     n_new, work.value[1])
    n_new = sum(v[0] for v in work.values)
    per_rank = [v[1] for v in work.values]
    seconds = max(per_rank)
    record = LocateMetrics(
        images=len(samples), images_this_run=n_new, chunks_resumed=done_before, seconds=seconds,
        images_per_second=(n_new / seconds) if n_new and seconds > 0 else None, world_size=dist.world,
        seconds_per_rank=per_rank, methods=methods, **ctx.locate.settings.as_dict(), device=str(ctx.device))
    if part == "probe":
        ctx.metrics.locate = record
    else:
        ctx.metrics.locate_test = record
    log.info("locate %s: %d images (%d new) in %.1f s%s", part, len(samples), n_new, seconds,
             f" on {dist.world} ranks" if dist.enabled else "")


@STAGES.register
def _locate_stage() -> Stage:
    return Stage(
        "locate", "neuron paths of every probe image with every attribution.method -> paths/probe/, metrics.locate",
        enabled=lambda r: r.attribution is not None,
        run=lambda ctx: locate_part(ctx, "probe", resume=ctx.resume),
        shared=True, order=10)


@STAGES.register
def _locate_test_stage() -> Stage:
    return Stage(
        "locate_test", "paths of the test images for Table 1 (evaluate.intervention) -> paths/test/",
        enabled=lambda r: r.attribution is not None and r.evaluate.intervention,
        run=lambda ctx: locate_part(ctx, "test", resume=ctx.resume),
        shared=True, order=20)
