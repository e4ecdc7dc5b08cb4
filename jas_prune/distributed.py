"""Multi-process runs under ``torchrun`` and clean stops on SIGTERM.

``torchrun --nproc_per_node=N -m jas_prune recipe run RECIPE --out DIR`` starts N copies of the
command; each finds its rank in torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``). The ranks share the locating work (chunk by chunk) first; then the other
ranks exit and rank 0 does everything else. They meet only at the end of *stages*
(:meth:`Dist.stage`): every rank goes through the same sequence of stages, each runs a block
(work for every rank, or for rank 0 alone while the others wait) and then every rank learns
every other rank's outcome. A failure on one rank therefore stops all of them with a message
naming the rank, instead of leaving the others waiting. A rank that fails also says so at once
in the rendezvous store (torchrun's TCPStore), and long shared blocks look there between steps
(:meth:`Dist.check_peers`, between locating chunks), so the others stop within one step instead
of finishing their share first. A rank that dies without a word (SIGKILL, out of memory) is
noticed when the stage's timeout expires (``JAS_PRUNE_DIST_TIMEOUT`` seconds, default 1800), if
torchrun has not already stopped the others.

The process group is gloo, on CPU and on CUDA alike: it only carries the small stage agreements
(model and results never travel between ranks; the chunks go through the shared ``--out``). On
CUDA each rank uses GPU ``LOCAL_RANK``.

A process must never reach interpreter shutdown with its gloo group alive: gloo's worker thread
may still hold the last reference to the tensors of the last agreement, and releasing it then
takes the GIL from a thread that CPython is terminating, which aborts the process ("terminate
called without an active exception", SIGABRT) while its peers work on (a torch issue).
Destroying the group first joins those threads: :meth:`Dist.close` does (each rank calls it when
it leaves), and an :mod:`atexit` hook does for a rank that exits without it. Destroying frees
the group only if nothing else holds it: a function defined with ``group=dist.group.WORLD`` once
the group exists keeps it in its defaults (``torch.distributed.nn``, which timm imports while
the model loads, has ten), so that module is imported before the group is created, and any
other such default is cleared when the group is destroyed.

:func:`sigterm_raises` turns SIGTERM into :class:`Interrupted` (a ``BaseException``, like
``KeyboardInterrupt``): the chunk being written is abandoned atomically (see
:func:`jas_prune.io.atomic_write`), the run logs how to resume and the CLI exits with code 143.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import json
import os
import secrets
import signal
import threading
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import Interrupted, OutputDirError, PeerFailedError, StageNotAvailableError
from .io import storage_errors

__all__ = [
    "Dist",
    "Step",
    "PeerFailedError",
    "Interrupted",
    "env_rank",
    "init_from_env",
    "sigterm_raises",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
]

#: Seconds a rank waits for the others at the end of a stage (and for the rendezvous) before giving up.
DEFAULT_TIMEOUT_S = 1800
#: Environment variable that overrides :data:`DEFAULT_TIMEOUT_S`.
TIMEOUT_ENV = "JAS_PRUNE_DIST_TIMEOUT"
#: Store keys (under :data:`_STORE_PREFIX`): how many ranks failed, and the first failure.
_STORE_PREFIX = "jas_prune/"
_FAILURES_KEY = "failures"
_FAILED_KEY = "failed"
#: File rank 0 writes in ``--out`` for the other ranks to find (removed once they have).
SHARED_TOKEN = ".jas-prune-shared-dir"


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise StageNotAvailableError(f"{TIMEOUT_ENV}: {raw!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=max(seconds, 1.0))


def _describe(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "exit_code", None)
    if code is None:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__, "exit_code": int(code)}


@dataclass
class Step:
    """What a rank shares at the end of :meth:`Dist.stage`."""

    value: Any = None
    values: list[Any] = field(default_factory=list)


@dataclass
class Dist:
    """This process's place in a (possibly one-process) run.

    Attributes:
        rank: 0 .. world - 1; rank 0 writes the run directory and runs every stage (locating is shared).
        world: number of processes (1 without torchrun).
        local_rank: index on this machine (the GPU this rank uses).
        backend: ``gloo`` (or the backend of a process group the caller created); ``None`` for
            a one-process run.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    _control: Any = field(default=None, repr=False)
    _store: Any = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)
    _owned: bool = field(default=False, repr=False)

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_root(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator["Step"]:
        """A block every rank runs, followed by an agreement on its outcome.

        Use ``if dist.is_root:`` inside for work of rank 0 alone: the other ranks then just wait
        for it. Set ``step.value`` inside to share a small picklable value: after the block,
        ``step.values`` holds every rank's, by rank. A long block shared by every rank should
        call :meth:`check_peers` between its steps.

        Raises:
            The rank's own exception, once the others know of it; :class:`PeerFailedError` when
            another rank failed (naming it, with its exit code) or cannot be reached in time.
        """
        step = Step()
        try:
            yield step
        except BaseException as exc:  # noqa: BLE001 - told to the others, then re-raised
            self._announce(what, exc)
            self._agree(what, step, exc)
            raise
        self._agree(what, step, None)

    def _announce(self, what: str, exc: BaseException) -> None:
        """Tell the other ranks at once (in the store) that this rank failed: they stop at their
        next :meth:`check_peers` instead of at the end of the stage. The first failure is kept."""
        if not self.enabled or self._released or self._store is None or isinstance(exc, PeerFailedError):
            return
        with contextlib.suppress(Exception):  # the agreement that follows still tells them
            if self._store.add(_FAILURES_KEY, 1) == 1:
                self._store.set(_FAILED_KEY, json.dumps({"rank": self.rank, "what": what, **_describe(exc)}))

    def check_peers(self, what: str) -> None:
        """Raise if another rank has failed (a cheap look in the store; a no-op in one process).

        Raises:
            PeerFailedError: naming the rank that failed, with its exit code; or, when the store
                cannot be reached, saying that this rank lost contact with the others.
        """
        if not self.enabled or self._released or self._store is None:
            return
        try:
            if not self._store.check([_FAILED_KEY]):
                return
            failure = json.loads(self._store.get(_FAILED_KEY))
        except Exception as exc:  # noqa: BLE001 - the store's host is gone
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise PeerFailedError(f"rank {self.rank}: lost contact with the other ranks while {what} "
                                  f"({type(exc).__name__}: {first})") from None
        raise PeerFailedError(f"rank {failure['rank']} failed while {failure['what']}: {failure['message']}",
                              exit_code=failure["exit_code"])

    def shared_dir(self, out: Path, prepare: Callable[[], None]) -> None:
        """Rank 0 runs ``prepare()`` (creating ``out``); then every rank checks that it sees the
        directory rank 0 prepared: under torchrun on several machines, ``--out`` must be on a
        file system they share.

        Raises:
            OutputDirError: on the rank that cannot see rank 0's ``out`` (naming it and the rank);
                :class:`PeerFailedError` on the others.
        """
        with self.stage("preparing the run directory") as step:
            if self.is_root:
                prepare()
                if self.enabled:
                    step.value = secrets.token_hex(8)
                    with storage_errors(out / SHARED_TOKEN):
                        (out / SHARED_TOKEN).write_text(step.value, encoding="utf-8")
        if not self.enabled:
            return
        token = step.values[0]
        try:
            with self.stage("checking that every rank sees --out"):
                if not self.is_root:
                    try:
                        seen = (out / SHARED_TOKEN).read_text(encoding="utf-8")
                    except OSError:
                        seen = None
                    if seen != token:
                        raise OutputDirError(
                            f"--out {out}: rank {self.rank} does not see the run directory rank 0 prepared "
                            f"({'no' if seen is None else 'another'} {SHARED_TOKEN} there); every rank must "
                            "see the same --out directory (on several machines, a shared file system)")
        finally:
            if self.is_root:
                with contextlib.suppress(OSError):
                    (out / SHARED_TOKEN).unlink()

    def _agree(self, what: str, step: "Step", error: BaseException | None) -> None:
        if not self.enabled or self._released:
            step.values = [step.value]
            return
        import torch.distributed as dist

        outcome = (None, _describe(error)) if error is not None else (step.value, None)
        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, outcome, group=self._control)
        except Exception as exc:  # timeout, or a rank that died
            if error is not None:
                return
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise PeerFailedError(f"rank {self.rank}: lost contact with the other ranks while {what} "
                                  f"({type(exc).__name__}: {first})") from None
        if error is not None:
            return
        failures = [(r, f) for r, (_, f) in enumerate(gathered) if f is not None]
        if failures:  # name the rank that failed first, not those its failure stopped
            r, failure = next(((r, f) for r, f in failures if f["type"] != PeerFailedError.__name__), failures[0])
            raise PeerFailedError(f"rank {r} failed while {what}: {failure['message']}",
                                  exit_code=failure["exit_code"])
        step.values = [v for v, _ in gathered]

    def release(self) -> None:
        """The other ranks are gone (their part is done): later stages run on this rank alone."""
        self._released = True

    def close(self) -> None:
        """Destroy the process group this module created, joining gloo's threads (a no-op for a
        one-process run, a caller's own group, or a group already destroyed). Call it before the
        process exits; the :mod:`atexit` hook of :func:`init_from_env` is the last resort.
        The gloo group this module added to a caller's group is destroyed too."""
        if self._control is not None:
            _destroy_group(self._control)
            self._control = None
        if self.enabled and self._owned:
            _destroy_group()


def init_from_env(device: torch.device) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; a one-process :class:`Dist` otherwise.

    Args:
        device: the resolved ``runtime.device``; on ``cuda`` this rank uses GPU ``LOCAL_RANK``
            (made the current device, so ``cuda`` means that GPU). The process group is gloo
            either way: it carries only the stage agreements.

    Raises:
        StageNotAvailableError: too few GPUs for the ranks, or a missing rendezvous variable.
    """
    rank, world, local_rank = env_rank()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise StageNotAvailableError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with "
                                     "`torchrun --nproc_per_node=N -m jas_prune recipe run ...`")
    timeout = _timeout()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise StageNotAvailableError(
                f"runtime.device: rank {rank} (LOCAL_RANK {local_rank}) needs GPU {local_rank} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; use --nproc_per_node ≤ the GPU count")
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()  # a caller's own process group is used, and left alone
    if owned:
        with contextlib.suppress(ImportError):  # its defaults would hold the group (see _forget)
            import torch.distributed.nn  # noqa: F401
        dist.init_process_group(backend="gloo", rank=rank, world_size=world, timeout=timeout)
        _destroy_group_at_exit()
    backend = str(dist.get_backend())
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank=rank, world=world, local_rank=local_rank, backend=backend, _control=control,
                _store=_failure_store(), _owned=owned)


_AT_EXIT = False


def _destroy_group(group: Any = None) -> None:
    """Destroy ``group`` (torch's default process group and every other by default) if it is
    alive. Destroying a gloo group joins its worker threads, so none of them is left to release
    an agreement's tensors during interpreter shutdown (which aborts the process). Never raises:
    a rank on its way out has no use for the group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    default = weakref.ref(dist.group.WORLD) if group is None else None
    with contextlib.suppress(Exception):
        dist.destroy_process_group(group)
    pg = default() if default is not None and not dist.is_initialized() else None
    if pg is not None:  # destroyed, yet still held: by function defaults, see _forget
        _forget(pg)
        del pg  # the last reference: the group is freed and its threads are joined here


def _forget(pg: Any) -> None:
    """Clear the function defaults that still hold the destroyed default group ``pg`` (a
    function defined with ``group=dist.group.WORLD`` once the group exists holds it), so that it
    is freed and its gloo threads joined now, not left running into interpreter shutdown.
    ``None``, the default group, is what such a default meant."""
    for f in gc.get_objects():
        if not isinstance(f, types.FunctionType):
            continue
        if f.__defaults__ and any(v is pg for v in f.__defaults__):
            f.__defaults__ = tuple(None if v is pg else v for v in f.__defaults__)
        if f.__kwdefaults__ and any(v is pg for v in f.__kwdefaults__.values()):
            f.__kwdefaults__ = {k: None if v is pg else v for k, v in f.__kwdefaults__.items()}


def _destroy_group_at_exit() -> None:
    """Register :func:`_destroy_group` with :mod:`atexit` (once per process): atexit hooks run
    while the interpreter is still whole, before the shutdown that gloo's threads cannot survive."""
    global _AT_EXIT
    if not _AT_EXIT:
        atexit.register(_destroy_group)
        _AT_EXIT = True


def _failure_store() -> Any:
    """The rendezvous store of the default process group (torchrun's TCPStore, per restart
    attempt) under a prefix of ours; ``None`` where torch does not expose it (failures then
    reach the others at the end of the stage only)."""
    import torch.distributed as dist

    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return dist.PrefixStore(_STORE_PREFIX, _get_default_store())
    except Exception:  # noqa: BLE001 - a private torch API: degrade, never fail the run
        return None


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread (elsewhere, or
    where signals cannot be handled, the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
