"""Multi-process runs under ``torchrun`` and clean stops on SIGTERM.

``torchrun --nproc_per_node=N -m jas_prune recipe run RECIPE --out DIR`` starts N copies of the
command; each finds its rank in torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``). The ranks share the locating work (chunk by chunk) and rank 0 does everything
else. They meet only at the end of *stages* (:meth:`Dist.stage`): every rank goes through the
same sequence of stages, each runs a block (work for every rank, or for rank 0 alone while the
others wait) and then every rank learns every other rank's outcome. A failure on one rank therefore stops all of them with a message naming
the rank, instead of leaving the others waiting; a rank that dies without a word (SIGKILL, out
of memory) is noticed when the stage's timeout expires (``JAS_PRUNE_DIST_TIMEOUT`` seconds,
default 1800), if torchrun has not already stopped the others.

The default process group uses gloo on CPU and NCCL on CUDA (one GPU per rank: ``LOCAL_RANK``);
the stage agreements travel over a gloo group, so they never touch the GPU.

:func:`sigterm_raises` turns SIGTERM into :class:`Interrupted` (a ``BaseException``, like
``KeyboardInterrupt``): the chunk being written is abandoned atomically (see
:func:`jas_prune.io.atomic_write`), the run logs how to resume and the CLI exits with code 143.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .errors import JasPruneError, StageNotAvailableError

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


class PeerFailedError(JasPruneError):
    """Another rank failed; this rank stops with the same exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """The process received SIGTERM (exit code 143 = 128 + 15)."""

    exit_code = 143

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


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
        backend: ``gloo`` or ``nccl``; ``None`` for a one-process run.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    _control: Any = field(default=None, repr=False)
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

    def stage(self, what: str) -> contextlib.AbstractContextManager["Step"]:
        """A block every rank runs, followed by an agreement on its outcome.

        Use ``if dist.is_root:`` inside for work of rank 0 alone: the other ranks then just wait
        for it. Set ``step.value`` inside to share a small picklable value: after the block,
        ``step.values`` holds every rank's, by rank.

        Raises:
            The rank's own exception, once the others know of it; :class:`PeerFailedError` when
            another rank failed (naming it, with its exit code) or cannot be reached in time.
        """
        return self._stage(what)

    @contextlib.contextmanager
    def _stage(self, what: str) -> Iterator["Step"]:
        step = Step()
        try:
            yield step
        except BaseException as exc:  # noqa: BLE001 - told to the others, then re-raised
            self._agree(what, step, exc)
            raise
        self._agree(what, step, None)

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
        for r, (_, failure) in enumerate(gathered):
            if failure is not None:
                raise PeerFailedError(f"rank {r} failed while {what}: {failure['message']}",
                                      exit_code=failure["exit_code"])
        step.values = [v for v, _ in gathered]

    def release(self) -> None:
        """The other ranks are gone (their part is done): later stages run on this rank alone."""
        self._released = True

    def close(self) -> None:
        """Destroy the process group this module created (a no-op for a one-process run)."""
        if not (self.enabled and self._owned):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def init_from_env(device: torch.device) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; a one-process :class:`Dist` otherwise.

    Args:
        device: the resolved ``runtime.device``: ``cpu`` -> gloo, ``cuda`` -> NCCL with this rank
            on GPU ``LOCAL_RANK`` (made the current device, so ``cuda`` means that GPU).

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
        backend = "nccl"
    else:
        backend = "gloo"
    owned = not dist.is_initialized()  # a caller's own process group is used, and left alone
    if owned:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    else:
        backend = str(dist.get_backend())
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank=rank, world=world, local_rank=local_rank, backend=backend, _control=control, _owned=owned)


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
