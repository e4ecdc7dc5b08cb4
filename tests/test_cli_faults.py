"""Faults through the real CLI (issue 13): one writer per run directory, nothing written before a
run's checks pass, refused writes (no space, ...) as one line with exit code 2, a kill inside a
stage followed by ``--resume``, and files that changed since the run wrote them.

Runs use a tiny random-init ``builtin:shapes-vit`` (the ``tiny`` fixture here, and the same
weights in subprocesses through :func:`prepare_subprocess`) and the TorchScript ONNX exporter in
place of the dynamo one (same stage code, a second less per model). Faults are injected by
:func:`install_fault`, in this process through ``monkeypatch`` or in a subprocess through the
driver :data:`DRIVER` (``JAS_FAULT`` in its environment); nothing in jas-prune reads them.

``JAS_FAULT`` forms (SIG is KILL or TERM, signals only in subprocesses):

- ``pause@STAGE``: before STAGE runs, rank 0 writes ``JAS_FAULT_MARK`` (its pid and rank), then sleeps;
- ``signal@STAGE:SIG``: before STAGE runs, this process gets SIG;
- ``signal@call=MODULE:NAME/N:SIG``: right after the N-th call of ``MODULE.NAME`` returns;
- ``signal@rename=GLOB:SIG``: just before a finished file named GLOB is renamed into place;
- ``enospc@NAME``: writing the file NAME fails with "no space left on device", at the lowest level
  of its writer: ``os.fsync`` (atomic text/JSON writes), safetensors' ``save_file`` (its
  ``SafetensorError ... (os error 28)``), ``torch.onnx.export``, matplotlib's ``savefig``, and
  the stream of ``run.log``'s handler.

STAGE is a pipeline stage name or ``report``.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=48)

RECIPE = """version: 1
data: {images_per_class: 2, batch_size: 64}
attribution: {method: jas, steps: 1, scope: all, formula: ig}
masks: {topk: 2}
prune: {methods: [jas, magnitude], ratios: [0.5]}
export: {onnx: {verify: true, benchmark: false, providers: [cpu]}}
runtime: {device: cpu, seed: 0}
"""
DENSE = "version: 1\ndata: {images_per_class: 2}\nruntime: {device: cpu, seed: 0}\n"
FULL = "free space and rerun with --resume"

Patch = Callable[[Any, str, Any], None]


# ---------------------------------------------------------------------------------------------
# fault injection (this process and subprocesses)


def _fire(sig: str) -> None:
    os.kill(os.getpid(), {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}[sig])
    time.sleep(60)  # SIGKILL never comes back; SIGTERM raises from here


def _mark() -> None:
    path = os.environ["JAS_FAULT_MARK"]
    with open(path + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "rank": int(os.environ.get("RANK", "0"))}, f)
    os.replace(path + ".tmp", path)


def _wrap_stage(name: str, patch: Patch, before: Callable[[], None] | None = None,
                start: Callable[[], None] | None = None) -> None:
    import dataclasses

    if name == "report":
        import jas_prune.reporting as reporting

        real_report = reporting.write_report

        def report(*args, **kwargs):
            before()
            return real_report(*args, **kwargs)

        patch(reporting, "write_report", report)
        return
    from jas_prune.pipeline.stages import STAGES

    stage = STAGES.get(name)

    def run(ctx):
        if before is not None:
            before()
        if start is not None:
            start()
        return stage.run(ctx)

    entries = dict(STAGES._entries)
    entries[name] = dataclasses.replace(stage, run=run)
    patch(STAGES, "_entries", entries)


def _matches(name: Any, target: str) -> bool:
    """``name`` is ``target`` or one of its writers' temporary names (``.NAME.XXXX.tmp`` of an
    atomic write, ``.STEM.tmp-PID.onnx`` of the ONNX exporter)."""
    base = os.path.basename(os.fspath(name))
    stem, _, suffix = target.rpartition(".")
    return (fnmatch.fnmatch(base, target) or fnmatch.fnmatch(base, f".{target}.*.tmp")
            or fnmatch.fnmatch(base, f".{stem}.tmp-*.{suffix}"))


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install_enospc(target: str, patch: Patch) -> None:
    import logging

    import matplotlib.figure
    import safetensors.torch as st
    import torch.onnx
    from safetensors import SafetensorError

    real_fsync, real_save_file, real_export = os.fsync, st.save_file, torch.onnx.export
    real_savefig, real_open = matplotlib.figure.Figure.savefig, logging.FileHandler._open

    def fsync(fd):
        if _matches(os.readlink(f"/proc/self/fd/{fd}"), target):
            raise _no_space()
        return real_fsync(fd)

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)  # a real (partial) file, then the refusal
        if _matches(filename, target):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def export(model, args, f, *a, **k):
        if _matches(f, target):
            Path(f).write_bytes(b"\x08" * 100)  # half a file, as a full disk leaves it
            raise _no_space()
        return real_export(model, args, f, *a, **k)

    def savefig(self, fname, *args, **kwargs):
        if _matches(fname, target):
            raise _no_space()
        return real_savefig(self, fname, *args, **kwargs)

    class FullStream(io.StringIO):
        def write(self, text):
            raise _no_space()

    def log_open(self):
        return FullStream() if _matches(self.baseFilename, target) else real_open(self)

    patch(os, "fsync", fsync)
    patch(st, "save_file", save_file)
    patch(torch.onnx, "export", export)
    patch(matplotlib.figure.Figure, "savefig", savefig)
    patch(logging.FileHandler, "_open", log_open)


def install_fault(spec: str, patch: Patch) -> None:
    """Install the fault ``spec`` (module docstring) with ``patch(obj, name, value)``."""
    kind, _, where = spec.partition("@")
    if kind == "enospc":
        _install_enospc(where, patch)
        return
    if kind == "pause":
        def pause() -> None:
            if int(os.environ.get("RANK", "0")) == 0:
                _mark()
                time.sleep(600)

        _wrap_stage(where, patch, before=pause)
        return
    assert kind == "signal", spec
    target, _, sig = where.rpartition(":")
    if target.startswith("call="):
        name, _, n = target[len("call="):].partition("/")
        module_name, _, attr = name.partition(":")
        module = importlib.import_module(module_name)
        real = getattr(module, attr)
        calls = [0]

        def called(*args, **kwargs):
            out = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == int(n):
                _fire(sig)
            return out

        patch(module, attr, called)
    elif target.startswith("rename="):
        pattern, real_replace = target[len("rename="):], os.replace

        def replace(src, dst, *args, **kwargs):
            if fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern):
                _fire(sig)
            return real_replace(src, dst, *args, **kwargs)

        patch(os, "replace", replace)
    else:
        _wrap_stage(target, patch, before=lambda: _fire(sig))


def use_tiny_builtin(weights: Path, patch: Patch, setitem: Callable[[dict, str, Any], None]) -> None:
    """``builtin:shapes-vit`` -> the tiny model whose weights are ``weights`` (as conftest's
    ``tiny_builtin``; the registry dict is changed in place, the modules share it)."""
    from jas_prune import models

    setitem(models.BUILTIN_MODELS, "shapes-vit", dict(models.BUILTIN_MODELS["shapes-vit"], kwargs=dict(TINY_KWARGS)))
    patch(models, "builtin_weights_path", lambda name: weights)


def fast_export(patch: Patch) -> None:
    """The TorchScript ONNX exporter in place of the dynamo one (the stage code is the same)."""
    from jas_prune.deploy import onnx_export

    patch(onnx_export, "_export_dynamo", onnx_export._export_torchscript)


def prepare_subprocess() -> None:
    """What :data:`DRIVER` does before running the CLI: the tiny model, the fast exporter, the fault."""
    torch.set_num_threads(1)
    use_tiny_builtin(Path(os.environ["JAS_FAULT_TINY"]), setattr, dict.__setitem__)
    fast_export(setattr)
    if os.environ.get("JAS_FAULT"):
        install_fault(os.environ["JAS_FAULT"], setattr)


DRIVER = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
import test_cli_faults
test_cli_faults.prepare_subprocess()
from jas_prune.cli import main
sys.argv[0] = "jas-prune"
main()
"""


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny builtin model's weights, patched in for this module's in-process runs."""
    from safetensors.torch import save_file

    from jas_prune import models

    d = tmp_path_factory.mktemp("tiny")
    weights = d / "tiny-shapes-vit.safetensors"
    mp = pytest.MonkeyPatch()
    use_tiny_builtin(weights, mp.setattr, mp.setitem)
    torch.manual_seed(0)
    model = models.create_model("builtin:shapes-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    fast_export(mp.setattr)
    for name, text in (("r.yaml", RECIPE), ("dense.yaml", DENSE), ("driver.py", DRIVER)):
        (d / name).write_text(text)
    yield d
    mp.undo()


def run(tiny: Path, out: Path, *extra: str, recipe: str = "r.yaml", fault: str | None = None,
        report: bool = True) -> int:
    """``jas-prune recipe run`` in this process, on one thread (as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if fault:
                install_fault(fault, mp.setattr)
            if not report:  # seconds of plotting, not what the test is about
                mp.setattr("jas_prune.reporting.write_report", lambda run_dir: Path(run_dir) / "report.md")
            from jas_prune.cli import main

            return main(["recipe", "run", str(tiny / recipe), "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def cli(*args: str) -> int:
    from jas_prune.cli import main

    return main(list(args))


def driver(tiny: Path, *args: str, fault: str | None = None, mark: Path | None = None,
           torchrun: bool = False) -> subprocess.Popen:
    """The real CLI in a subprocess, on the tiny model, with ``fault`` injected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAS_FAULT_TINY": str(tiny / "tiny-shapes-vit.safetensors")}
    env.pop("JAS_FAULT", None)
    if fault:
        env["JAS_FAULT"] = fault
    if mark is not None:
        env["JAS_FAULT_MARK"] = str(mark)
    cmd = [sys.executable, str(tiny / "driver.py"), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               *cmd[1:]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tiny)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def jas_prune(*args: str) -> tuple[int, str, str, float]:
    """``python -m jas_prune ARGS`` (the shipped CLI, no driver): exit code, stdout, stderr, seconds."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "jas_prune", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(mark: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the fault: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the run did not reach the fault"
        time.sleep(0.1)
    return json.loads(mark.read_text())


def stop(proc: subprocess.Popen, grace: float = 0) -> None:
    """Wait ``grace`` seconds for ``proc`` to end, then kill it."""
    try:
        proc.wait(timeout=grace or None) if grace else None
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def snapshot(root: Path, *, lock: bool = True) -> dict[str, Any]:
    """Every file and folder under ``root``: size, mtime and SHA-256 (what "nothing written"
    compares); without the lock file for ``lock=False`` (a run that takes the lock, then is
    refused, writes and empties its holder description)."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not lock and rel == ".jas-prune.lock":
            continue
        if p.is_dir():
            out[rel] = ("dir", p.stat().st_mtime_ns)
        else:
            out[rel] = (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if p.name != ".jas-prune.lock")


def last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


#: metrics that measure time or the history of the run, not results; and the file records of
#: files whose bytes hold such things: a sidecar (the export's seconds) and a safetensors file
#: (the order of its header's metadata is not fixed from one process to the next)
_NOT_RESULTS = {"seconds", "images_per_second", "images_this_run", "chunks_resumed", "world_size",
                "seconds_per_rank", "checkpoint_file", "sidecar_file", "source_sha256", "latency", "torch_latency"}


def results(run: Path) -> dict:
    """The figures of metrics.json (timings and run history aside, file paths by name), the
    checkpoints' tensors and metadata, the ONNX files' bytes."""
    from safetensors import safe_open

    def strip(obj):
        if isinstance(obj, dict):
            return {k: (Path(v).name if k in ("path", "sidecar") and isinstance(v, str) else strip(v))
                    for k, v in obj.items() if k not in _NOT_RESULTS and not k.endswith("_seconds")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    metrics = strip(json.loads((run / "metrics.json").read_text()))
    metrics["export"] = sorted(metrics.get("export") or [], key=lambda r: r["model"])
    out: dict[str, Any] = {"metrics.json": metrics}
    for p in sorted(run.glob("pruned-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
    for p in sorted(run.glob("*.onnx")):
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_results(reference: Path, run: Path) -> None:
    a, b = results(reference), results(run)
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "metrics.json":
            for section in sorted(set(a[key]) | set(b[key])):
                assert a[key].get(section) == b[key].get(section), f"metrics.json {section} differs"
        assert a[key] == b[key], f"{key} differs"


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """An uninterrupted run of :data:`RECIPE` (locate, masks, prune jas + magnitude, export)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(tiny, out) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == ["dense.onnx", "pruned-jas-r50.onnx",
                                                            "pruned-magnitude-r50.onnx"]
    return out


def copy_of(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# one writer per run directory


def _refusal(out: Path, info: dict) -> str:
    return (f"jas-prune: error: {out}: in use by another jas-prune process (pid {info['pid']} on {info['host']}, "
            f"recipe run started {info['started']}: {info['command']}); wait for it to finish or stop it, then rerun")


def test_second_writers_are_refused_at_once_and_write_nothing(tiny, tmp_path):
    """A run paused in its report holds --out: another run, --resume, report and report --combine
    --out on it are refused with exit code 2 and one line naming the holder, nothing in the
    directory changes; after a SIGKILL of the holder the next run proceeds."""
    out, mark = tmp_path / "run", tmp_path / "mark.json"
    # two finished runs to combine (seeds 0 and 1)
    for seed in (0, 1):
        assert run(tiny, tmp_path / f"s{seed}", "--set", f"runtime.seed={seed}", recipe="dense.yaml",
                   report=False) == 0
    recipe = tiny / "dense.yaml"
    holder = driver(tiny, "recipe", "run", str(recipe), "--out", str(out), fault="pause@report", mark=mark)
    try:
        assert wait_for(mark, holder)["pid"] == holder.pid
        info = json.loads((out / ".jas-prune.lock").read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert info["what"] == "recipe run" and info["command"].startswith("jas-prune recipe run ")
        before = snapshot(out)
        assert {"recipe.yaml", "metrics.json", "run.log", ".jas-prune.lock"} <= set(before)
        for args in (["recipe", "run", str(recipe), "--out", str(out)],
                     ["recipe", "run", str(recipe), "--out", str(out), "--resume", "--set", "runtime.seed=1"],
                     ["report", str(out)],
                     ["report", "--combine", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]):
            code, stdout, stderr, seconds = jas_prune(*args)
            assert code == 2, (args, stderr)
            assert stderr.strip().splitlines() == [_refusal(out, info)], args
            assert stdout == "" and seconds < 120  # refused, not waiting for the holder (which sleeps 600 s)
            assert snapshot(out) == before, f"{args} changed the run directory"
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        stop(holder)
    assert holder.returncode == -signal.SIGKILL
    # the OS dropped the lock with the process: the next run takes it and finishes the run
    assert run(tiny, out, "--resume", recipe="dense.yaml", report=False) == 0
    assert (out / "run.log").read_text().count("done in") == 1  # the killed run never got there
    assert (out / ".jas-prune.lock").read_bytes() == b""  # released, left in place


def test_under_torchrun_rank_0_holds_the_lock(tiny, tmp_path):
    out, mark = tmp_path / "run", tmp_path / "mark.json"
    recipe = tiny / "dense.yaml"
    launcher = driver(tiny, "recipe", "run", str(recipe), "--out", str(out), fault="pause@dense", mark=mark,
                      torchrun=True)
    rank0 = {}
    try:
        rank0 = wait_for(mark, launcher)
        assert rank0["rank"] == 0 and rank0["pid"] != launcher.pid
        info = json.loads((out / ".jas-prune.lock").read_text())
        assert info["pid"] == rank0["pid"] and info["what"] == "recipe run"
        code, _, stderr, _ = jas_prune("recipe", "run", str(recipe), "--out", str(out), "--resume")
        assert code == 2 and stderr.strip().splitlines() == [_refusal(out, info)]
    finally:
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to the ranks
        stop(launcher, grace=60)
        if rank0:
            try:
                os.kill(rank0["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------
# nothing written before the checks pass


def test_resume_with_other_settings_leaves_every_file_as_it_was(tiny, reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path / "run")
    before = snapshot(out, lock=False)
    assert run(tiny, out, "--resume", "--set", "attribution.steps=2") == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith(f"jas-prune: error: --resume {out}: the stored results were computed with a different "
                          "attribution (attribution.steps)"), err
    assert snapshot(out, lock=False) == before  # recipe.yaml, metrics.json, run.log, paths/, masks: untouched


def test_refused_new_run_leaves_no_directory(tiny, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    too_wide = "masks.topk: 1000 exceeds the FFN width 64 of block 0"  # known once the model is loaded
    assert run(tiny, out, "--set", "masks.topk=1000") == 2
    assert last_line(capsys.readouterr().err) == f"jas-prune: error: {too_wide}"
    assert not out.parent.exists()  # created for the lock (with its parent), removed again with it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(tiny, empty, "--set", "masks.topk=1000") == 2
    assert [p.name for p in empty.iterdir()] == [".jas-prune.lock"]  # a directory it did not create keeps its lock file
    assert (empty / ".jas-prune.lock").read_bytes() == b""


# ---------------------------------------------------------------------------------------------
# no space left on device, at every writer


def _no_space_line(path: Path) -> str:
    return f"jas-prune: error: cannot write {path}: no space left on device (ENOSPC); {FULL}"


#: writers of a new run: the file that fails, and where it is in the run directory
NEW_RUN_WRITERS = [
    ("recipe.yaml", "recipe.yaml"),
    ("run.log", "run.log"),
    ("fingerprint.json", "paths/probe/fingerprint.json"),
    ("chunk-00001.safetensors", "paths/probe/chunk-00001.safetensors"),
    ("metrics.json", "metrics.json"),
    ("masks.safetensors", "masks.safetensors"),
]


@pytest.mark.parametrize("name,where", NEW_RUN_WRITERS, ids=[n for n, _ in NEW_RUN_WRITERS])
def test_no_space_in_a_new_run(tiny, reference, tmp_path, capsys, name, where):
    out = tmp_path / "run"
    assert run(tiny, out, fault=f"enospc@{name}", report=False) == 2
    err = capsys.readouterr().err
    assert last_line(err) == _no_space_line(out / where) and "Traceback" not in err
    if name == "recipe.yaml":  # refused before the run was accepted: nothing of it stays
        assert not out.exists()
        return
    assert temporaries(out) == []  # the half-written file is gone
    if name == "run.log":  # the traceback of a refused write goes to run.log, when it can be written
        return
    assert "OSError" in (out / "run.log").read_text() or "SafetensorError" in (out / "run.log").read_text()
    if name == "chunk-00001.safetensors":  # space freed: --resume finishes the same run
        assert (out / "paths/probe/chunk-00000.safetensors").is_file()
        assert run(tiny, out, "--resume") == 0
        assert json.loads((out / "metrics.json").read_text())["locate"]["chunks_resumed"] == 1
        assert_same_results(reference, out)


#: writers of a finished run's files, rewritten by --resume after the file was deleted (the
#: checkpoint and ONNX files) or always (figures, report)
RESUME_WRITERS = [
    ("pruned-jas-r50.safetensors", "pruned-jas-r50.safetensors"),
    ("dense.onnx", "dense.onnx"),
    ("pruned-magnitude-r50.json", "pruned-magnitude-r50.json"),
    ("pruning_tradeoff.png", "figures/pruning_tradeoff.png"),
    ("report.md", "report.md"),
]


@pytest.mark.parametrize("name,where", RESUME_WRITERS, ids=[n for n, _ in RESUME_WRITERS])
def test_no_space_while_resuming(tiny, reference, tmp_path, capsys, name, where, recwarn):
    out = copy_of(reference, tmp_path / "run")
    (out / where).unlink()
    report = where.endswith((".png", ".md"))
    assert run(tiny, out, "--resume", fault=f"enospc@{name}", report=report) == 2
    err = capsys.readouterr().err
    assert last_line(err) == _no_space_line(out / where) and "Traceback" not in err
    assert temporaries(out) == [] and not (out / where).exists()
    assert not [w for w in recwarn if "falling back" in str(w.message)]  # no TorchScript retry on a full disk
    if name in ("pruned-jas-r50.safetensors", "dense.onnx"):  # space freed: --resume completes the run
        assert run(tiny, out, "--resume") == 0
        err = capsys.readouterr().err
        if name == "dense.onnx":
            assert f"export dense: exporting ({out / name}: missing (recorded in metrics.json" in err
            assert "export pruned-jas-r50: kept pruned-jas-r50.onnx" in err
        else:
            assert f"resume: {out / name} is missing (recorded in metrics.json as pruned[0] checkpoint): " \
                   "recomputed" in err
        assert_same_results(reference, out)


def test_onnx_export_on_a_full_disk_does_not_fall_back(tmp_path, monkeypatch, recwarn):
    """The deploy exporter itself: a full disk under the dynamo exporter is one StorageError naming
    the file (also when the exporter wraps it), never a retry with the TorchScript exporter."""
    from conftest import make_tiny_vit
    from jas_prune.deploy import export_onnx, onnx_export
    from jas_prune.errors import StorageError

    tried = []

    def full(module, example, path, opset):
        tried.append("dynamo")
        Path(path).write_bytes(b"\x08" * 10)
        try:
            raise _no_space()
        except OSError as exc:  # as torch.onnx wraps what it catches
            raise RuntimeError("Failed to save the ONNX model") from exc

    monkeypatch.setattr(onnx_export, "_export_dynamo", full)
    monkeypatch.setattr(onnx_export, "_export_torchscript", lambda *a: tried.append("torchscript"))
    path = tmp_path / "m.onnx"
    with pytest.raises(StorageError) as info:
        export_onnx(make_tiny_vit(num_classes=3, depth=1), path)
    assert str(info.value) == f"cannot write {path}: no space left on device (ENOSPC); {FULL}"
    assert tried == ["dynamo"] and list(tmp_path.iterdir()) == [] and not recwarn.list


# ---------------------------------------------------------------------------------------------
# kill inside a stage, then --resume


def test_kill_inside_prune_then_resume(tiny, reference, tmp_path, capsys):
    """SIGKILL just before the second checkpoint is renamed into place: the first is recorded,
    the second left as a temporary file; --resume removes it, keeps the first, computes the second."""
    out = tmp_path / "run"
    code, _, err = finish(driver(tiny, "recipe", "run", str(tiny / "r.yaml"), "--out", str(out),
                                 fault="signal@rename=pruned-magnitude-r50.safetensors:KILL"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert [e["method"] for e in json.loads((out / "metrics.json").read_text())["pruned"]] == ["jas"]
    left = temporaries(out)
    assert len(left) == 1 and left[0].startswith(".pruned-magnitude-r50.safetensors.")
    assert not list(out.glob("*.onnx"))

    assert run(tiny, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"removed 1 unfinished write(s) of an interrupted run: {left[0]}" in err
    assert "pruned jas" not in err and "pruned magnitude" in err  # the finished one is kept, not redone
    assert temporaries(out) == []
    assert_same_results(reference, out)


def test_sigterm_inside_export_then_resume(tiny, reference, tmp_path, capsys):
    """SIGTERM right after the second model is exported, before it is recorded: exit 143, one
    line; --resume keeps the dense export (file, sidecar and source match metrics.json) and
    exports the others again, ending with the same ONNX files and figures."""
    out = tmp_path / "run"
    code, _, err = finish(driver(tiny, "recipe", "run", str(tiny / "r.yaml"), "--out", str(out),
                                 fault="signal@call=jas_prune.deploy:export_and_verify/2:TERM"))
    assert code == 143, err[-3000:]
    assert last_line(err) == ("jas-prune: interrupted by SIGTERM; finished work is kept, continue with --resume")
    assert "Traceback" not in err and "interrupted, resume with --resume" in (out / "run.log").read_text()
    assert [r["model"] for r in json.loads((out / "metrics.json").read_text())["export"]] == ["dense"]
    dense_onnx = (out / "dense.onnx").stat().st_mtime_ns

    assert run(tiny, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "export dense: kept dense.onnx (its file, sidecar and checkpoint match metrics.json)" in err
    assert "export pruned-jas-r50: exporting (not exported yet)" in err
    assert (out / "dense.onnx").stat().st_mtime_ns == dense_onnx  # not written again
    assert_same_results(reference, out)


# ---------------------------------------------------------------------------------------------
# tamper evidence


def test_files_are_recorded_with_size_and_sha256(reference):
    m = json.loads((reference / "metrics.json").read_text())
    records = [e["checkpoint_file"] for e in m["pruned"]]
    records += [r[k] for r in m["export"] for k in ("onnx_file", "sidecar_file")]
    assert sorted(r["file"] for r in records) == sorted(
        ["pruned-jas-r50.safetensors", "pruned-magnitude-r50.safetensors", "dense.onnx", "dense.json",
         "pruned-jas-r50.onnx", "pruned-jas-r50.json", "pruned-magnitude-r50.onnx", "pruned-magnitude-r50.json"])
    for r in records:
        data = (reference / r["file"]).read_bytes()
        assert r == {"file": r["file"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    by_model = {r["model"]: r for r in m["export"]}
    assert by_model["dense"]["source_sha256"] == m["fingerprint"]["model"]
    for e in m["pruned"]:
        assert by_model[e["checkpoint"].removesuffix(".safetensors")]["source_sha256"] == e["checkpoint_file"]["sha256"]
    for r in m["export"]:  # the sidecar (format 2) names the file's size and SHA-256 for export/predict.py
        side = json.loads((reference / r["sidecar_file"]["file"]).read_text())
        assert side["format_version"] == 2
        assert (side["onnx_bytes"], side["onnx_sha256"]) == (r["onnx_file"]["bytes"], r["onnx_file"]["sha256"])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["pruned-magnitude-r50.safetensors", "pruned-jas-r50.onnx", "dense.json"])
def test_resume_refuses_a_changed_file(tiny, reference, tmp_path, capsys, name):
    out = copy_of(reference, tmp_path / "run")
    _flip_last_byte(out / name)
    before = snapshot(out, lock=False)
    assert run(tiny, out, "--resume") == 2
    assert last_line(capsys.readouterr().err) == (
        f"jas-prune: error: --resume {out}: {out / name}: changed since it was written (its SHA-256 differs from "
        "the one recorded in metrics.json); it is not reused: restore it, or delete it to have --resume recompute it")
    assert snapshot(out, lock=False) == before


def test_report_names_changed_and_missing_files(tiny, reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path / "run")
    with (out / "pruned-jas-r50.onnx").open("ab") as f:
        f.write(b"\0")
    (out / "pruned-magnitude-r50.safetensors").unlink()
    size = (reference / "pruned-jas-r50.onnx").stat().st_size
    lines = [f"{out / 'pruned-magnitude-r50.safetensors'}: missing (recorded in metrics.json with "
             f"{(reference / 'pruned-magnitude-r50.safetensors').stat().st_size} bytes); it was deleted or moved "
             "since it was written",
             f"{out / 'pruned-jas-r50.onnx'}: changed since it was written ({size + 1} bytes, {size} recorded in "
             "metrics.json)"]
    assert cli("report", str(out)) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("report: ")] == [f"report: {line}" for line in lines]
    text = (out / "report.md").read_text()
    assert "## Warning: files changed since the run wrote them" in text.split("## Summary")[0]
    assert all(f"- {line}" in text for line in lines)
