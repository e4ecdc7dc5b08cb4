"""``jas-prune recipe run``: recipe -> stages -> run directory.

The order: refuse what cannot run (the stages' own checks), prepare ``--out`` (create it and
take its lock: one writer per run directory), load the model and data and refuse what does not
fit them, on ``--resume`` refuse other settings and changed result files, then, the run accepted,
write ``recipe.yaml`` and ``run.log``, then run every enabled stage of
:data:`~jas_prune.pipeline.stages.STAGES` in order, rewriting ``metrics.json`` after each, and
finally the report. A run refused before it is accepted leaves the run directory as it found it
(one it created is removed again). Under torchrun the shared stages (locating) run on every
rank; the rest on rank 0 alone.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

import torch

from ..data import DataSource, model_transform, source_for
from ..distributed import Dist, init_from_env, sigterm_raises
from ..errors import Interrupted, JasPruneError, StorageError
from ..io import atomic_write_text, storage_error
from ..metrics import DataInfo, Metrics, RunInfo, read_metrics
from ..models import load_model
from ..pathstore import LocatedImages
from ..recipe import Recipe, dump_recipe
from ..rundir import RunDir
from .checks import check_against_model, check_head, check_stages
from .context import RunContext, resolve_device, seed_everything
from ..integrity import refuse_changed_files, remove_stale_temporaries
from .stages import STAGES
from .stages.locate import check_resumable, locate_part

__all__ = ["run_recipe", "locate_partition"]

log = logging.getLogger("jas_prune")


def run_recipe(recipe: Recipe, out: str | os.PathLike[str], *, resume: bool = False) -> Metrics | None:
    """Run every stage the recipe enables and return ``metrics.json``'s content (typed).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: the ranks
    share the locating (the probe partition, and the test partition for
    ``evaluate.intervention``); rank 0 alone writes the run directory, runs every other stage and
    returns the metrics; the other ranks return ``None`` once their locating is done. SIGTERM
    raises :class:`~jas_prune.errors.Interrupted` (finished chunks and checkpoints are kept:
    continue with ``resume=True``).
    """
    check_stages(recipe)
    device = resolve_device(recipe.runtime.device)
    with sigterm_raises():
        dist = init_from_env(device)  # on CUDA, "cuda" is now this rank's GPU (LOCAL_RANK)
        try:
            return _run(recipe, RunDir(out), device, dist, resume=resume)
        finally:
            dist.close()


def locate_partition(recipe: Recipe, out: str | os.PathLike[str], model: torch.nn.Module, source: DataSource,
                     part: str = "probe", *, what: str = "locate_partition") -> LocatedImages:
    """The neuron paths of every image of one partition, located by the pipeline's locate stage
    alone (resumable chunks under ``out/paths/<part>/``, the run directory's lock held meanwhile),
    without running the other stages: for experiments that need paths but must not touch the
    test partition (``benchmarks.bench_select``). Runs on the CPU.

    Args:
        recipe: its ``model``, ``data``, ``attribution`` and ``runtime`` sections are used.
        model, source: already loaded from the recipe (the caller keeps using them).
        what: the run directory's lock owner, for messages.
    """
    run = RunDir(out)
    lock = run.prepare(resume=True, what=what)
    try:
        ctx = RunContext(recipe, run, torch.device("cpu"), model, source, model_transform(model),
                         **vars(check_against_model(recipe, model, source)))
        locate_part(ctx, part, resume=True)
        return run.path_store(part).read(len(source.subset(part)))
    finally:
        lock.release()


def _load(recipe: Recipe, run: RunDir, device: torch.device, dist: Dist, resume: bool) -> RunContext:
    """Model and data loaded and checked against the recipe; on rank 0, ``recipe.yaml`` written."""
    rt, m, d = recipe.runtime, recipe.model, recipe.data
    model = load_model(m.name, checkpoint=m.checkpoint, pretrained=m.pretrained, num_classes=m.num_classes)
    model = model.to(device=device, dtype=getattr(torch, rt.dtype))
    source = source_for(d, rt.seed)
    check_head(recipe, model, source)
    resolved = check_against_model(recipe, model, source)
    resumed = dist.is_root and resume and run.metrics.exists()
    metrics = read_metrics(run.metrics) if resumed else Metrics()
    ctx = RunContext(recipe, run, device, model, source, model_transform(model), metrics, locate=resolved.locate,
                     prune=resolved.prune, dist=dist, resume=resume)
    if dist.is_root:  # written once the recipe fits the model and data: a refused run leaves no trace
        if resume:  # refuse other settings, and changed result files, before recipe.yaml or metrics change
            check_resumable(ctx)
            refuse_changed_files(run, metrics)
        atomic_write_text(run.recipe, dump_recipe(recipe))
    ctx.metrics.data = DataInfo(kind=source.kind, classes=source.num_classes, images=len(source.samples),
                                probe=len(source.probe), test=len(source.test))
    return ctx


class _LogFile(logging.FileHandler):
    """``run.log``: never prints logging's own traceback to the console, and remembers the first
    write the operating system refused, for the run to stop with it (:meth:`_RunLog.check`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.path = path
        self.refused: StorageError | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if self.refused is None and exc is not None:
            self.refused = storage_error(self.path, exc)


class _RunLog:
    """The run's log records, held in memory until the run is accepted (its checks passed and
    ``recipe.yaml`` is written), then appended to ``run.log``: a refused run writes no log file.
    An internal failure before that point still gets its traceback into the file."""

    def __init__(self, run: RunDir, rank: int) -> None:
        self.file = _LogFile(run.log(rank))
        self.memory = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        log.addHandler(self.memory)
        log.setLevel(logging.INFO)

    def check(self) -> None:
        """Stop the run when ``run.log`` could not be written (no space, ...).

        Raises:
            StorageError: naming ``run.log``.
        """
        if self.file.refused is not None:
            raise self.file.refused

    def open(self) -> None:
        """Write what was held and everything that follows to the file."""
        if self.memory.target is None:
            self.memory.setTarget(self.file)
            self.memory.flush()
            log.removeHandler(self.memory)
            log.addHandler(self.file)

    def close(self) -> None:
        for h in (self.memory, self.file):
            log.removeHandler(h)
        self.memory.setTarget(None)
        self.memory.close()
        self.file.close()


def _missing_from(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _forget_new_dir(run: RunDir, created: Path) -> None:
    """A run refused before it was accepted, in a directory it created: remove the directory (and
    the parents it created) again when it holds nothing but the lock file, which goes while still
    held."""
    try:
        if os.listdir(run.root) != [run.lock.name]:
            return
        run.lock.unlink()
        for p in (run.root, *run.root.parents):
            p.rmdir()
            if p == created:
                break
    except OSError:
        pass


def _run(recipe: Recipe, run: RunDir, device: torch.device, dist: Dist, *, resume: bool) -> Metrics | None:
    from ..reporting import write_report

    created = _missing_from(run.root) if dist.is_root else None
    locks = []  # rank 0 prepares --out and holds its lock; every rank then checks that it sees it
    dist.shared_dir(run.root, lambda: locks.append(run.prepare(resume=resume)))
    run_log = _RunLog(run, dist.rank)
    accepted = False
    try:
        t0 = time.perf_counter()
        seed_everything(recipe.runtime.seed)
        stages = [s for s in STAGES if s.enabled(recipe)]
        if not any(s.shared for s in stages):  # the other ranks have nothing to do
            if not dist.is_root:
                return None
            dist.release()
        with dist.stage("loading the model and data"):
            ctx = _load(recipe, run, device, dist, resume)
        accepted = True
        run_log.open()
        # said once the run is accepted: a refused run prints its one error line and nothing else
        log.info("run %s on %s (torch %s)%s", run.root, device, torch.__version__,
                 f", rank {dist.rank} of {dist.world}" if dist.enabled else "")
        if resume and dist.is_root:  # under the lock: whatever a killed run left half-written is its own
            remove_stale_temporaries(run)
        # the work the ranks share comes first, with nothing of rank 0 alone in between (the
        # others would wait for it in a timed agreement, idle)
        for stage in (s for s in stages if s.shared):
            stage.run(ctx)
            ctx.save_metrics()
            run_log.check()  # the stage's results are kept; a run.log that cannot be written stops the run
        if not dist.is_root:
            log.info("rank %d: locating done; rank 0 runs the other stages", dist.rank)
            return None
        dist.release()  # the other ranks are done: no more meetings
        for stage in (s for s in stages if not s.shared):
            stage.run(ctx)
            ctx.save_metrics()
            run_log.check()  # the stage's results are kept; a run.log that cannot be written stops the run
        ctx.metrics.run = RunInfo(seconds=time.perf_counter() - t0, device=str(device), torch=torch.__version__,
                                  world_size=dist.world)
        ctx.save_metrics()
        write_report(run.root)
        log.info("done in %.1f s: %s", time.perf_counter() - t0, run.root)
        run_log.check()
        return ctx.metrics
    except JasPruneError as exc:
        # a refused write keeps the OS error's traceback in run.log; the console gets one line
        log.error("run failed: %s", exc, extra={"file_only": True},
                  exc_info=exc if isinstance(exc, StorageError) else None)
        raise
    except (Interrupted, KeyboardInterrupt) as exc:
        log.error("interrupted, resume with --resume (%s; finished chunks and checkpoints are kept)",
                  exc or "interrupted by SIGINT", extra={"file_only": True})
        raise
    except Exception:
        run_log.open()  # an internal failure: its traceback belongs in run.log
        log.exception("run failed (internal error)", extra={"file_only": True})
        raise
    finally:
        run_log.close()
        for lock in locks:
            if created is not None and not accepted:
                _forget_new_dir(run, created)
            lock.release()
