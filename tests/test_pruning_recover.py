"""``prune.recover`` / ``jas_prune.recover``: distillation lowers the student–teacher KL on held-out
images (logits and token targets, cut head), and a resumed run keeps its finished entries."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import jas_prune
from jas_prune.cli import main
from jas_prune.errors import InvalidArgumentError
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.recover import kd_loss


def _held_out_kl(student, teacher, x, keep=None) -> float:
    with torch.no_grad():
        t = teacher(x)
        return float(kd_loss(student(x), t if keep is None else t[:, keep], 1.0))


@pytest.mark.parametrize("targets", [["logits"], ["logits", "tokens"]])
def test_distillation_lowers_the_held_out_kl(tiny_vit, targets):
    torch.manual_seed(0)
    dense = tiny_vit(num_classes=6)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, {b: torch.rand(64) for b in range(2)}, ratio=0.75)
    train = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    held_out = torch.randn(64, 3, 32, 32)
    before = _held_out_kl(pruned, dense, held_out)
    done = jas_prune.recover(pruned, dense, train, steps=40, lr=3e-3, targets=targets, progress=False)
    assert done["steps"] == 40 and done["seconds"] > 0
    assert _held_out_kl(pruned, dense, held_out) < 0.5 * before
    assert not pruned.training


def test_cut_head_distills_on_the_kept_classes(tiny_vit):
    dense = tiny_vit(num_classes=6)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, {b: torch.rand(64) for b in range(2)}, ratio=0.5, head_classes=[1, 4])
    held_out = torch.randn(64, 3, 32, 32)
    before = _held_out_kl(pruned, dense, held_out, keep=[1, 4])
    jas_prune.recover(pruned, dense, [(torch.randn(32, 3, 32, 32), None)] * 3, steps=30, lr=3e-3, progress=False)
    assert _held_out_kl(pruned, dense, held_out, keep=[1, 4]) < before
    with pytest.raises(InvalidArgumentError, match="head_classes"):
        jas_prune.recover(pruned, dense, [torch.randn(4, 3, 32, 32)], steps=1, head_classes=[], progress=False)


RECIPE = """version: 1
data: {images_per_class: 4, batch_size: 64}
prune:
  methods: [magnitude, random]
  ratios: [0.5]
  recover: {steps: 3, batch_size: 8, targets: [logits, tokens]}
runtime: {device: cpu, seed: 0}
"""


def test_recovery_in_the_pipeline_is_recorded_and_resumed(tiny_builtin, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("jas_prune.reporting.write_report", lambda run_dir: run_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0
    entries = json.loads((out / "metrics.json").read_text())["pruned"]
    assert [e["recover"]["steps"] for e in entries] == [3, 3]
    assert entries[0]["recover"]["settings"]["targets"] == ["logits", "tokens"]
    calls = []
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jas_prune.pruning.recover.recover", lambda *a, **k: calls.append(1) or {})
        assert main(["recipe", "run", str(recipe), "--out", str(out), "--resume"]) == 0
    assert not calls and capsys.readouterr().err.count("kept pruned-") == 2
    assert json.loads((out / "metrics.json").read_text())["pruned"] == entries
    # other recovery settings: the entries are made again
    recipe.write_text(RECIPE.replace("steps: 3", "steps: 2"))
    assert main(["recipe", "run", str(recipe), "--out", str(out), "--resume"]) == 0
    assert [e["recover"]["steps"] for e in json.loads((out / "metrics.json").read_text())["pruned"]] == [2, 2]
