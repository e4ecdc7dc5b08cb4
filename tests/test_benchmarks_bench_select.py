"""``python -m benchmarks.bench_select``: every pruning choice made on the probe partition only."""

import json

import torch

from benchmarks import bench_select
from jas_prune.recipe import parse_recipe


def test_split_is_a_per_class_half_of_the_probe_positions():
    labels = [0] * 5 + [1] * 4
    fit, val = bench_select.split_fit_val(labels, seed=3)
    assert sorted(fit + val) == list(range(9)) and not set(fit) & set(val)
    assert sum(labels[i] == 1 for i in fit) == 2 and sum(labels[i] == 0 for i in fit) in (2, 3)
    assert (fit, val) == bench_select.split_fit_val(labels, seed=3)


def test_fit_importance_uses_only_the_fit_images():
    scores = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3)
    imp = bench_select.fit_importance(scores, torch.tensor([10, 11, 12, 13]), [11, 13], [0, 5], "mean")
    assert set(imp) == {0, 5}
    torch.testing.assert_close(imp[5], (scores[1, 1] + scores[3, 1]) / 2)


def test_fit_is_the_recipes_capped_probe_and_val_the_rest_of_it():
    recipe = parse_recipe({"version": 1, "data": {"images_per_class": 10, "probe_images_per_class": 3}})
    fit, val, source = bench_select.fit_val_samples(recipe, seed=2)
    assert [s.id for s in fit] == [s.id for s in source.subset("probe")]  # what a run of the recipe reads
    assert len(fit) == 48 * 3 and len(val) == 48 * 5 and not {s.id for s in fit} & {s.id for s in val}
    test = {s.id for s in source.subset("test")}
    assert not test & {s.id for s in fit + val}
    uncapped = parse_recipe({"version": 1, "data": {"images_per_class": 10}})
    fit2, val2, _ = bench_select.fit_val_samples(uncapped, seed=2)
    assert len(fit2) == len(val2) == 48 * 4  # without a cap: seeded halves of the probe partition


RECIPE = """version: 1
data: {images_per_class: 4, probe_images_per_class: 1, batch_size: 64}
attribution: {method: jas, steps: 2, scope: all, formula: ig}
masks: {topk: 1, importance: mean_abs_centered}
prune: {methods: [jas, magnitude, vit_slim, random], ratios: [0.5]}
"""


def test_main_chooses_everything_without_reading_the_test_partition(tmp_path, tiny_builtin, monkeypatch, capsys):
    from jas_prune.data import DataSource

    subset = DataSource.subset

    def no_test(self, part, classes=None):
        assert part != "test", "bench_select must not read the test partition"
        return subset(self, part, classes)

    monkeypatch.setattr(DataSource, "subset", no_test)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "sel"
    result = bench_select.main(["--recipe", str(recipe), "--out", str(out), "--recon-methods", "jas", "magnitude",
                                "--min-gain", "0"])
    saved = json.loads((out / "select.json").read_text())
    assert saved["chosen"] == result["chosen"] and saved["fit_images"] == 48 and saved["val_images"] == 48 * 2
    chosen = saved["chosen"]
    assert set(chosen) == {"prune.calibration.target", "prune.calibration.damping", "masks.importance",
                           "jas.redundancy", "prune.vit_slim", "redundancy (other criteria)", "prune.mode (per ratio)",
                           "prune.global_min_keep"}
    steps = saved["steps"]
    jas, slim = steps["jas"], steps["vit_slim"]
    assert len(slim) == len(jas)  # ViT-Slim gets JAS's selection budget
    def top(rows, key, value):  # the chosen setting scores the best (the recipe's own wins a tie)
        return max(r["mean_top1"] for r in rows) == max(r["mean_top1"] for r in rows if r[key] == value)

    assert top(jas, "aggregation", chosen["masks.importance"])
    assert top(slim, "options", chosen["prune.vit_slim"])
    recon = steps["reconstruction"]
    assert top([r for r in recon if "target" in r], "target", chosen["prune.calibration.target"])
    assert {r["label"].split(":")[0] for r in recon} >= {"none", "bias"}
    assert set(chosen["prune.mode (per ratio)"]) == {"0.5"}
    assert "chosen:" in capsys.readouterr().out
    # a second invocation measures nothing again: every cell is read back
    cells = json.loads((out / "cells.json").read_text())
    again = bench_select.main(["--recipe", str(recipe), "--out", str(out), "--recon-methods", "jas", "magnitude",
                               "--only", "reconstruction", "--min-gain", "0"])
    assert again["chosen"]["prune.calibration.target"] == chosen["prune.calibration.target"]
    assert json.loads((out / "cells.json").read_text()) == cells


def test_a_setting_replaces_the_recipes_only_when_clearly_better():
    rows = [{"name": "current", "mean_top1": 0.900}, {"name": "other", "mean_top1": 0.9008}]
    assert bench_select._pick(rows, lambda r: r["name"] == "current", 0.001)["name"] == "current"
    assert bench_select._pick(rows, lambda r: r["name"] == "current", 0.0)["name"] == "other"
    rows[1]["mean_top1"] = 0.902
    assert bench_select._pick(rows, lambda r: r["name"] == "current", 0.001)["name"] == "other"
    assert bench_select._pick(rows, lambda r: False, 0.001)["name"] == "other"  # no current setting: the best
