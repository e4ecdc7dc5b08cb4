"""INT8 / float16 copies of exported models (deploy.quantize, deploy.variants), the frontier, and
the refusals of `jas-prune export onnx` and export/predict.py around them (issues 22, 18 item 7)."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from jas_prune import deploy as ex
from jas_prune.cli import main
from jas_prune.data import build_source, make_loader, model_transform
from jas_prune.deploy.quantize import CalibrationSettings, onnx_logits, parse_precisions
from jas_prune.deploy.variants import export_precisions
from jas_prune.errors import ExportVerificationError, InvalidArgumentError
from jas_prune.models import load_model
from jas_prune.reporting.frontier import FrontierPoint, pareto_front

ROOT = Path(__file__).resolve().parents[1]


def _arrays(model, samples):
    x, y, _ = next(iter(make_loader(samples, model_transform(model), batch_size=len(samples))))
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """The built-in trained model exported in float32, with shapes test and probe images."""
    model = load_model("builtin:shapes-vit").eval()
    src = build_source("shapes", images_per_class=6, seed=0)
    path = tmp_path_factory.mktemp("q") / "m.onnx"
    ex.export_onnx(model, path, sidecar={"class_names": src.class_names})
    test, labels = _arrays(model, src.subset("test"))
    probe, probe_labels = _arrays(model, src.subset("probe"))
    return model, path, test, labels, probe, probe_labels


def test_int8_copies_load_in_ort_and_agree_with_fp32(builtin):
    model, path, test, labels, probe, probe_labels = builtin
    ref = onnx_logits(path, test)
    recs = export_precisions(model, path, ["fp32", "int8_static", "int8_dynamic"], test_images=test,
                             test_labels=labels, fp32_logits=ref, calib=probe[:96], probe=probe,
                             probe_labels=probe_labels, settings=CalibrationSettings(images_per_class=2))
    assert [r["precision"] for r in recs] == ["int8_static", "int8_dynamic"]
    for r in recs:
        assert not r.get("error") and r["tested"], r
        q = Path(r["path"])
        sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
        out = sess.run(["logits"], {"pixel_values": test})[0]
        agree = float((out.argmax(1) == ref.argmax(1)).mean())
        assert agree >= 0.95 and abs(agree - r["top1_agreement"]) < 1e-9
        assert r["test_top1"] == pytest.approx(float((out.argmax(1) == labels).mean()))
        side = json.loads(q.with_suffix(".json").read_text())
        assert side["precision"] == r["precision"] and side["onnx_file"] == q.name
        assert side["onnx_bytes"] == q.stat().st_size == r["size_bytes"]
    static = recs[0]
    assert static["calibration"]["method"] == "minmax" and static["calibration"]["images"] == 96
    assert static["selection"][0]["float_groups"] == [] and "LayerNormalization" in static["float_ops"]
    # the chosen rung is the first within max_top1_drop of fp32 on the probe partition
    ok = [s for s in static["selection"] if 100 * (static["probe_top1_fp32"] - s["probe_top1"]) <= 0.5]
    assert not ok or static["selection"][-1] == ok[0]
    ops = {n.op_type for n in __import__("onnx").load(static["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format


def test_predict_runs_an_int8_copy_with_its_sidecar(builtin, tmp_path, capsys):
    model, path, test, labels, probe, probe_labels = builtin
    ref = onnx_logits(path, test)
    (rec,) = export_precisions(model, path, ["int8_dynamic"], test_images=test[:8], test_labels=labels[:8],
                               fp32_logits=ref[:8])
    img = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(img)
    predict = _script("predict")
    assert predict.main([rec["path"], str(img), "--top", "1"]) == 0
    assert "(int8_dynamic)" in capsys.readouterr().out


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_q_{name}", ROOT / "export" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nonfinite_export_leaves_nothing_and_predict_refuses_nan(tmp_path, capsys):
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=3).eval()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ExportVerificationError, match="not finite"):
        ex.export_and_verify(model, out, torch.randn(2, 3, 32, 32), label="m", benchmark=False)
    assert list((tmp_path / "out").iterdir()) == []  # no model.onnx, no sidecar, no staging folder
    # a NaN file exported without verification: the torch-free script refuses its output
    ex.export_onnx(model, out)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    capsys.readouterr()  # the exporter's log lines (a console handler an earlier CLI test left on the logger)
    assert _script("predict").main([str(out), str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0]


@pytest.mark.parametrize("args, words", [
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--precision", "int8_static", "--calibration-data", "{tmp}/missing"], "--calibration-data"),
])
def test_export_cli_refusals(args, words, tmp_path, capsys):
    out = tmp_path / "o" / "m.onnx"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["export", "onnx", str(tmp_path / "c.safetensors"), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_precision_lists_and_recipe_refusal(refused_recipe):
    assert parse_precisions(["int8_static", "fp32", "int8_static"]) == ["fp32", "int8_static"]
    with pytest.raises(InvalidArgumentError, match="fp16"):
        parse_precisions(["fp8"])
    line = refused_recipe("version: 1\nexport:\n  onnx:\n    precision: [fp32, int4]\n")
    assert "precision" in line
    line = refused_recipe("version: 1\nexport:\n  onnx:\n    calibration: {method: median}\n")
    assert "calibration" in line
    line = refused_recipe("version: 1\nexport:\n  onnx:\n    fp16: true\n    precision: [fp32, fp16]\n")
    assert "export.onnx" in line and "MODEL.fp16.onnx" in line


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = [FrontierPoint(f"m{i}", "fp32", float(rng.integers(1, 6)), float(rng.integers(0, 5)) / 4)
           for i in range(12)]
    front = pareto_front(pts)
    dominated = {p for p, q in itertools.product(pts, pts)
                 if q.ms <= p.ms and q.top1 >= p.top1 and (q.ms < p.ms or q.top1 > p.top1)}
    undominated = {(p.ms, p.top1) for p in pts if p not in dominated}
    assert {(p.ms, p.top1) for p in front} == undominated
    assert [p.ms for p in front] == sorted(p.ms for p in front)


def test_resume_keeps_int8_copies_and_remakes_a_damaged_one(tmp_path, tiny_builtin):
    """--resume keeps an INT8 copy whose file and sidecar match metrics.json (not rewritten), and
    remakes one whose file was damaged, with the same figures."""
    from conftest import run_recipe

    recipe = ("version: 1\ndata: {images_per_class: 2, batch_size: 16}\n"
              "prune: {methods: [magnitude], ratios: [0.5]}\n"
              "export: {onnx: {benchmark: false, precision: [fp32, int8_dynamic]}}\n")
    out = tmp_path / "run"
    assert run_recipe(tmp_path, recipe, out) == 0

    def copies():
        m = json.loads((out / "metrics.json").read_text())
        return {r["model"]: p for r in m["export"] for p in r["precisions"]}

    first = copies()
    assert len(first) == 2 and all(p["tested"] and not p.get("error") for p in first.values())
    files = {k: Path(p["path"]) for k, p in first.items()}
    stamps = {k: f.stat().st_mtime_ns for k, f in files.items()}
    assert run_recipe(tmp_path, recipe, out, resume=True) == 0
    assert {k: f.stat().st_mtime_ns for k, f in files.items()} == stamps  # kept, not rewritten
    damaged = sorted(files)[-1]
    files[damaged].write_bytes(b"not an onnx file")
    assert run_recipe(tmp_path, recipe, out, resume=True) == 0
    again = copies()
    for k, f in files.items():
        assert (f.stat().st_mtime_ns == stamps[k]) == (k != damaged)
        assert again[k]["top1_agreement"] == first[k]["top1_agreement"]
    ort.InferenceSession(str(files[damaged]), providers=["CPUExecutionProvider"])  # a valid model again
