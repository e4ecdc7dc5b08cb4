import json
import subprocess
import sys

import pytest

from jas_prune.cli import main


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_run_dense_end_to_end(tmp_path, tiny_builtin, capsys):
    recipe = _write(tmp_path, "version: 1\ndata:\n  images_per_class: 5\n  batch_size: 32\nruntime:\n  seed: 3\n")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out), "--set", "runtime.device=cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    dense = metrics["dense"]
    assert 0.0 <= dense["top1"] <= dense["top5"] <= 1.0
    assert dense["test_images"] == 48  # 5 per class, 80 % probe -> 1 test image per class
    n_params = sum(p.numel() for p in tiny_builtin.parameters())
    assert dense["params"] == n_params and dense["macs"] > 0
    for name in ("recipe.yaml", "report.md", "run.log"):
        assert (out / name).is_file()
    assert "seed: 3" in (out / "recipe.yaml").read_text()
    assert "device: cpu" in (out / "recipe.yaml").read_text()
    assert "## Dense model" in (out / "report.md").read_text()
    # the same directory again without --resume is refused, with --resume it is reused
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["recipe", "run", str(recipe), "--out", str(out), "--resume"]) == 0
    assert main(["report", str(out)]) == 0


# User errors (bad recipe, data, model, checkpoint, output directory, --set, ...) through the CLI:
# the matrix in tests/test_cli_bad_input.py.


@pytest.mark.parametrize("text, needle", [
    ("version: 1\nmasks: {topk: 2}\n", "masks: needs the attribution section"),
    ("version: 1\nattribution: {steps: 2}\nprune: {methods: [jas]}\n", "prune.methods: 'jas' needs the attribution and masks"),
    ("version: 1\nevaluate: {intervention: true}\n", "evaluate.intervention: needs the attribution section"),
    ("version: 1\nattribution: {steps: 2}\nevaluate: {protocols: [paper_cls_mask]}\n", "'paper_cls_mask' needs"),
    ("version: 1\nevaluate: {cls_mask: {ablation: {topk: [1]}}}\n",
     "evaluate.cls_mask.ablation: needs 'paper_cls_mask' in evaluate.protocols"),
])
def test_stage_without_its_prerequisite_is_refused_before_any_work(tmp_path, capsys, text, needle):
    recipe = _write(tmp_path, text)
    assert main(["recipe", "validate", str(recipe)]) == 2
    assert needle in capsys.readouterr().err
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_validate_ok(tmp_path, capsys):
    recipe = _write(tmp_path, "version: 1\n")
    assert main(["recipe", "validate", str(recipe), "--set", "data.batch_size=8"]) == 0
    assert "valid" in capsys.readouterr().out


def test_internal_error_exit_1(tmp_path, tiny_builtin, monkeypatch, capsys):
    from conftest import replace_stage

    def boom(ctx):
        raise ZeroDivisionError("boom")

    replace_stage(monkeypatch, "dense", boom)
    recipe = _write(tmp_path, "version: 1\ndata:\n  images_per_class: 2\n")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 1
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err
    assert "Traceback" in (out / "run.log").read_text()


def test_python_m_and_data_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jas_prune", "data", "shapes", "--split", "test", "--out",
                           str(tmp_path / "d"), "--images-per-class", "2", "--seed", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "d").rglob("*.png"))) == 48
    assert len(list((tmp_path / "d").iterdir())) == 48
