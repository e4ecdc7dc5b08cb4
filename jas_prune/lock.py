"""One writer per run directory: an exclusive advisory lock on ``<run>/.jas-prune.lock``.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<run>/``:data:`LOCK_FILE` (:attr:`RunDir.lock`). The
operating system drops it when the holder's last descriptor closes, so a process that dies in
any way (SIGKILL included) never leaves a stale lock. Only ``flock`` decides whether the
directory is locked; the holder's pid, host, command and start time, written into the file
after locking, serve only the message that refuses a second writer.

Order for a caller::

    validate the arguments           (nothing on disk yet)
    create the run directory         (mkdir; or ``acquire(create=True)``)
    lock = RunDirLock(out).acquire("recipe run")   # refused at once if another process holds it
    check what the directory holds   (recipe.yaml, fingerprints, metrics.json)
    write                            (recipe.yaml, run.log, ...)
    lock.release()                   (or leave it to the process exit)

Acquiring creates the lock file and nothing else; the file stays after release (removing it
would let two processes lock two different files of the same name). Under torchrun only rank
0 holds the lock. A process forked while the lock is held (a ``DataLoader`` worker) closes its
copy of the descriptor at once, so the lock never outlives the process that took it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from .errors import OutputDirError, RunDirLockedError
from .io import storage_error, storage_errors

__all__ = ["RunDirLock", "holder_description", "LOCK_FILE"]

#: the lock file inside a run directory (it stays after a run; only ``flock`` decides)
LOCK_FILE = ".jas-prune.lock"

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: Longest command line quoted in the refusal message.
_MAX_COMMAND = 160

#: Locks held by this process, closed in a forked child (see :func:`_close_in_child`).
_HELD: "weakref.WeakSet[RunDirLock]" = weakref.WeakSet()


class RunDirLock:
    """The exclusive lock on one run directory.

    Args:
        run_dir: the run directory (``--out``) or its :class:`~jas_prune.rundir.RunDir`.

    Use as ``lock = RunDirLock(out).acquire("recipe run")`` ... ``lock.release()``, or as a
    context manager: ``with RunDirLock(out).acquire("report"):`` (``with RunDirLock(out):``
    acquires with the default ``what``).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root: Path = Path(run_dir)  # a path or a RunDir (os.PathLike)
        self.path: Path = self.root / LOCK_FILE
        self._fd: int | None = None
        self._owner: int | None = None

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.root)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (in this process)."""
        return self._fd is not None and self._owner == os.getpid()

    def acquire(self, what: str = "jas-prune run", *, create: bool = False) -> "RunDirLock":
        """Take the lock or refuse at once; returns ``self``.

        Args:
            what: what the holder does, for another process's refusal message (``recipe run``,
                ``report``).
            create: create the run directory (and its parents) first; otherwise it must exist.

        Raises:
            RunDirLockedError: another process, or another :class:`RunDirLock` of this process,
                holds it (one line naming the directory and the holder).
            OutputDirError: the directory does not exist (``create=False``), is a file, or its
                file system cannot lock.
            StorageError: the lock file cannot be created (read-only, permission, no space).
            RuntimeError: this object already holds the lock.
        """
        if self.held:
            raise RuntimeError(f"{self.root}: this RunDirLock already holds the lock")
        if create:
            with storage_errors(self.path):
                self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            reason = "is a file, not a directory" if self.root.exists() else "does not exist"
            raise OutputDirError(f"{self.root}: cannot lock the run directory: it {reason}")
        fd, open_error = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise RunDirLockedError(f"{self.root}: in use by another jas-prune process "
                                    f"({holder_description(info)}); wait for it to finish or stop "
                                    "it, then rerun") from None
        except OSError as exc:  # ENOLCK and friends: a file system without locks
            os.close(fd)
            raise OutputDirError(f"{self.root}: cannot lock {self.path.name} ({exc.strerror or exc}); "
                                 "use an --out on a local file system") from None
        try:
            if open_error is not None:  # opened read-only and nobody holds it: we cannot write here
                raise open_error
            with storage_errors(self.path):
                _write_info(fd, what)
        except BaseException:
            os.close(fd)  # closing the only descriptor drops the lock
            raise
        self._fd, self._owner = fd, os.getpid()
        _HELD.add(self)
        return self

    def release(self) -> None:
        """Drop the lock (no-op when not held). The lock file stays, emptied."""
        fd, owner = self._fd, self._owner
        self._fd = self._owner = None
        _HELD.discard(self)
        if fd is None:
            return
        if owner == os.getpid():
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass  # the holder description is only informative
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunDirLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _open(self) -> tuple[int, Exception | None]:
        """The lock file opened for writing (created when missing), and no error.

        When it cannot be opened for writing (someone else's directory, a read-only file
        system) but exists, it is opened read-only so that a holder can still be named; the
        error to raise if nobody holds it comes back with it.
        """
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o644), None
        except OSError as exc:
            error: Exception = storage_error(self.path, exc) or exc
            try:
                return os.open(self.path, os.O_RDONLY | _O_CLOEXEC), error
            except OSError:
                pass
            if error is exc:
                raise
            raise error from exc


def holder_description(info: dict[str, Any] | None) -> str:
    """``pid 123 on host, recipe run started 2026-01-02 03:04:05 +0000: jas-prune recipe run ...``.

    The lock file's content is only trusted for this text, and made one line; a description
    naming a process of this host that no longer exists (a holder killed before a new one
    wrote its own) counts as none.
    """
    if not info or "pid" not in info or not _alive(info):
        return "the holder has not written its name yet"
    text = f"pid {info.get('pid')} on {info.get('host', '?')}, {info.get('what', 'a run')}"
    if info.get("started"):
        text += f" started {info['started']}"
    if info.get("command"):
        text += f": {info['command']}"
    text = " ".join(str(text).split())
    return text if len(text) <= 2 * _MAX_COMMAND else text[:2 * _MAX_COMMAND - 3] + "..."


def _alive(info: dict[str, Any]) -> bool:
    """False only when ``info`` names a process of this host that does not exist."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _info(what: str) -> dict[str, Any]:
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0])
    argv[0] = f"python -m {prog.parent.name}" if prog.name == "__main__.py" else prog.name
    command = " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])])
    command = " ".join(command.split())  # one line
    if len(command) > _MAX_COMMAND:
        command = command[:_MAX_COMMAND - 3] + "..."
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": " ".join(str(what).split()),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "started_unix": round(time.time(), 3),
    }


def _write_info(fd: int, what: str) -> None:
    data = (json.dumps(_info(what), sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_info(fd: int) -> dict[str, Any] | None:
    """The holder description in the lock file (``None`` when empty or half-written)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _close_in_child() -> None:
    """In a forked child: close the inherited lock descriptors without unlocking.

    ``flock`` belongs to the open file, which a fork shares: a child left holding a copy would
    keep the lock after its parent died. Closing the copy leaves the parent's lock in place.
    """
    for lock in list(_HELD):
        fd = lock._fd
        lock._fd = lock._owner = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
