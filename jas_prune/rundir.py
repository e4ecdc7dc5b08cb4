"""The run directory: the one owner of its layout and file names.

Everything that reads or writes a run directory (the pipeline's stages, the report,
``bench_select``, the CLI, ``JASImportance.from_run``) asks a :class:`RunDir` for the path
instead of joining names itself::

    run/
      recipe.yaml            the resolved recipe (every default spelled out)
      metrics.json           every figure, rewritten atomically after each stage
      report.md, figures/    rebuilt from the files above by ``jas-prune report``
      run.log                (``run.rank<N>.log`` for the other ranks of a torchrun run)
      paths/<part>/          per-image locate results, chunk-NNNNN.safetensors + fingerprint.json
      masks.safetensors      per-class utilisation, similarity, TopK masks, dense importance
      pruned-*.safetensors   pruned checkpoints (``load_pruned``)
      *.onnx + *.json        exported models and their sidecars
      atlas/                 the neuron atlas: atlas.html, atlas.json, class-*.png
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .lock import LOCK_FILE, RunDirLock

if TYPE_CHECKING:  # pragma: no cover
    from .pathstore import PathStore

__all__ = ["RunDir", "CHUNK_SIZE", "PARTS"]

#: Images per ``paths/`` chunk: fixed, so chunk i always holds the same images.
CHUNK_SIZE = 32
#: The data partitions a run locates: ``probe`` (attribution, masks, calibration) and ``test``.
PARTS = ("probe", "test")


class RunDir:
    """Names of everything in one run directory (nothing is created by asking).

    Args:
        root: the directory (``--out``).
    """

    RECIPE = "recipe.yaml"
    METRICS = "metrics.json"
    REPORT = "report.md"
    FIGURES = "figures"
    LOG = "run.log"
    MASKS = "masks.safetensors"
    PATHS = "paths"
    ATLAS = "atlas"
    LOCK = LOCK_FILE

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # -- files -----------------------------------------------------------------------------
    @property
    def recipe(self) -> Path:
        return self.root / self.RECIPE

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def figures(self) -> Path:
        return self.root / self.FIGURES

    def figure(self, name: str) -> Path:
        """``figures/<name>.png``."""
        return self.figures / f"{name}.png"

    @property
    def masks(self) -> Path:
        return self.root / self.MASKS

    @property
    def atlas(self) -> Path:
        """``atlas/``: the neuron atlas (``atlas.html``, ``atlas.json``, one figure per class)."""
        return self.root / self.ATLAS

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    def log(self, rank: int = 0) -> Path:
        """``run.log`` for rank 0, ``run.rank<N>.log`` for the other ranks of a torchrun run."""
        stem, suffix = os.path.splitext(self.LOG)
        return self.root / (self.LOG if rank == 0 else f"{stem}.rank{rank}{suffix}")

    def paths_dir(self, part: str) -> Path:
        """``paths/<part>/`` (``part`` in :data:`PARTS`)."""
        if part not in PARTS:
            raise ValueError(f"part: {part!r} is not one of {', '.join(PARTS)}")
        return self.root / self.PATHS / part

    def path_store(self, part: str) -> "PathStore":
        """The chunk store of ``paths/<part>/`` (chunks of :data:`CHUNK_SIZE` images)."""
        from .pathstore import PathStore

        return PathStore(self.paths_dir(part), chunk_size=CHUNK_SIZE)

    def file(self, name: str) -> Path:
        """A file of the run by its name as recorded in ``metrics.json`` (checkpoints, ONNX)."""
        return self.root / name

    # -- pruned models and exports -----------------------------------------------------------
    @staticmethod
    def pruned_name(method: str, ratio: float, classes: Sequence[int] | None = None, *,
                    suffixes: Sequence[str] = ()) -> str:
        """The stem of a pruned checkpoint: ``pruned-<method>-r<percent>[-<suffix>...][-c<classes>]``.

        ``suffixes`` name the variants of one (method, ratio) that a run compares (e.g. ``bc``
        for bias compensation), in a fixed order chosen by the caller.
        """
        tag = f"pruned-{method}-r{round(ratio * 100):02d}"
        for s in suffixes:
            tag += f"-{s}"
        if classes is not None:
            tag += "-c" + "_".join(map(str, classes)) if len(classes) <= 8 else f"-c{len(classes)}classes"
        return tag

    def checkpoint(self, stem: str) -> Path:
        """``<stem>.safetensors``."""
        return self.root / f"{stem}.safetensors"

    def onnx(self, label: str) -> Path:
        """``<label>.onnx`` (its sidecar is ``<label>.json``)."""
        return self.root / f"{label}.onnx"

    # -- state -------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Whether a run has already written its results here."""
        return self.metrics.exists() or self.recipe.exists()

    def is_run_dir(self) -> bool:
        """Whether the directory is (the start of) a jas-prune run: anything a run writes first."""
        return any(p.exists() for p in (self.lock, self.recipe, self.metrics, self.log(), self.root / self.PATHS))

    def check_target(self) -> None:
        """Refuse an ``--out`` a run must not write into, before anything is created: the file-system
        root, the home directory, or a directory that holds other things than a jas-prune run.

        Raises:
            OutputDirError: naming ``--out`` and what it is.
        """
        from .errors import OutputDirError
        from .io import refuse_system_dir

        refuse_system_dir(self.root, f"--out {self.root}")
        if self.root.is_dir() and not self.is_run_dir():
            entries = sorted(os.listdir(self.root))
            if entries:
                raise OutputDirError(f"--out {self.root}: not empty and not a jas-prune run directory (it holds "
                                     f"{entries[0]!r}{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}); "
                                     "choose a new or empty directory")

    def prepare(self, *, resume: bool, what: str = "recipe run") -> RunDirLock:
        """Create the directory (or reuse it, with ``--resume``) and take its lock.

        Nothing but the directory and its lock file is created; the caller holds the returned
        lock for the whole run (one writer per run directory).

        Raises:
            OutputDirError: the directory cannot be created, is one a run must not write into
                (:meth:`check_target`), or a previous run is there without ``--resume``.
            RunDirLockedError: another process holds the directory (naming it).
            StorageError: the lock file cannot be written (read-only, no space).
        """
        from .errors import OutputDirError
        from .io import make_dir

        self.check_target()
        make_dir(self.root, f"--out {self.root}")
        lock = RunDirLock(self).acquire(what)
        if not resume and self.holds_run():
            lock.release()
            raise OutputDirError(
                f"--out {self.root}: already holds a run; pass --resume to continue it or choose another directory")
        return lock

    def log_handler(self, rank: int = 0) -> logging.Handler:
        """A handler that appends to this run's log file (:meth:`log`), created on first record."""
        handler = _QuietFileHandler(self.log(rank), encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler


class _QuietFileHandler(logging.FileHandler):
    """A log file that never prints logging's own traceback to the console: on a full disk the
    run stops with one line (a :class:`~jas_prune.errors.StorageError`), not with a logging error."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        return None
