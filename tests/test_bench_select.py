"""``python -m jas_prune.bench_select``: JAS's pruning configuration chosen on the probe partition only."""

import json

import torch

from jas_prune import bench_select


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


def test_main_never_reads_the_test_partition(tmp_path, tiny_builtin, monkeypatch, capsys):
    from jas_prune.data import DataSource

    subset = DataSource.subset

    def no_test(self, part, classes=None):
        assert part != "test", "bench_select must not read the test partition"
        return subset(self, part, classes)

    monkeypatch.setattr(DataSource, "subset", no_test)
    result = bench_select.main(["--out", str(tmp_path), "--images-per-class", "4", "--steps", "2", "--ratios", "0.5"])
    saved = json.loads((tmp_path / "select.json").read_text())
    assert saved["best"] == result["best"] and saved["fit_images"] + saved["val_images"] == 48 * 3
    jas = [r for r in saved["rows"] if r["criterion"] == "jas"]
    assert len(jas) == 4 * 3 and len(saved["rows"]) == 4 * 3 + 3
    assert result["best"]["mean_top1"] == max(r["mean_top1"] for r in jas)
    assert "best JAS configuration" in capsys.readouterr().out
