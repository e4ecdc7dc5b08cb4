"""Safe file writing: atomic writes, OS write errors as user errors, checksums of written files.

Atomic writes go to a temporary file in the same folder and are renamed into place, so a crash
never leaves a half-written file that a later ``--resume`` would trust. A write the operating
system refuses (no space, quota, read-only file system, permission) becomes a one-line
:class:`~jas_prune.errors.StorageError` naming the file (:func:`storage_errors`), and the
temporary file is removed. :func:`file_record` / :func:`check_file_record` give the size and
SHA-256 of a written file and tell later whether it changed.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping

from .errors import MetricsSchemaError, OutputDirError, StorageError, TamperedFileError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "to_jsonable",
    "writable_dir",
    "storage_errors",
    "storage_advice",
    "storage_error",
    "make_dir",
    "refuse_system_dir",
    "sha256_file",
    "file_record",
    "check_file_record",
]

def refuse_system_dir(directory: str | os.PathLike[str], label: str) -> None:
    """Refuse the file-system root and the home directory as an output directory (a run or a
    data set written there spreads its files among the user's own).

    Raises:
        OutputDirError: naming ``label`` and what the directory is.
    """
    path = Path(directory).expanduser().resolve()
    what = ("the file-system root" if path == Path(path.anchor) else
            "your home directory" if path == Path.home().resolve() else None)
    if what is not None:
        raise OutputDirError(f"{label}: is {what}; choose a new directory for the output")


def make_dir(directory: str | os.PathLike[str], label: str) -> Path:
    """Create ``directory`` (and its parents) if needed; nothing else is written.

    Raises:
        OutputDirError: naming ``label`` and the reason (a file in the way, no permission).
    """
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputDirError(f"{label}: cannot write there ({blocker} is a file, not a directory)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{label}: cannot write there ({exc.strerror or exc})") from None
    return directory


def writable_dir(directory: str | os.PathLike[str], label: str) -> Path:
    """Create ``directory`` if needed and check that files can be written into it.

    Args:
        directory: the folder to write into.
        label: what the user passed, for the message (e.g. ``--out run/model.onnx``).

    Raises:
        OutputDirError: naming ``label`` and the reason.
    """
    directory = make_dir(directory, label)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=str(directory))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"{label}: cannot write there ({exc.strerror or exc})") from None
    return directory


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], None], *,
                 advice: str | None = None) -> Path:
    """Call ``writer(tmp_path)`` then atomically move the result to ``path``.

    On any failure (an exception, Ctrl-C, SIGTERM turned into an exception) the temporary file
    is removed and ``path`` keeps its previous content. An OS refusal (see :func:`storage_errors`)
    is raised as :class:`~jas_prune.errors.StorageError` naming ``path``; ``advice`` replaces the
    default "how to continue" part of that message.
    """
    path = Path(path)
    with storage_errors(path, advice=advice):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        os.close(fd)
        try:
            writer(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, advice: str | None = None) -> Path:
    """Write ``data`` atomically (flushed to disk before the rename).

    Writers whose library hides the OS error (``safetensors.torch.save_file`` raises
    ``SafetensorError`` without an errno) can serialise to bytes (``safetensors.torch.save``)
    and write them here, so a full disk is reported as the OS reports it.
    """
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _w, advice=advice)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str, *, advice: str | None = None) -> Path:
    """Write ``text`` (UTF-8) atomically, flushed to disk before the rename."""
    return atomic_write_bytes(path, text.encode("utf-8"), advice=advice)


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, tuples and paths to plain JSON; NaN/Inf to null."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch / numpy
        return to_jsonable(obj.tolist())
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, advice: str | None = None) -> Path:
    """Write ``obj`` (through :func:`to_jsonable`) as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n",
                             advice=advice)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# OS write errors as user errors

#: errno -> (its meaning, on one line; whether freeing space is the remedy).
_STORAGE_ERRNOS: dict[int, tuple[str, bool]] = {
    errno.ENOSPC: ("no space left on device", True),
    errno.EDQUOT: ("disk quota exceeded", True),
    errno.EROFS: ("read-only file system", False),
    errno.EACCES: ("permission denied", False),
    errno.EPERM: ("operation not permitted", False),
}
#: How a library without errno (safetensors' Rust writer) reports the OS error in its message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of an OS write failure, also when a library re-raised it without one.

    ``safetensors`` raises ``SafetensorError("... No space left on device (os error 28)")``:
    the only place its errno survives is the message, so that one type is read by its text.
    An error raised ``from`` an OS error (``RuntimeError("ONNX export ... failed") from
    OSError(ENOSPC)``) has the errno of its cause.
    """
    for _ in range(8):  # the explicit cause chain, not exceptions merely handled on the way
        if exc is None:
            return None
        if isinstance(exc, OSError):
            if exc.errno in _STORAGE_ERRNOS:
                return exc.errno
        elif type(exc).__name__ == "SafetensorError":
            found = _RUST_OS_ERROR.search(str(exc))
            if found:
                return int(found.group(1))
        exc = exc.__cause__
    return None


def storage_error(path: str | os.PathLike[str], exc: BaseException, *,
                  advice: str | None = None) -> StorageError | None:
    """The :class:`~jas_prune.errors.StorageError` for ``exc`` raised while writing ``path``.

    ``None`` when ``exc`` is not one of the refusals handled here (ENOSPC, EDQUOT, EROFS,
    EACCES, EPERM): other OS errors stay what they are.

    The message is ``cannot write PATH: <meaning> (<ERRNO NAME>); <advice>``, with the default
    advice "free space and rerun with --resume" (no space, quota) or "choose a writable --out,
    or make DIR writable and rerun with --resume" (read-only, permission).
    """
    code = _errno_of(exc)
    if code not in _STORAGE_ERRNOS:
        return None
    meaning, space = _STORAGE_ERRNOS[code]
    path = Path(path)
    if advice is None:
        advice = _ADVICE.get()
    if advice is None:
        advice = ("free space and rerun with --resume" if space else
                  f"choose a writable --out, or make {path.parent} writable and rerun with --resume")
    return StorageError(f"cannot write {path}: {meaning} ({errno.errorcode[code]}); {advice}")


#: the advice of storage errors raised where no writer gave one (see :func:`storage_advice`)
_ADVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jas_prune_storage_advice", default=None)


@contextmanager
def storage_advice(advice: str) -> Iterator[None]:
    """Within the block, storage errors end with ``advice`` instead of "... rerun with --resume"
    (for commands that have no ``--resume``, e.g. ``jas-prune export onnx``)."""
    token = _ADVICE.set(advice)
    try:
        yield
    finally:
        _ADVICE.reset(token)


@contextmanager
def storage_errors(path: str | os.PathLike[str], *, advice: str | None = None) -> Iterator[None]:
    """Turn an OS refusal to write ``path`` into a one-line :class:`~jas_prune.errors.StorageError`.

    Wrap any writer with it (``safetensors`` ``save_file``, ``torch.onnx.export``, a figure's
    ``savefig``)::

        with storage_errors(run.onnx("dense")):
            torch.onnx.export(..., tmp_path)

    It does not remove what the writer left behind: write to a temporary name (or use
    :func:`atomic_write`, which does both) and remove it on failure.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - OSError or a library's wrapper of one
        err = storage_error(path, exc, advice=advice)
        if err is None:
            raise
        raise err from exc


# --------------------------------------------------------------------------------------------
# checksums of written files


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (memory stays at ``chunk_size``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"file": name, "bytes": size, "sha256": hex}`` of a file just written.

    ``name`` is the path relative to ``root`` (the run directory) in ``/`` form, as
    ``RunDir.file(name)`` reads it back; without ``root`` it is the file's own name.
    """
    path = Path(path)
    name = path.name if root is None else path.relative_to(root).as_posix()
    size = path.stat().st_size
    return {"file": name, "bytes": size, "sha256": sha256_file(path)}


def check_file_record(run_dir: str | os.PathLike[str], record: Mapping[str, Any], *,
                      recorded_in: str = "metrics.json") -> None:
    """Refuse a file that changed since :func:`file_record` described it.

    The size is compared first (no hashing when it differs), then the SHA-256.

    Raises:
        TamperedFileError: ``PATH: missing ...``, ``PATH: changed since it was written (N bytes,
            M recorded in metrics.json)`` or ``PATH: changed since it was written (its SHA-256
            differs from the one recorded in metrics.json)``.
        MetricsSchemaError: ``record`` is not a file record (a key missing or of the wrong type,
            or a name outside the run directory).
    """
    name, size, digest = record.get("file"), record.get("bytes"), record.get("sha256")
    if not (isinstance(name, str) and name and isinstance(size, int) and not isinstance(size, bool)
            and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise MetricsSchemaError(f"{recorded_in}: not a file record (expected file, bytes, sha256): "
                                 f"{json.dumps(to_jsonable(dict(record)), sort_keys=True)[:300]}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise MetricsSchemaError(f"{recorded_in}: file record {name!r} points outside the run directory")
    path = Path(run_dir, *rel.parts)
    if not path.is_file():
        raise TamperedFileError(f"{path}: missing (recorded in {recorded_in} with {size} bytes); "
                                "it was deleted or moved since it was written")
    actual = path.stat().st_size
    if actual != size:
        raise TamperedFileError(f"{path}: changed since it was written ({actual} bytes, "
                                f"{size} recorded in {recorded_in})")
    if sha256_file(path) != digest:
        raise TamperedFileError(f"{path}: changed since it was written (its SHA-256 differs from "
                                f"the one recorded in {recorded_in})")
