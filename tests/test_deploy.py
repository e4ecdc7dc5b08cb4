"""ONNX export, verification, providers, latency (one file, and several interleaved with the spread of
their speed-ups) and the torch-free deployment scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from conftest import run_torchless
from jas_prune import deploy as ex
from jas_prune.deploy import latency, onnx_export, record
from jas_prune.errors import ExportVerificationError
from jas_prune.metrics import ExportRecord

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["00-alpha", "01-bravo", "02-charlie", "03-delta", "04-echo"]
KEPT_LABELS = [3, 0, 4]  # head index -> original label of the class-specialised model


def _tiny_vit(seed: int = 0, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, num_classes=num_classes)
    return model.eval()


def _prune(model: nn.Module, widths: list[int], keep_labels: list[int] | None = None) -> nn.Module:
    """Keep the ``widths[i]`` largest-norm FFN neurons of block i (and optionally some classes)."""
    for blk, width in zip(model.blocks, widths):
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        keep = fc1.weight.norm(dim=1).argsort(descending=True)[:width].sort().values
        new1 = nn.Linear(fc1.in_features, width)
        new2 = nn.Linear(width, fc2.out_features)
        with torch.no_grad():
            new1.weight.copy_(fc1.weight[keep])
            new1.bias.copy_(fc1.bias[keep])
            new2.weight.copy_(fc2.weight[:, keep])
            new2.bias.copy_(fc2.bias)
        blk.mlp.fc1, blk.mlp.fc2 = new1, new2
    if keep_labels is not None:
        head = nn.Linear(model.head.in_features, len(keep_labels))
        with torch.no_grad():
            head.weight.copy_(model.head.weight[keep_labels])
            head.bias.copy_(model.head.bias[keep_labels])
        model.head = head
        model.num_classes = len(keep_labels)
    return model.eval()


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    model = _tiny_vit()
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    info = ex.export_onnx(model, path, sidecar={"class_names": NAMES, "method": "dense"})
    return model, path, info


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = _prune(_tiny_vit(), [40, 72], keep_labels=KEPT_LABELS)
    path = tmp_path_factory.mktemp("pruned") / "pruned.onnx"
    info = ex.export_onnx(model, path, sidecar={"class_names": NAMES, "label_mapping": KEPT_LABELS})
    return model, path, info


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_jas_export_{name}", ROOT / "export" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_export_is_checked_single_file_with_dynamic_batch(which, request):
    model, path, info = request.getfixturevalue(which)
    assert info["exporter"] == "dynamo" and info["fallback_reason"] is None
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.stem + ".json"])
    proto = onnx.load(str(path))
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = _batch(n).numpy()
        out = sess.run(["logits"], {"pixel_values": x})[0]
        assert out.shape == (n, model.num_classes)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_verify_parity(which, request):
    model, path, _ = request.getfixturevalue(which)
    res = ex.verify_onnx(path, model, _batch(6))
    assert res["passed"] and res["parity_max_abs"] <= 1e-4 and res["top1_agreement"] == 1.0
    assert res["provider"] == "CPUExecutionProvider"
    assert res["batch_sizes_checked"] == [6, 1]


def test_sidecar_content(dense, pruned):
    _, dpath, dinfo = dense
    side = json.loads(dpath.with_suffix(".json").read_text())
    assert side == dinfo["sidecar"] == ex.read_sidecar(dpath)
    assert side["input_size"] == [3, 32, 32]
    assert side["mean"] == [0.5, 0.5, 0.5] and side["std"] == [0.5, 0.5, 0.5]
    assert side["interpolation"] == "bicubic" and side["crop_pct"] == 0.9 and side["crop_mode"] == "center"
    assert side["class_names"] == NAMES and side["label_mapping"] is None and side["num_classes"] == 5
    assert side["input_name"] == "pixel_values" and side["output_name"] == "logits"
    assert side["onnx_file"] == "dense.onnx" and side["method"] == "dense"
    assert side["model"]["ffn_widths"] == [128, 128]
    assert side["export"]["exporter"] == "dynamo" and side["export"]["opset"] == 18

    _, ppath, _ = pruned
    pside = ex.read_sidecar(ppath)
    assert pside["model"]["ffn_widths"] == [40, 72]
    assert pside["label_mapping"] == KEPT_LABELS
    assert pside["class_names"] == [NAMES[j] for j in KEPT_LABELS]
    assert pside["num_classes"] == 3 and pside["original_num_classes"] == 5
    assert oct(ppath.with_suffix(".json").stat().st_mode & 0o777) == oct(ppath.stat().st_mode & 0o777)


def test_sidecar_reads_a_cut_heads_mapping_from_the_model(tmp_path):
    model = _prune(_tiny_vit(), [8, 8], keep_labels=[4, 2])
    model.jas_head_classes = [4, 2]
    model.jas_head_class_names = [NAMES[4], NAMES[2]]
    side = ex.export_onnx(model, tmp_path / "cut.onnx", exporter="torchscript")["sidecar"]
    assert side["label_mapping"] == [4, 2] and side["class_names"] == [NAMES[4], NAMES[2]]


def test_sidecar_rejects_inconsistent_names(tmp_path):
    model = _tiny_vit()
    with pytest.raises(ValueError, match="class names"):
        ex.export_onnx(model, tmp_path / "m.onnx", sidecar={"class_names": NAMES[:3]})
    with pytest.raises(ValueError, match="label_mapping"):
        ex.export_onnx(model, tmp_path / "m.onnx", sidecar={"label_mapping": [0, 1]})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# broken exports are caught


def _copy_export(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, dest / path.name)
    shutil.copy(path.with_suffix(".json"), dest / path.with_suffix(".json").name)
    return dest / path.name


def test_perturbed_weight_is_caught(dense, tmp_path):
    model, path, _ = dense
    bad = _copy_export(path, tmp_path)
    proto = onnx.load(str(bad))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(bad))
    with pytest.raises(ExportVerificationError, match=r"max \|Δlogit\|") as err:
        ex.verify_onnx(bad, model, _batch(6))
    assert err.value.record["parity_max_abs"] > 1e-4 and not err.value.record["passed"]


def test_model_mismatch_is_caught(dense, pruned, tmp_path):
    model, path, _ = dense
    # another model of the same shape: the sidecar agrees, the logits do not
    with pytest.raises(ExportVerificationError, match=r"max \|Δlogit\|"):
        ex.verify_onnx(path, _tiny_vit(seed=7), _batch(4))
    # the pruned model against the dense file: its sidecar names the difference
    pmodel = pruned[0]
    with pytest.raises(ExportVerificationError, match="FFN widths"):
        ex.verify_onnx(path, pmodel, _batch(4))
    # without a sidecar the output shape gives it away
    lone = tmp_path / "lone.onnx"
    shutil.copy(path, lone)
    with pytest.raises(ExportVerificationError, match="shape"):
        ex.verify_onnx(lone, pmodel, _batch(4))


def test_wrong_width_sidecar_is_caught(pruned, tmp_path):
    model, path, _ = pruned
    bad = _copy_export(path, tmp_path)
    side = json.loads(bad.with_suffix(".json").read_text())
    side["model"]["ffn_widths"] = [128, 128]
    bad.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ExportVerificationError, match="FFN widths"):
        ex.verify_onnx(bad, model, _batch(4))


# ---------------------------------------------------------------------------------------------
# exporter choice


def test_torchscript_fallback_warns_and_records(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter broke on purpose")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = _prune(_tiny_vit(), [24, 100])
    path = tmp_path / "ts.onnx"
    with pytest.warns(RuntimeWarning, match="falling back to the TorchScript exporter"):
        info = ex.export_onnx(model, path)
    assert info["exporter"] == "torchscript" and "broke on purpose" in info["fallback_reason"]
    assert ex.read_sidecar(path)["export"]["exporter"] == "torchscript"
    assert ex.read_sidecar(path)["class_names"] == [f"class_{i}" for i in range(5)]
    assert ex.verify_onnx(path, model, _batch(5))["parity_max_abs"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts.json", "ts.onnx"]
    ex.export_onnx(model, path, exporter="torchscript", sidecar={"note": "again"})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts.json", "ts.onnx"]
    assert ex.read_sidecar(path)["note"] == "again"


def test_failed_export_leaves_nothing(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no exporter today")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="torchscript exporter failed"):
        ex.export_onnx(_tiny_vit(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_fp16_export_has_its_own_parity(tmp_path):
    model = _tiny_vit()
    path = tmp_path / "m.fp16.onnx"
    info = ex.export_onnx(model, path, dtype="float16")
    assert info["sidecar"]["compute_dtype"] == "float16" and info["sidecar"]["input_dtype"] == "float32"
    try:
        res = ex.verify_onnx(path, model, _batch(4), providers=("cpu",))
    except ExportVerificationError as err:
        if "could not run" in str(err):
            pytest.skip("this onnxruntime CPU build lacks float16 kernels")
        raise
    assert res["dtype"] == "float16" and res["tolerance"] >= 1e-2
    assert res["parity_max_abs"] <= res["tolerance"]


# ---------------------------------------------------------------------------------------------
# providers and latency


def test_providers_resolve_to_cpu_quietly(dense, capfd):
    if ex.cuda_usable():
        pytest.skip("CUDA is usable here")
    assert ex.resolve_providers(("cuda", "cpu")) == ["CPUExecutionProvider"]
    assert ex.resolve_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]
    sess = ex.create_session(dense[1], providers=("cuda", "cpu"))
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider"):
        ex.resolve_providers(["cdua"])


def test_benchmarks(dense):
    model, path, _ = dense
    keys = {"runtime", "provider", "threads", "batch_size", "warmup", "iters", "latency_ms_p50",
            "latency_ms_p90", "latency_ms_mean", "images_per_second"}
    onnx_lat = ex.benchmark_onnx(path, batch_sizes=(1, 4), warmup=1, iters=3, threads=1)
    torch_lat = ex.benchmark_torch(model, batch_sizes=(1, 4), warmup=1, iters=3, threads=1)
    for recs, runtime, provider in ((onnx_lat, "onnxruntime", "CPUExecutionProvider"),
                                    (torch_lat, "torch", "torch-cpu")):
        assert [r["batch_size"] for r in recs] == [1, 4]
        for r in recs:
            assert keys <= set(r) and r["runtime"] == runtime and r["provider"] == provider
            assert r["threads"] == 1 and 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]


def test_export_and_verify_record(tmp_path):
    model = _prune(_tiny_vit(), [16, 64], keep_labels=KEPT_LABELS)
    rec = ex.export_and_verify(model, tmp_path / "p.onnx", _batch(4), label="jas@0.5",
                               checkpoint=tmp_path / "p.safetensors",
                               sidecar={"class_names": NAMES, "label_mapping": KEPT_LABELS},
                               batch_sizes=(1, 2), warmup=1, iters=2, threads=1, fp16=True)
    for key in ("model", "checkpoint", "path", "parity_max_abs", "top1_agreement", "latency_ms_p50",
                "latency_ms_p90", "provider"):
        assert rec[key] is not None, key
    assert rec["model"] == "jas@0.5" and rec["verified"] and rec["parity_max_abs"] <= 1e-4
    assert rec["provider"] == "CPUExecutionProvider" and rec["exporter"] == "dynamo"
    assert [r["batch_size"] for r in rec["latency"]] == [1, 2] == [r["batch_size"] for r in rec["torch_latency"]]
    assert ex.read_sidecar(tmp_path / "p.onnx")["checkpoint"] == str(tmp_path / "p.safetensors")
    assert "fp16" not in rec or ex.cuda_usable()  # fp16 only where CUDA runs it
    json.dumps(rec)


def test_export_and_verify_failure_carries_the_record(tmp_path, monkeypatch):
    def parity_fails(path, model, batch, **kwargs):
        raise ExportVerificationError("p.onnx: differs", record={"parity_max_abs": 0.5, "top1_agreement": 0.75,
                                                                 "provider": "CPUExecutionProvider"})

    monkeypatch.setattr(record, "verify_onnx", parity_fails)
    with pytest.raises(ExportVerificationError, match="differs") as err:
        ex.export_and_verify(_tiny_vit(), tmp_path / "p.onnx", _batch(2), label="p", checkpoint="p.safetensors")
    rec = err.value.record  # what the pipeline keeps in metrics.json for a failed model
    assert rec["model"] == "p" and rec["checkpoint"] == "p.safetensors" and rec["verified"] is False
    assert rec["parity_max_abs"] == 0.5 and rec["top1_agreement"] == 0.75 and rec["error"] == "p.onnx: differs"


class _Clock:
    """A fake ``time``: the load triples in long slow spells, as on a shared machine."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def load(self) -> float:
        return 3.0 if int(self.t // 200) % 2 else 1.0


class _FakeSession:
    def __init__(self, label: str, cost: float, clock: _Clock, calls: list):
        self.label, self.cost, self.clock, self.calls = label, cost, clock, calls

    def run(self, names, feeds):
        self.calls.append(self.label)
        self.clock.t += self.cost * self.clock.load()

    def get_inputs(self):
        return [type("In", (), {"shape": ["batch", 3, 4, 4]})()]

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_benchmark_many_interleaves_and_pairs_the_speedup(monkeypatch):
    clock, calls = _Clock(), []
    costs = {"dense.onnx": 2.0, "half.onnx": 1.0, "twin.onnx": 2.0}  # twin: the dense model's shape again
    monkeypatch.setattr(latency, "time", clock)
    monkeypatch.setattr(latency, "create_session", lambda path, **kw: _FakeSession(path, costs[path], clock, calls))
    out = ex.benchmark_many({"dense": "dense.onnx", "half": "half.onnx", "twin": "twin.onnx"}, reference="dense",
                            batch_sizes=(4,), warmup=1, repeats=15, iters=3)
    timed = calls[3:]  # after one warm-up run each
    rounds = [timed[i:i + 9:3] for i in range(0, len(timed), 9)]
    assert rounds[:4] == [["dense.onnx", "half.onnx", "twin.onnx"], ["half.onnx", "twin.onnx", "dense.onnx"],
                          ["twin.onnx", "dense.onnx", "half.onnx"], ["dense.onnx", "half.onnx", "twin.onnx"]]
    assert all(timed[i] == timed[i + 1] == timed[i + 2] for i in range(0, len(timed), 3))  # iters in a block
    half, twin = out["half"][0]["speedup"], out["twin"][0]["speedup"]
    # the slow spells hit models alike within a round: the paired ratio is exact where the
    # models' p50s, taken in different spells, are not
    assert half["median"] == pytest.approx(2.0) and twin["median"] == pytest.approx(1.0)
    assert half["low"] <= 2.0 <= half["high"] and twin["low"] <= 1.0 <= twin["high"]
    assert half["reference"] == "dense" and half["repeats"] == 15 and half["confidence"] == 0.95
    assert "speedup" not in out["dense"][0]
    rec = out["half"][0]
    assert rec["iters"] == 45 and rec["interleaved"] and rec["latency_ms_p25"] <= rec["latency_ms_p50"] \
        <= rec["latency_ms_p75"] <= rec["latency_ms_p90"]
    budget = ex.benchmark_many({"dense": "dense.onnx", "half": "half.onnx"}, reference="dense", batch_sizes=(4,),
                               repeats=15, iters=3, max_seconds=1.0)  # over budget after the first round
    assert budget["half"][0]["repeats"] == latency.MIN_ROUNDS == budget["half"][0]["speedup"]["repeats"]
    assert budget["half"][0]["iters"] == 3 * latency.MIN_ROUNDS
    with pytest.raises(ValueError, match="reference: 'nope' is not one of the timed models"):
        ex.benchmark_many({"dense": "dense.onnx"}, reference="nope")


def test_benchmark_exports_times_a_runs_models_together(dense, pruned, tmp_path):
    recs = [ex.export_and_verify(model, tmp_path / f"{name}.onnx", _batch(3), label=name,
                                 checkpoint=None if name == "dense" else "p.safetensors",
                                 sidecar={"class_names": NAMES} if name == "dense" else
                                 {"class_names": NAMES, "label_mapping": KEPT_LABELS},
                                 batch_sizes=(1, 2), warmup=1, iters=2, threads=1, onnx_latency=False)
            for name, model in (("dense", dense[0]), ("pruned", pruned[0]))]
    assert all(r["latency"] == [] and r["latency_ms_p50"] is None for r in recs)
    assert [x["batch_size"] for x in recs[1]["torch_latency"]] == [1, 2]  # PyTorch timed with the export
    ex.benchmark_exports(recs, batch_sizes=(1, 2), threads=1, warmup=1, repeats=3, iters=1)
    for r in recs:
        assert [x["batch_size"] for x in r["latency"]] == [1, 2] and r["latency_ms_p50"] > 0
        assert r["provider"] == "CPUExecutionProvider" and all(x["interleaved"] for x in r["latency"])
        assert ExportRecord.from_dict(json.loads(json.dumps(r))).to_dict() == r
    assert "speedup" not in recs[0]["latency"][0] and recs[1]["latency"][1]["speedup"]["reference"] == "dense"


# ---------------------------------------------------------------------------------------------
# the torch-free deployment side


def _pngs(dest: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 32), (45, 60), (70, 28)]):
        p = dest / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_script_without_torch(dense, pruned, tmp_path):
    from timm.data import create_transform

    images = _pngs(tmp_path)
    model, path, info = dense
    proc = run_torchless("predict.py", path, *images, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "# dense.onnx on CPUExecutionProvider"
    side = info["sidecar"]
    transform = create_transform(input_size=side["input_size"], mean=side["mean"], std=side["std"],
                                 interpolation=side["interpolation"], crop_pct=side["crop_pct"])
    with torch.inference_mode():
        ref = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in images])).softmax(-1)
    for k, img in enumerate(images):
        block = lines[1 + k * 6: 1 + (k + 1) * 6]
        assert block[0] == str(img)
        order = ref[k].argsort(descending=True).tolist()
        assert [ln.split()[2] for ln in block[1:]] == [NAMES[j] for j in order]
        assert abs(float(block[1].split()[1]) - float(ref[k, order[0]])) < 1e-3

    pmodel, ppath, _ = pruned
    proc = run_torchless("predict.py", ppath, images[1], "--top", "2")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 4
    names = {ln.split()[2]: int(ln.split("(label ")[1].rstrip(")")) for ln in out[2:]}
    assert all(NAMES[label] == name and label in KEPT_LABELS for name, label in names.items())

    proc = run_torchless("predict.py", path, tmp_path / "missing.png")
    assert proc.returncode == 2 and "image not found" in proc.stderr


def test_benchmark_script_without_torch(pruned):
    _, path, _ = pruned
    proc = run_torchless("benchmark.py", path, "--batch", "1", "3", "--threads", "1", "--warmup", "1",
                          "--iters", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "provider: CPUExecutionProvider  threads: 1" in proc.stdout
    rows = [ln.split() for ln in proc.stdout.splitlines()[3:]]
    assert [int(r[0]) for r in rows] == [1, 3] and all(float(r[1]) > 0 for r in rows)
    proc = run_torchless("benchmark.py", path, "--batch", "2", "--iters", "2", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(proc.stdout)
    assert recs[0]["provider"] == "CPUExecutionProvider" and recs[0]["batch_size"] == 2


@pytest.mark.parametrize("mode,interpolation,crop_pct,input_size", [
    ("center", "bicubic", 0.9, (32, 32)),
    ("center", "bilinear", 0.875, (24, 40)),
    ("squash", "bilinear", 0.95, (32, 32)),
    ("border", "bicubic", 0.9, (32, 32)),
])
def test_predict_preprocessing_matches_timm(mode, interpolation, crop_pct, input_size, tmp_path):
    from timm.data import create_transform

    predict = _load_script("predict")
    side = {"input_size": [3, *input_size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": mode}
    transform = create_transform(input_size=side["input_size"], mean=side["mean"], std=side["std"],
                                 interpolation=interpolation, crop_pct=crop_pct, crop_mode=mode)
    rng = np.random.default_rng(3)
    for h, w in [(32, 32), (45, 60), (70, 28), (20, 20), (33, 90)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = predict.preprocess(img, side)
        ref = transform(img).numpy()
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.abs(ours - ref).max() < 1e-5, (h, w)


def test_deployment_scripts_share_quiet_provider_resolution(capfd):
    """export/ort_session.py (used by predict.py and benchmark.py) asks for CUDA only when usable."""
    ort_session = _load_script("ort_session")
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ex.cuda_usable() else ["CPUExecutionProvider"]
    assert ort_session.resolve_providers(("cuda", "cpu")) == expected
    assert ort_session.resolve_providers(("cpu",)) == ["CPUExecutionProvider"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""
