"""What users hit with odd recipes, damaged run directories and Torch-Pruning's own head loop
(issue 18): every case refused in one line (exit 2 on the command line) with nothing left behind,
or repaired with nothing already computed lost."""

from __future__ import annotations

import warnings

import pytest
import torch

from jas_prune.cli import main


def _one_error(capsys, code: int) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# -- 8, 9: attention geometry after Torch-Pruning's own head loop ----------------------------------


def _tp_head_loop(tiny_vit):
    """Heads pruned as in Torch-Pruning's ViT example: it sets num_heads and head_dim, not attn_dim."""
    import torch_pruning as tp

    model = tiny_vit(num_classes=48, depth=2, embed_dim=64, num_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32),
                                      importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.25,
                                      num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
                                      prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=[model.head])
        pruner.step()
    for b in model.blocks:  # Torch-Pruning's examples/transformers/prune_timm_vit.py
        b.attn.num_heads = pruner.num_heads[b.attn.qkv]
        b.attn.head_dim = b.attn.qkv.out_features // (3 * b.attn.num_heads)
    a = model.blocks[0].attn
    assert a.num_heads == 2 and a.attn_dim != a.num_heads * a.head_dim  # stale
    return model


def test_stale_attn_dim_is_repaired_on_save_and_load(tiny_vit, tmp_path, capsys):
    from safetensors import safe_open

    from jas_prune import load_pruned, save_pruned
    from jas_prune.checkpoint import save_pruned as _save  # noqa: F401 - the public one is the same

    model = _tp_head_loop(tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    path = save_pruned(model, tmp_path / "heads.safetensors")
    a = model.blocks[0].attn
    assert a.attn_dim == a.num_heads * a.head_dim  # the model saved works again
    with torch.no_grad():
        expected = model(x)
    loaded = load_pruned(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
    # a file written before the check (stale attn_dim stored): repaired when loading
    import json

    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["jas_prune"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["geometry"]["blocks.0.attn"]["attn_dim"] = 64  # the dense width
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata={"jas_prune": json.dumps(meta)})
    with torch.no_grad():
        assert torch.allclose(load_pruned(old)(x), expected, atol=1e-6)
    # ... and exported by the CLI without a traceback
    code = main(["export", "onnx", str(old), "--out", str(tmp_path / "old.onnx"), "--no-benchmark"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "attn_dim was 64, not num_heads x head_dim" in err, err
    # heads x head_dim that cannot fit qkv: refused in one line naming the block, nothing written
    meta["geometry"]["blocks.1.attn"]["head_dim"] = 7
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"jas_prune": json.dumps(meta)})
    out = tmp_path / "bad" / "bad.onnx"
    line = _one_error(capsys, main(["export", "onnx", str(bad), "--out", str(out), "--no-benchmark"]))
    qkv = model.blocks[1].attn.qkv.out_features
    assert f"blocks.1.attn: num_heads 2 x head_dim 7 does not fit its qkv weight ({qkv} outputs" in line
    assert not out.parent.exists()


def test_no_head_left_is_refused_naming_the_block(tiny_vit):
    from jas_prune.errors import PruneSettingError
    from jas_prune.pruning.graph import update_attention_geometry

    model = tiny_vit(num_classes=6, depth=2)
    with pytest.raises(PruneSettingError, match=r"^blocks\.1\.attn: no attention head left after pruning"):
        update_attention_geometry(model, {model.blocks[1].attn.qkv: 0})


# -- 3: --out targets a run must not write into ----------------------------------------------------


def _recipe(tmp_path, text: str = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_out_root_and_home_are_refused(tmp_path, monkeypatch):
    from jas_prune.errors import OutputDirError
    from jas_prune.io import refuse_system_dir

    with pytest.raises(OutputDirError, match=r"^--out /: is the file-system root; choose a new directory"):
        refuse_system_dir("/", "--out /")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputDirError, match="is your home directory"):
        refuse_system_dir("~", "--out ~")


@pytest.mark.parametrize("target", ["home", "other-files"])
def test_recipe_run_refuses_home_and_a_foreign_directory(target, tmp_path, tiny_builtin, monkeypatch, capsys):
    out = tmp_path / target
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if target == "home":
        monkeypatch.setenv("HOME", str(out))
    line = _one_error(capsys, main(["recipe", "run", str(_recipe(tmp_path)), "--out", str(out)]))
    expected = "is your home directory" if target == "home" else \
        "not empty and not a jas-prune run directory (it holds 'notes.txt')"
    assert line.startswith(f"jas-prune: error: --out {out}: ") and expected in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, no lock file


def test_data_shapes_refuses_the_home_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    line = _one_error(capsys, main(["data", "shapes", "--split", "test", "--out", str(tmp_path)]))
    assert "is your home directory" in line and list(tmp_path.iterdir()) == []


# -- 4: class count vs the head, a model without a classifier --------------------------------------


def _png_folder(root, classes: int):
    import numpy as np
    from PIL import Image

    for c in range(classes):
        for i in range(2):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(10 * c + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


def test_class_count_not_matching_the_head_is_refused_before_any_stage(tmp_path, tiny_builtin, capsys):
    root = _png_folder(tmp_path / "images", 4)
    recipe = _recipe(tmp_path, f"version: 1\ndata: {{kind: imagefolder, root: {root}}}\n"
                               "attribution: {steps: 2}\nexport: {onnx: {benchmark: false}}\n")
    out = tmp_path / "run"
    line = _one_error(capsys, main(["recipe", "run", str(recipe), "--out", str(out)]))
    assert f"data: 4 classes (data.root {root}) but model 'builtin:shapes-vit' has 48 outputs" in line
    assert "model.num_classes: 4" in line and not out.exists()


def test_a_model_without_classifier_is_refused_up_front(tmp_path, capsys):
    # a self-supervised timm backbone: num_classes 0 by default
    recipe = _recipe(tmp_path, "version: 1\nmodel: {name: vit_small_patch16_224.dino}\ndata: {images_per_class: 2}\n")
    out = tmp_path / "run"
    line = _one_error(capsys, main(["recipe", "run", str(recipe), "--out", str(out)]))
    assert "model 'vit_small_patch16_224' has no classifier (num_classes 0)" in line
    assert "model.num_classes: 48" in line and not out.exists()


def test_locate_refuses_a_model_without_classifier(tiny_vit):
    import jas_prune
    from jas_prune.errors import UnsupportedModelError

    model = tiny_vit(num_classes=0)
    with pytest.raises(UnsupportedModelError, match=r"has no classifier \(num_classes 0\)"):
        jas_prune.locate(model, torch.randn(1, 3, 32, 32), torch.tensor([30]), steps=2)


# -- 6: jas-prune report on what is not a (finished) run -------------------------------------------


@pytest.mark.parametrize("content", ["empty", "another-tool"])
def test_report_refusal_leaves_no_lock_file(content, tmp_path, capsys):
    run = tmp_path / "d"
    run.mkdir()
    if content == "another-tool":
        (run / "events.out").write_text("x")
    before = sorted(p.name for p in run.iterdir())
    line = _one_error(capsys, main(["report", str(run)]))
    assert "no metrics.json (not a jas-prune run directory)" in line
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.fixture
def dense_run(tmp_path, tiny_builtin, capsys):
    out = tmp_path / "run"
    assert main(["recipe", "run", str(_recipe(tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_report_of_an_unfinished_run_says_so(dense_run, capsys):
    import json

    metrics = json.loads((dense_run / "metrics.json").read_text())
    del metrics["run"]  # as a run killed after its dense stage leaves it
    (dense_run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(dense_run)]) == 0
    err = capsys.readouterr().err
    assert f"jas-prune: warning: {dense_run}: this run did not finish (stopped or killed after: dense)" in err
    assert "--resume" in err
    assert "## Warning: unfinished run" in (dense_run / "report.md").read_text()
    # a finished run has no such warning
    metrics["run"] = {"seconds": 1.0}
    (dense_run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(dense_run)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "unfinished" not in (dense_run / "report.md").read_text()


def test_report_storage_advice_names_no_flag_report_lacks(dense_run, capsys, monkeypatch):
    import errno

    from jas_prune import io
    from jas_prune.reporting import single

    def refused(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", tmp)

    monkeypatch.setattr(single, "atomic_write_text", lambda path, text, **kw: io.atomic_write(path, refused, **kw))
    line = _one_error(capsys, main(["report", str(dense_run)]))
    assert "permission denied (EACCES)" in line and "jas-prune report again" in line
    assert "--resume" not in line and "--out" not in line


# -- 5: damaged paths/ chunks and fingerprint on --resume ------------------------------------------

LOCATE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\nattribution: {steps: 2}\n"


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}  # not the file's memory map


def test_resume_recomputes_a_damaged_chunk_and_refuses_a_damaged_fingerprint(tmp_path, tiny_builtin, capsys):
    out = tmp_path / "run"
    args = ["recipe", "run", str(_recipe(tmp_path, LOCATE)), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    probe = out / "paths" / "probe"
    chunks = sorted(probe.glob("chunk-*.safetensors"))
    assert len(chunks) == 2
    clean = [_tensors(c) for c in chunks]
    kept = chunks[0].stat().st_mtime_ns
    chunks[1].write_bytes(chunks[1].read_bytes()[:1000])  # truncated
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"locate probe: {chunks[1]} is damaged (" in err and "locating its images again" in err
    assert chunks[0].stat().st_mtime_ns == kept  # nothing already computed is redone
    for a, b in zip(clean, (_tensors(c) for c in chunks)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # garbage in the fingerprint: refused naming the file and the way on, nothing changed
    fingerprint = probe / "fingerprint.json"
    fingerprint.write_text("{not json")
    state = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".jas-prune.lock"}  # noqa: E731
    before = state()
    line = _one_error(capsys, main(args + ["--resume"]))
    assert f"{fingerprint}: damaged (" in line and "the 2 finished chunk(s)" in line
    assert "delete that file and rerun with --resume" in line
    assert state() == before
    # ... and the way on works, the chunks kept
    fingerprint.unlink()
    assert main(args + ["--resume"]) == 0
    assert chunks[0].stat().st_mtime_ns == kept


# -- shipped recipes run as shipped ---------------------------------------------------------------


def _shipped():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_its_data_step_runs(path, capsys):
    """Every recipe in recipes/ validates and finds its data with nothing made by hand, one class
    per output of its model's head."""
    from jas_prune.data import source_for
    from jas_prune.recipe import load_recipe

    assert main(["recipe", "validate", str(path)]) == 0, capsys.readouterr().err
    recipe = load_recipe(path)
    source = source_for(recipe.data, recipe.runtime.seed)
    outputs = recipe.model.num_classes or (48 if recipe.model.name == "builtin:shapes-vit" else None)
    assert source.num_classes == outputs and source.probe and source.test


# -- cosmetics --------------------------------------------------------------------------------------


def test_single_image_class_gets_a_notice(tmp_path, caplog):
    import logging

    from jas_prune.data import build_source

    root = _png_folder(tmp_path / "images", 2)
    (root / "c1" / "1.png").unlink()
    with caplog.at_level(logging.INFO, logger="jas_prune"):
        build_source("imagefolder", root=str(root))
    assert "1 class with a single image (e.g. 'c1') in the probe partition only: no test image" in caplog.text


def test_a_link_to_the_data_root_is_not_a_class(tmp_path, capsys):
    import os

    from jas_prune.data import build_source
    from jas_prune.errors import DataError

    root = _png_folder(tmp_path / "images", 2)
    os.symlink(".", root / "x")
    with pytest.raises(DataError, match=r"class folder 'x' in .* is a link to .*which holds the data root itself"):
        build_source("imagefolder", root=str(root))


def test_a_newline_in_a_class_name_keeps_report_tables_whole():
    from jas_prune.reporting.format import table
    from jas_prune.reporting.tables import classes_label

    assert classes_label([0, 1], ["red\ncircle", "a|b"]) == "red circle, a\\|b"
    assert table(["class", "n"], [["red\ncircle", "1"]])[2] == "| red circle | 1 |"


def test_a_refused_run_prints_only_its_error(tmp_path, tiny_builtin, capsys):
    """Refused after the lock (a class the data set lacks): no "run DIR on cpu" line first."""
    recipe = _recipe(tmp_path, "version: 1\ndata: {images_per_class: 2}\n"
                               "prune: {methods: [random], classes: [purple-hexagon]}\n")
    line = _one_error(capsys, main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]))
    assert "prune.classes: 'purple-hexagon' is not a class of the data set" in line
    recipe = _recipe(tmp_path, "version: 1\ndata: {images_per_class: 2, classes: 5}\n")
    line = _one_error(capsys, main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]))
    assert "data: 5 classes (data.kind shapes) but model 'builtin:shapes-vit' has 48 outputs" in line
    assert "data.classes: 48" not in line and "model.num_classes: 5" in line


def test_locating_prints_no_pytorch_future_warning(tmp_path):
    """The first make_dual of a process used to print PyTorch's torch.jit.script FutureWarning."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch, jas_prune\nfrom tests.conftest import make_tiny_vit\n"
            "jas_prune.locate(make_tiny_vit(), torch.randn(1, 3, 32, 32), torch.tensor([0]), steps=2)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0 and "FutureWarning" not in proc.stderr, proc.stderr[-2000:]
