"""Reconstruction in the recipe pipeline (issue 12): recipe keys, the probe cap, class subsets,
per-ratio allocation, the pruned entries' records, and a reconstructed checkpoint through
load_pruned and ONNX."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from conftest import run_recipe
from jas_prune import load_pruned, reconstruct, save_pruned
from jas_prune.cli import main
from jas_prune.data import build_source
from jas_prune.errors import InvalidArgumentError, RecipeError
from jas_prune.models import discover_ffn
from jas_prune.pruning.prune import prune_ffn
from jas_prune.pruning.calibration import cached_batches, draw_class_subsets, per_class_cap
from jas_prune.recipe import parse_recipe

BASE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"


@pytest.mark.parametrize("prune, message", [
    ("prune: {reconstruction: lsqq}", "prune.reconstruction: must be one of 'none', 'bias' or 'lsq' (got 'lsqq')"),
    ("prune: {reconstruction: []}", "prune.reconstruction: must list at least one of none, bias, lsq, each once"),
    ("prune: {reconstruction: [lsq, lsq]}", "prune.reconstruction: must list at least one of none, bias, lsq, each once"),
    ("prune: {reconstruction: lsq, bias_compensation: true}",
     "prune.bias_compensation: is the older spelling of prune.reconstruction (['bias']); give only prune.reconstruction"),
    ("prune: {calibration: {damping: -1}}", "prune.calibration.damping: must be ≥ 0.0 (got -1)"),
    ("prune: {calibration: {damping: .inf}}", "prune.calibration.damping: must be a finite number ≥ 0 (got inf)"),
    ("prune: {calibration: {target: dense}}",
     "prune.calibration.target: must be one of 'local', 'global' or 'residual' (got 'dense')"),
    ("prune: {calibration: {images_per_class: 0}}", "prune.calibration.images_per_class: must be ≥ 1 (got 0)"),
    ("prune: {calibration: {image_per_class: 3}}",
     "prune.calibration.image_per_class: unknown key (did you mean 'images_per_class'?)"),
    ("prune: {mode: {1.5: global}}", "prune.mode: ratio 1.5 is outside (0, 1)"),
    ("prune: {mode: everywhere}", "prune.mode: must be one of 'uniform' or 'global' (got 'everywhere')"),
    ("prune: {global_min_keep: 2}", "prune.global_min_keep: must be ≤ 1.0 (got 2)"),
    ("prune: {class_subsets: {count: 0, size: 6}}", "prune.class_subsets.count: must be ≥ 1 (got 0)"),
    ("prune: {class_subsets: {count: 2, size: 6, ratios: [1.0]}}",
     "prune.class_subsets.ratios: 1.0 is outside (0, 1): a ratio is the fraction of FFN neurons removed"),
])
def test_recipe_keys_reject_bad_values_with_one_line(refused_recipe, prune, message):
    assert refused_recipe(BASE + prune + "\n") == f"jas-prune: error: {message}"


def test_class_subsets_larger_than_the_data_set_are_refused_before_work(tmp_path, capsys, tiny_builtin):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + "prune: {methods: [random], class_subsets: {count: 1, size: 49}}\n")
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("jas-prune: error: prune.class_subsets.size: 49 is not between 1 and the 48 classes "
                       "of the data set")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bias_compensation_is_an_alias_of_reconstruction():
    def recon(prune):
        return parse_recipe({"version": 1, "prune": prune}).prune.reconstructions

    assert recon({}) == ["none"]
    assert recon({"bias_compensation": True}) == ["bias"]
    assert recon({"bias_compensation": False}) == ["none"]
    assert recon({"bias_compensation": [False, True]}) == ["none", "bias"]
    assert recon({"reconstruction": "lsq"}) == ["lsq"]
    assert recon({"reconstruction": ["none", "bias"], "bias_compensation": [False, True]}) == ["none", "bias"]
    with pytest.raises(RecipeError, match="older spelling"):
        recon({"reconstruction": ["none", "lsq"], "bias_compensation": [False]})
    # the resolved recipe names only the canonical key, and reads back the same
    r = parse_recipe({"version": 1, "prune": {"bias_compensation": [False, True]}})
    dumped = r.prune.model_dump(mode="json", by_alias=True)
    assert dumped["reconstruction"] == ["none", "bias"] and dumped["bias_compensation"] is None
    assert parse_recipe({"version": 1, "prune": dumped}).prune.reconstructions == ["none", "bias"]


def test_mode_per_ratio():
    p = parse_recipe({"version": 1, "prune": {"ratios": [0.5, 0.9], "mode": {0.5: "global"}}}).prune
    assert p.mode_for(0.5) == "global" and p.mode_for(0.9) == "uniform"
    assert parse_recipe({"version": 1, "prune": {"mode": "global"}}).prune.mode_for(0.3) == "global"


def test_probe_cap_keeps_the_test_partition_and_is_in_the_fingerprint():
    full = build_source("shapes", seed=3, images_per_class=10)
    capped = build_source("shapes", seed=3, images_per_class=10, probe_images_per_class=3)
    assert capped.test == full.test and set(capped.probe) < set(full.probe)
    per_class = {}
    for s in capped.subset("probe"):
        per_class[s.label] = per_class.get(s.label, 0) + 1
    assert set(per_class.values()) == {3} and len(per_class) == 48
    assert capped.selection_fingerprint() != full.selection_fingerprint()
    assert capped.selection_fingerprint()["probe_images_per_class"] == 3
    assert "probe_images_per_class" not in full.selection_fingerprint()  # older runs' fingerprints unchanged
    again = build_source("shapes", seed=3, images_per_class=10, probe_images_per_class=3)
    assert again.probe == capped.probe
    assert build_source("shapes", seed=3, images_per_class=10, probe_images_per_class=50).probe == full.probe


def test_class_subsets_are_distinct_seeded_and_nested_by_count():
    a = draw_class_subsets(48, 5, 6, seed=1)
    assert len({tuple(s) for s in a}) == 5 and all(len(set(s)) == 6 and s == sorted(s) for s in a)
    assert draw_class_subsets(48, 5, 6, seed=1) == a and draw_class_subsets(48, 5, 6, seed=2) != a
    assert draw_class_subsets(48, 7, 6, seed=1)[:5] == a
    assert sorted(draw_class_subsets(4, 6, 2, seed=0)) == [list(c) for c in itertools.combinations(range(4), 2)]
    with pytest.raises(InvalidArgumentError, match="7 distinct subsets of 2 of 4 classes do not exist"):
        draw_class_subsets(4, 7, 2, seed=0)


def test_per_class_cap_and_cached_batches():
    class S:
        def __init__(self, label):
            self.label = label

    samples = [S(c) for c in (0, 1, 0, 0, 1, 2)]
    assert [s.label for s in per_class_cap(samples, 2)] == [0, 1, 0, 1, 2]
    assert per_class_cap(samples, None) == samples
    batches = [(torch.zeros(2, 3), torch.zeros(2)) for _ in range(3)]
    assert cached_batches(iter(batches)) == batches
    assert cached_batches(batches, limit_bytes=10) is batches  # too big to hold: the loader itself


RUN = """version: 1
data: {images_per_class: 3, probe_images_per_class: 1, batch_size: 32}
attribution: {method: jas, steps: 2, scope: all, formula: ig}
masks: {topk: 1, importance: mean_abs_centered}
prune:
  methods: [jas, magnitude]
  ratios: [0.5, 0.75]
  mode: {0.5: global}
  reconstruction: [none, bias, lsq]
  calibration: {target: residual, damping: 0.01}
  class_subsets: {count: 1, size: 3, ratios: [0.75], head: cut}
"""


@pytest.fixture
def recon_run(tmp_path, tiny_builtin):
    out = tmp_path / "run"
    assert run_recipe(tmp_path, RUN, out) == 0
    return out


def test_pipeline_records_every_reconstruction_and_class_subset(recon_run, tiny_builtin):
    m = json.loads((recon_run / "metrics.json").read_text())
    assert m["data"]["probe"] == 48 and m["data"]["test"] == 48  # 1 of 2 probe images per class kept
    entries = m["pruned"]
    general = [e for e in entries if e["classes"] is None]
    assert len(general) == 2 * 2 * 3 and len(entries) == len(general) + 1 * 2 * 1 * 3
    for e in general:
        assert e["mode"] == ("global" if e["ratio"] == 0.5 else "uniform")
        assert e["bias_compensation"] == (e["reconstruction"] == "bias")  # the SPEC key stays
        assert e["test_images"] == 48
        if e["reconstruction"] == "none":
            assert "reconstruction_target" not in e and "calibration_images" not in e
        else:
            assert e["reconstruction_target"] == "residual" and e["calibration_images"] == 48
            assert e["reconstruction_seconds"] > 0 and len(e["reconstruction_blocks"]) == 2
            assert e.get("reconstruction_damping") == (0.01 if e["reconstruction"] == "lsq" else None)
            for b in e["reconstruction_blocks"]:
                assert b["relative_after"] <= b["relative_before"] + 1e-12
    names = {e["checkpoint"] for e in entries}
    assert {"pruned-jas-r50.safetensors", "pruned-jas-r50-bc.safetensors", "pruned-jas-r50-lsq.safetensors"} <= names
    assert len(names) == len(entries)  # every variant its own checkpoint
    subsets = [e for e in entries if e["classes"] is not None]
    drawn = draw_class_subsets(48, 1, 3, seed=0)
    assert sorted({tuple(e["classes"]) for e in subsets}) == sorted(tuple(s) for s in drawn)
    for e in subsets:
        assert e["class_subset"] == 0 and e["head"] == "cut" and e["ratio"] == 0.75
        assert e["test_images"] == 3 and (e["reconstruction"] == "none" or e["calibration_images"] == 3)
        model = load_pruned(recon_run / e["checkpoint"])
        assert model.head.out_features == 3
    report = (recon_run / "report.md").read_text()
    assert "| reconstruction |" in report and "## JAS against the best other criterion" in report
    assert "1 random subsets of 3 classes" in report


def test_resume_keeps_finished_reconstructions_and_redoes_changed_ones(recon_run, tmp_path):
    before = {e["checkpoint"]: e for e in json.loads((recon_run / "metrics.json").read_text())["pruned"]}
    mtime = {c: (recon_run / c).stat().st_mtime_ns for c in before}
    assert main(["recipe", "run", str(tmp_path / "r.yaml"), "--out", str(recon_run), "--resume",
                 "--set", "prune.calibration.damping=0.1"]) == 0
    after = {e["checkpoint"]: e for e in json.loads((recon_run / "metrics.json").read_text())["pruned"]}
    assert set(after) == set(before)
    for c, e in after.items():  # only lsq depends on the damping
        redone = (recon_run / c).stat().st_mtime_ns != mtime[c]
        assert redone == (e["reconstruction"] == "lsq"), c
        assert e.get("reconstruction_damping") == (0.1 if e["reconstruction"] == "lsq" else None)


def test_reconstructed_checkpoint_reloads_and_exports_to_onnx_with_parity(tiny_vit, tmp_path):
    from jas_prune.deploy.onnx_export import export_onnx
    from jas_prune.deploy.verify import verify_onnx

    dense = tiny_vit(num_classes=6, depth=2)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, {l.index: torch.rand(l.hidden, generator=torch.Generator().manual_seed(l.index))
                       for l in discover_ffn(pruned).layers}, ratio=0.5)
    before = [l.fc2.weight.clone() for l in discover_ffn(pruned).layers]
    rep = reconstruct(pruned, dense, [(x[:8], None), (x[8:], None)])
    assert rep.method == "lsq" and any(b.refit for b in rep.blocks)
    assert any(not torch.equal(b, l.fc2.weight) for b, l in zip(before, discover_ffn(pruned).layers))
    path = save_pruned(pruned, tmp_path / "rec.safetensors")
    back = load_pruned(path)
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    export_onnx(back, tmp_path / "rec.onnx")
    res = verify_onnx(tmp_path / "rec.onnx", back, x)
    assert res["parity_max_abs"] <= 1e-4 and res["top1_agreement"] == 1.0
