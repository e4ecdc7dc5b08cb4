"""Kill and resume, fingerprint refusal and determinism of ``jas-prune recipe run``.

The killed runs are real ``python -m jas_prune`` processes on the shipped ``builtin:shapes-vit``
(a subprocess cannot see the ``tiny_builtin`` monkeypatch; the shipped model is small, and its
~1 s chunks leave time to stop a run between two of them). Each partition is cut into fixed
32-image chunks, so 3 images per class (2 probe, 1 test) give 3 probe chunks. Every run uses one
thread, so the figures are comparable bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jas_prune.cli import main
from conftest import assert_same_results

RECIPE = """version: 1
data: {images_per_class: 3, batch_size: 64}
attribution: {method: jas, steps: 2}
masks: {topk: 2}
runtime: {device: cpu, seed: 0}
"""
PROBE_CHUNKS = 3  # 96 probe images / 32


def run_in_process(recipe: Path, out: Path, *extra: str) -> int:
    """``jas-prune recipe run`` in this process, on one thread like the subprocesses, without the
    report's figures (seconds of plotting; the report is derived from metrics.json anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("jas_prune.reporting.write_report", lambda run_dir: Path(run_dir) / "report.md")
            return main(["recipe", "run", str(recipe), "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """An uninterrupted run, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(recipe, out) == 0
    assert len(list((out / "paths" / "probe").glob("chunk-*.safetensors"))) == PROBE_CHUNKS
    return out


def test_same_recipe_and_seed_give_identical_results(recipe, reference, tmp_path):
    assert run_in_process(recipe, tmp_path / "again") == 0
    assert_same_results(reference, tmp_path / "again")
    m = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m["locate"]["images"] == 96 and m["dense"]["test_images"] == 48


def _start_and_stop(recipe: Path, out: Path, sig: int, chunk: int, *extra: str) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` once probe chunk ``chunk`` is on disk, wait for the process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jas_prune", "recipe", "run", str(recipe), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    target = out / "paths" / "probe" / f"chunk-{chunk:05d}.safetensors"
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _chunks(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "paths" / "probe").glob("chunk-*.safetensors"))


def test_killed_run_resumes_to_the_same_results(recipe, reference, tmp_path):
    """SIGKILL after the first chunk, SIGTERM after the second (while resuming), then finish:
    no image lost, none counted twice, the same paths, masks and metrics as an uninterrupted run."""
    out = tmp_path / "run"
    probe = out / "paths" / "probe"
    killed = _start_and_stop(recipe, out, signal.SIGKILL, 0)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _chunks(out) == ["chunk-00000.safetensors"], "the run was not stopped while locating"
    # what a kill in the middle of a write leaves: a temporary file, never to be trusted
    partial = probe / ".chunk-00001.safetensors.k1ll3d.tmp"
    partial.write_bytes(b"\x00" * 100)

    stopped = _start_and_stop(recipe, out, signal.SIGTERM, 1, "--resume")
    assert stopped.returncode == 143, stopped.stderr
    assert "continue with --resume" in stopped.stderr.strip().splitlines()[-1]
    assert "Traceback" not in stopped.stderr
    assert "interrupted, resume with --resume" in (out / "run.log").read_text()
    assert _chunks(out) == ["chunk-00000.safetensors", "chunk-00001.safetensors"], "not stopped while locating"
    assert not partial.exists() and not list(probe.glob(".*.tmp")), "partial writes left behind"

    assert run_in_process(recipe, out, "--resume") == 0
    m = json.loads((out / "metrics.json").read_text())["locate"]
    assert m["chunks_resumed"] == 2 and m["images_this_run"] == 32 and m["images"] == 96
    assert_same_results(reference, out)


def test_resume_with_other_settings_is_refused_naming_the_part(recipe, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert run_in_process(recipe, out, "--resume", "--set", "attribution.steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jas-prune: error: --resume") and "attribution (attribution.steps)" in err
    assert "Traceback" not in err
    # refused before anything was rewritten: chunks, masks, metrics and the recipe are the stored ones
    assert_same_results(reference, out)
    assert (out / "recipe.yaml").read_text() == (reference / "recipe.yaml").read_text()
    assert (out / "metrics.json").read_text() == (reference / "metrics.json").read_text()
