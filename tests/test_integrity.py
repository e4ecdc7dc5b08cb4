"""Run-directory integrity building blocks: OS write errors as user errors, checksums of written
files, and the one-writer lock (with real processes: a holder, a refused second writer, SIGKILL)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jas_prune import io
from jas_prune.errors import (MetricsSchemaError, OutputDirError, RunDirLockedError, StorageError,
                              TamperedFileError)
from jas_prune.lock import RunDirLock
from jas_prune.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ---------------------------------------------------------------------------------------------
# OS write errors


FULL = "free space and rerun with --resume"


def _denied(path: Path) -> str:
    return f"choose a writable --out, or make {path.parent} writable and rerun with --resume"


CASES = [
    (errno.ENOSPC, "no space left on device (ENOSPC)", None),
    (errno.EDQUOT, "disk quota exceeded (EDQUOT)", None),
    (errno.EROFS, "read-only file system (EROFS)", "denied"),
    (errno.EACCES, "permission denied (EACCES)", "denied"),
    (errno.EPERM, "operation not permitted (EPERM)", "denied"),
]


def _expected(path: Path, meaning: str, kind: str | None) -> str:
    return f"cannot write {path}: {meaning}; {_denied(path) if kind else FULL}"


@pytest.mark.parametrize("code,meaning,kind", CASES)
def test_os_refusal_in_a_writer_is_one_line_and_leaves_old_file(tmp_path, code, meaning, kind):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError(code, os.strerror(code), tmp)

    with pytest.raises(StorageError) as info:
        io.atomic_write(target, half_then_fail)
    assert str(info.value) == _expected(target, meaning, kind)
    assert isinstance(info.value.__cause__, OSError)  # kept for the run log's traceback
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left


@pytest.mark.parametrize("function", ["text", "json", "bytes"])
def test_enospc_at_flush_from_every_atomic_writer(tmp_path, monkeypatch, function):
    """A full disk often shows only when the data reaches it (fsync): still one line, no temp."""
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "sub" / "report.md"
    write = {"text": lambda: io.atomic_write_text(target, "x" * 100),
             "json": lambda: io.atomic_write_json(target, {"a": 1}),
             "bytes": lambda: io.atomic_write_bytes(target, b"x")}[function]
    with pytest.raises(StorageError, match=r"^cannot write .*report\.md: no space left on device \(ENOSPC\); "
                                           r"free space and rerun with --resume$"):
        write()
    assert list(target.parent.iterdir()) == []


def test_temporary_file_that_cannot_be_created(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = tmp_path / "recipe.yaml"
    with pytest.raises(StorageError) as info:
        io.atomic_write_text(target, "x")
    assert str(info.value) == _expected(target, "permission denied (EACCES)", "denied")
    assert not target.exists()


def test_other_errors_stay_what_they_are(tmp_path):
    def broken(tmp: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        io.atomic_write(tmp_path / "a.bin", broken)
    assert not isinstance(info.value, StorageError) and info.value.errno == errno.EIO
    with pytest.raises(ZeroDivisionError):
        io.atomic_write(tmp_path / "a.bin", lambda tmp: 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_no_space_is_a_storage_error(tmp_path, monkeypatch):
    """safetensors' Rust writer raises SafetensorError without an errno ("(os error 28)")."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = tmp_path / "pruned-jas-r50.safetensors"

    def full(tmp: str) -> None:
        save_file({"w": torch.zeros(4)}, tmp)  # a real partial write, then the refusal
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(StorageError) as info:
        io.atomic_write(target, full)
    assert str(info.value) == _expected(target, "no space left on device (ENOSPC)", None)
    assert list(tmp_path.iterdir()) == []
    # a SafetensorError that is not an OS refusal stays as it is
    with pytest.raises(SafetensorError):
        with io.storage_errors(target):
            raise SafetensorError("header too large")


def test_storage_errors_wraps_any_writer_and_takes_advice(tmp_path):
    target = tmp_path / "dense.onnx"
    with pytest.raises(StorageError) as info:
        with io.storage_errors(target, advice="free space and export again"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(info.value) == f"cannot write {target}: disk quota exceeded (EDQUOT); free space and export again"
    with io.storage_errors(target):  # nothing raised: nothing happens
        pass
    assert io.storage_error(target, ValueError("x")) is None
    # a library error raised *from* an OS refusal (export_onnx: RuntimeError("... failed") from OSError)
    with pytest.raises(StorageError, match=r"no space left on device \(ENOSPC\); free space"):
        with io.storage_errors(target):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise RuntimeError("ONNX export with the dynamo exporter failed") from exc
    # ... but not one that merely happened while an OS error was being handled
    with pytest.raises(RuntimeError):
        with io.storage_errors(target):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("unrelated")
    assert isinstance(io.storage_error(target, OSError(errno.ENOSPC, "x")), StorageError)


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions")
def test_read_only_directory_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError) as info:
            io.atomic_write_text(ro / "metrics.json", "{}")
        assert str(info.value) == _expected(ro / "metrics.json", "permission denied (EACCES)", "denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# checksums of written files


def test_sha256_file_streams_and_agrees_with_hashlib(tmp_path):
    data = os.urandom(10_000)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert io.sha256_file(p, chunk_size=333) == hashlib.sha256(data).hexdigest() == io.sha256_file(p)
    (tmp_path / "empty").write_bytes(b"")
    assert io.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def _written(run: Path, name: str, data: bytes) -> dict:
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return io.file_record(path, run)


def test_file_record_and_an_unchanged_file(tmp_path):
    rec = _written(tmp_path, "pruned-jas-r50.safetensors", b"abc" * 1000)
    assert rec == {"file": "pruned-jas-r50.safetensors", "bytes": 3000,
                   "sha256": hashlib.sha256(b"abc" * 1000).hexdigest()}
    assert json.loads(json.dumps(rec)) == rec  # goes into metrics.json as it is
    io.check_file_record(tmp_path, rec)
    sub = _written(tmp_path, "onnx/dense.onnx", b"x")
    assert sub["file"] == "onnx/dense.onnx" and RunDir(tmp_path).file(sub["file"]).is_file()
    io.check_file_record(tmp_path, sub)
    assert io.file_record(tmp_path / "onnx" / "dense.onnx")["file"] == "dense.onnx"


def test_changed_files_are_named_with_what_changed(tmp_path):
    rec = _written(tmp_path, "dense.onnx", b"0123456789")
    path = tmp_path / "dense.onnx"

    path.write_bytes(b"01234")  # truncated
    with pytest.raises(TamperedFileError) as info:
        io.check_file_record(tmp_path, rec)
    assert str(info.value) == f"{path}: changed since it was written (5 bytes, 10 recorded in metrics.json)"

    path.write_bytes(b"0123456788")  # same size, one byte different
    with pytest.raises(TamperedFileError) as info:
        io.check_file_record(tmp_path, rec, recorded_in="model.json")
    assert str(info.value) == (f"{path}: changed since it was written (its SHA-256 differs from the one "
                               "recorded in model.json)")

    path.unlink()
    with pytest.raises(TamperedFileError) as info:
        io.check_file_record(tmp_path, rec)
    assert str(info.value) == (f"{path}: missing (recorded in metrics.json with 10 bytes); it was deleted "
                               "or moved since it was written")


@pytest.mark.parametrize("record", [
    {"file": "a", "bytes": 1},
    {"file": "a", "bytes": "1", "sha256": "0" * 64},
    {"file": "a", "bytes": True, "sha256": "0" * 64},
    {"file": "a", "bytes": 1, "sha256": "xyz"},
    {"file": "", "bytes": 1, "sha256": "0" * 64},
])
def test_malformed_records_are_refused(tmp_path, record):
    with pytest.raises(MetricsSchemaError, match=r"^metrics\.json: not a file record \(expected file, bytes, sha256\)"):
        io.check_file_record(tmp_path, record)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "a/../../b"])
def test_records_cannot_point_outside_the_run(tmp_path, name):
    with pytest.raises(MetricsSchemaError, match="points outside the run directory"):
        io.check_file_record(tmp_path, {"file": name, "bytes": 1, "sha256": "0" * 64})


# ---------------------------------------------------------------------------------------------
# the one-writer lock, with real processes

HOLDER = textwrap.dedent("""
    import json, os, sys, time
    from jas_prune.lock import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire("recipe run")
    if len(sys.argv) > 2 and sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:  # a DataLoader worker, say: outlives nothing, must not keep the lock
            time.sleep(60)
            os._exit(0)
        print("child", child, flush=True)
    print(json.dumps(json.loads(lock.path.read_text())), flush=True)
    time.sleep(60)
""")

TRY = textwrap.dedent("""
    import sys
    from jas_prune.errors import JasPruneError
    from jas_prune.lock import RunDirLock
    try:
        RunDirLock(sys.argv[1]).acquire("report")
    except JasPruneError as exc:
        print(type(exc).__name__ + ": " + str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    print("acquired")
""")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "second.py").write_text(TRY)
    return tmp_path


def _start_holder(scripts: Path, run: Path, *extra: str) -> tuple[subprocess.Popen, dict, int | None]:
    proc = subprocess.Popen([sys.executable, str(scripts / "holder.py"), str(run), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    child = None
    line = proc.stdout.readline()
    if line.startswith("child "):
        child = int(line.split()[1])
        line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line), child


def _second(scripts: Path, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(scripts / "second.py"), str(run)], capture_output=True, text=True,
                          env=_env(), timeout=60)


def _refusal(run: Path, info: dict) -> str:
    return (f"{run}: in use by another jas-prune process (pid {info['pid']} on {info['host']}, recipe run "
            f"started {info['started']}: {info['command']}); wait for it to finish or stop it, then rerun")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_second_process_is_refused_at_once_naming_the_holder(scripts, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("version: 1\n")
    holder, info, _ = _start_holder(scripts, run)
    try:
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert info["command"] == f"holder.py {run}" and info["what"] == "recipe run"
        lock_bytes = RunDir(run).lock.read_bytes()
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        t = time.perf_counter()
        second = _second(scripts, run)
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [f"RunDirLockedError: {_refusal(run, info)}"]
        assert second.stdout == ""
        assert time.perf_counter() - t < 30  # refused, not waiting for the holder (which sleeps 60 s)
        # the refused process wrote, created and renamed nothing
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
        assert RunDir(run).lock.read_bytes() == lock_bytes
        # and so is this process
        with pytest.raises(RunDirLockedError) as err:
            RunDirLock(run).acquire()
        assert str(err.value) == _refusal(run, info)
    finally:
        _kill(holder)


def test_sigkill_never_leaves_a_stale_lock(scripts, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder, info, _ = _start_holder(scripts, run)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    _kill(holder)
    # the dead holder's description is still in the file: only flock decides
    assert json.loads(RunDir(run).lock.read_text())["pid"] == info["pid"]
    second = _second(scripts, run)
    assert second.returncode == 0 and second.stdout == "acquired\n", second.stderr


def test_a_forked_child_does_not_keep_the_lock(scripts, tmp_path):
    """flock belongs to the open file, which fork shares: the child closes its copy at once."""
    run = tmp_path / "run"
    run.mkdir()
    holder, info, child = _start_holder(scripts, run, "fork")
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the child still runs
        lock = RunDirLock(run).acquire()
        lock.release()
    finally:
        _kill(holder)
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_same_process_double_acquire_and_release(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = RunDirLock(run).acquire("recipe run")
    assert first.held and sorted(p.name for p in run.iterdir()) == [RunDir.LOCK]
    info = json.loads(first.path.read_text())
    assert info["pid"] == os.getpid() and info["what"] == "recipe run"
    with pytest.raises(RunDirLockedError) as err:
        RunDirLock(RunDir(run)).acquire()
    assert str(err.value) == (f"{run}: in use by another jas-prune process (pid {os.getpid()} on "
                              f"{socket.gethostname()}, recipe run started {info['started']}: "
                              f"{info['command']}); wait for it to finish or stop it, then rerun")
    assert isinstance(err.value, OutputDirError)  # the CLI's exit code 2
    with pytest.raises(RuntimeError, match="already holds"):
        first.acquire()
    first.release()
    assert not first.held and first.path.read_bytes() == b""  # the file stays, emptied
    first.release()  # twice is harmless
    with RunDirLock(run).acquire("report") as again:
        assert again.held
        with pytest.raises(RunDirLockedError):
            RunDirLock(run).acquire()
    assert not again.held
    with RunDirLock(run) as third:
        assert third.held


def test_lock_content_is_never_trusted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunDir(run).lock.write_text('{"pid": 1, "host": "elsewhere"}\n')  # stale: nobody holds it
    lock = RunDirLock(run).acquire()
    RunDir(run).lock.write_text("garbage")  # held, but the description is unreadable
    with pytest.raises(RunDirLockedError) as err:
        RunDirLock(run).acquire()
    assert str(err.value) == (f"{run}: in use by another jas-prune process (the holder has not written "
                              "its name yet); wait for it to finish or stop it, then rerun")
    lock.release()


def test_directory_must_exist_unless_created(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(OutputDirError) as err:
        RunDirLock(run).acquire()
    assert str(err.value) == f"{run}: cannot lock the run directory: it does not exist"
    assert not run.parent.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="it is a file, not a directory"):
        RunDirLock(tmp_path / "file").acquire()
    lock = RunDirLock(run).acquire(create=True)
    assert sorted(p.name for p in run.iterdir()) == [RunDir.LOCK]
    lock.release()


def test_lock_file_that_cannot_be_created(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def read_only_fs(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_fs)
    lock_path = RunDir(run).lock
    with pytest.raises(StorageError) as err:
        RunDirLock(run).acquire()
    assert str(err.value) == _expected(lock_path, "read-only file system (EROFS)", "denied")
    assert list(run.iterdir()) == []
    # an existing lock file there that nobody holds: still refused as a write, not locked
    monkeypatch.undo()
    lock_path.write_text("")
    monkeypatch.setattr(os, "open", read_only_fs)
    with pytest.raises(StorageError, match="read-only file system"):
        RunDirLock(run).acquire()
    # ... and one that another process holds is still reported as locked, naming the holder
    monkeypatch.undo()
    holder = RunDirLock(run).acquire("recipe run")
    monkeypatch.setattr(os, "open", read_only_fs)
    try:
        with pytest.raises(RunDirLockedError, match=rf"pid {os.getpid()} on "):
            RunDirLock(run).acquire()
    finally:
        monkeypatch.undo()
        holder.release()


def test_a_dead_holders_description_is_not_shown(tmp_path):
    """Between a new holder's flock and its own description, the file may still name a killed
    one: a process of this host that no longer exists is not named."""
    run = tmp_path / "run"
    run.mkdir()
    lock = RunDirLock(run).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    RunDir(run).lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "what": "x"}))
    try:
        with pytest.raises(RunDirLockedError, match=r"\(the holder has not written its name yet\)"):
            RunDirLock(run).acquire()
        RunDir(run).lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "what": "report\nrun",
                                                "command": "a\nb"}))
        with pytest.raises(RunDirLockedError) as err:
            RunDirLock(run).acquire()
        assert "\n" not in str(err.value) and "(pid 1 on elsewhere, report run: a b);" in str(err.value)
    finally:
        lock.release()
