"""Tamper evidence on the deployment side: export/predict.py and export/benchmark.py refuse a
damaged ONNX file or a sidecar that does not match it with one line on stderr and exit code 2,
run without torch (real exported files, real subprocesses)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_torchless
from jas_prune import deploy as ex

ROOT = Path(__file__).resolve().parents[1]
ADVICE = "re-export the model, or pass the right --sidecar"

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two tiny exported models (5 and 3 classes) with their sidecars as export_onnx writes them
    (format_version 2: size and SHA-256 of the file), and an image."""
    from conftest import make_tiny_vit

    d = tmp_path_factory.mktemp("exported")
    for name, classes in (("a", 5), ("b", 3)):
        ex.export_onnx(make_tiny_vit(num_classes=classes, depth=1), d / f"{name}.onnx",
                       sidecar={"class_names": [f"{name}{i}" for i in range(classes)]})
    img = d / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(img)
    return d


def test_export_writes_the_files_size_and_sha256(exported):
    """What lets the scripts refuse a damaged file: the exporter records it in the sidecar, right
    after the file's name, and the returned sidecar is the one on disk."""
    from jas_prune.deploy.sidecar import SIDECAR_VERSION

    for name in ("a", "b"):
        data = (exported / f"{name}.onnx").read_bytes()
        side = json.loads((exported / f"{name}.json").read_text())
        assert SIDECAR_VERSION == 2 and side["format_version"] == 2
        assert side["onnx_file"] == f"{name}.onnx"
        assert side["onnx_bytes"] == len(data) and side["onnx_sha256"] == hashlib.sha256(data).hexdigest()
        keys = list(side)
        assert keys[keys.index("onnx_file") + 1:keys.index("onnx_file") + 3] == ["onnx_bytes", "onnx_sha256"]


def _case(exported: Path, dest: Path, *, onnx: str = "a", sidecar: str | None = "a") -> tuple[Path, Path]:
    """``dest/a.onnx`` (a copy of ``onnx``) with ``dest/a.json`` (a copy of ``sidecar``'s)."""
    model, side = dest / "a.onnx", dest / "a.json"
    shutil.copyfile(exported / f"{onnx}.onnx", model)
    if sidecar is not None:
        shutil.copyfile(exported / f"{sidecar}.json", side)
    return model, side


def _edit_sidecar(side: Path, **changes) -> None:
    data = json.loads(side.read_text())
    for k, v in changes.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    side.write_text(json.dumps(data))


_DROP = object()


def _refused(proc: subprocess.CompletedProcess, line: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {line}"]


def test_intact_models_run(exported):
    proc = run_torchless("predict.py", exported / "a.onnx", exported / "img.png", "--top", "2")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[0] == "# a.onnx on CPUExecutionProvider"
    proc = run_torchless("benchmark.py", exported / "b.onnx", "--batch", "2", "--warmup", "0", "--iters", "1", "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)[0]["batch_size"] == 2


@pytest.mark.parametrize("script", ["predict.py", "benchmark.py"])
def test_truncated_model(exported, tmp_path, script):
    model, side = _case(exported, tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    args = (exported / "img.png",) if script == "predict.py" else ("--iters", "1")
    _refused(run_torchless(script, model, *args),
             f"{model}: {len(data) // 2} bytes, but its sidecar {side} records {len(data)}: the file is "
             f"truncated or was replaced; {ADVICE}")


@pytest.mark.parametrize("script", ["predict.py", "benchmark.py"])
def test_one_byte_flipped(exported, tmp_path, script):
    """Same size, one weight byte changed: onnxruntime would run it; the checksum refuses it."""
    model, side = _case(exported, tmp_path)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    args = (exported / "img.png",) if script == "predict.py" else ("--iters", "1")
    _refused(run_torchless(script, model, *args),
             f"{model}: its SHA-256 differs from the one its sidecar {side} records: the file was modified, "
             f"or the sidecar belongs to another file; {ADVICE}")


@pytest.mark.parametrize("script", ["predict.py", "benchmark.py"])
def test_sidecar_of_another_file(exported, tmp_path, script):
    model, side = _case(exported, tmp_path, onnx="a", sidecar="b")
    args = (exported / "img.png",) if script == "predict.py" else ("--iters", "1")
    size, recorded = model.stat().st_size, json.loads(side.read_text())["onnx_bytes"]
    assert size != recorded
    _refused(run_torchless(script, model, *args),
             f"{model}: {size} bytes, but its sidecar {side} records {recorded} (it was written for b.onnx): "
             f"the file is truncated or was replaced; {ADVICE}")


def test_unchecksummed_sidecar_of_another_model(exported, tmp_path):
    """A format-1 sidecar (no checksum) is still checked against the model's input and output."""
    model, side = _case(exported, tmp_path, onnx="a", sidecar="b")
    _edit_sidecar(side, format_version=1, onnx_bytes=_DROP, onnx_sha256=_DROP)
    _refused(run_torchless("predict.py", model, exported / "img.png"),
             f"{model} does not match its sidecar {side}: the model outputs [batch, 5], the sidecar "
             f"describes 3 classes; {ADVICE}")


@pytest.mark.parametrize("change,line", [
    ({"onnx_sha256": _DROP}, "missing field 'onnx_sha256' (required from format_version 2 on)"),
    ({"std": _DROP}, "missing field 'std'"),
    ({"mean": [0.5, 0.5]}, "field 'mean' must be a list of 3 numbers, not [0.5, 0.5]"),
    ({"input_size": [3, 32]}, "field 'input_size' must be [channels, height, width] as positive integers, "
                              "not [3, 32]"),
    ({"onnx_bytes": "many"}, "field 'onnx_bytes' must be the ONNX file's size in bytes, not \"many\""),
    ({"format": "something-else"}, "format 'something-else' is not a jas-prune ONNX sidecar ('jas-prune-onnx')"),
])
def test_malformed_sidecar(exported, tmp_path, change, line):
    model, side = _case(exported, tmp_path)
    _edit_sidecar(side, **change)
    _refused(run_torchless("predict.py", model, exported / "img.png"), f"sidecar {side}: {line}; {ADVICE}")


def test_sidecar_that_is_not_json(exported, tmp_path):
    model, side = _case(exported, tmp_path)
    side.write_text('{"input_size": [3, 32')
    _refused(run_torchless("predict.py", model, exported / "img.png"),
             f"sidecar {side}: not valid JSON (Expecting ',' delimiter at line 1 column 22); {ADVICE}")
    _refused(run_torchless("benchmark.py", model), f"sidecar {side}: not valid JSON (Expecting ',' delimiter at line 1 "
                                          f"column 22); {ADVICE}")


def test_file_onnxruntime_cannot_load(exported, tmp_path):
    model, side = _case(exported, tmp_path)
    model.write_bytes(model.read_bytes()[:4000])
    _edit_sidecar(side, format_version=1, onnx_bytes=_DROP, onnx_sha256=_DROP)  # nothing to compare with
    expected = (f"{model}: onnxruntime cannot load it (INVALID_PROTOBUF: Protobuf parsing failed.); the file "
                "is damaged or not an ONNX model: re-export it")
    _refused(run_torchless("predict.py", model, exported / "img.png"), expected)
    side.unlink()  # benchmark.py runs without a sidecar
    _refused(run_torchless("benchmark.py", model, "--iters", "1"), expected)


def test_missing_sidecar_and_unreadable_image(exported, tmp_path):
    model, side = _case(exported, tmp_path, sidecar=None)
    _refused(run_torchless("predict.py", model, exported / "img.png"), f"no sidecar {side} beside {model} (pass --sidecar PATH)")
    model, side = _case(exported, tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    _refused(run_torchless("predict.py", model, bad), f"cannot read image {bad}: cannot identify image file '{bad}'")


def test_validation_in_process(exported, tmp_path):
    """The checks are plain functions too (fast to call from Python)."""
    spec = importlib.util.spec_from_file_location("_jas_ort_session", ROOT / "export" / "ort_session.py")
    ort_session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ort_session)
    model, side = _case(exported, tmp_path)
    session, loaded = ort_session.open_model(model, providers=("cpu",), threads=1)
    assert loaded["onnx_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert session.get_providers()[0] == "CPUExecutionProvider"
    _edit_sidecar(side, label_mapping=[0, 1])
    with pytest.raises(ort_session.DeployError, match="field 'label_mapping' must be null or a list of 5 integers"):
        ort_session.load_sidecar(model)
