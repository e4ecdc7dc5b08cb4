"""The fast-importance benchmark's bookkeeping: pass counts, calibration subsets, the choice rule,
and one tiny end-to-end run of the ``lsq`` reconstruction with row filters.

The full benchmark (minutes of locating and pruning) is not run here; its candidates are
methods the engine tests cover (``jas``, ``joint_ig``).
"""

from __future__ import annotations

import json

import torch

from benchmarks import bench_fast
from benchmarks.bench_fast import (CANDIDATES, Candidate, _per_class_first, candidate_scores, choose, passes_per_image,
                                  within_target)
from jas_prune.testing import random_vit
from jas_prune.models import discover_ffn


def test_passes_per_image():
    exact = CANDIDATES[0]
    assert passes_per_image(exact, 12) == (240, 20)  # ViT-B/16: 12 blocks × 20 steps + the path's JAS
    assert passes_per_image(exact, 6) == (120, 20)
    assert passes_per_image(Candidate("j", "joint_ig", 4, "gauss"), 12) == (4, 4)
    assert passes_per_image(Candidate("g", "jas", 2, "gauss"), 6) == (12, 2)
    # JAS at the top 12 // 3 = 4 blocks and joint IG below, each with its own path JAS
    assert passes_per_image(Candidate("t", "jas", 4, "gauss", top=-1), 12) == (20, 8)


def test_per_class_first_keeps_order_and_caps_each_class():
    labels = [0, 1, 0, 2, 1, 0, 2, 2]
    assert _per_class_first(labels, 1) == [0, 1, 3]
    assert _per_class_first(labels, 2) == [0, 1, 2, 3, 4, 6]
    assert _per_class_first(labels, 9) == list(range(8))


def _result(rows_by_seed):
    return {"depth": 6, "seeds": [{"rows": rows} for rows in rows_by_seed]}


def _row(name, n, passes, val):
    return {"candidate": name, "images_per_class": n, "passes": passes, "val": val, "test": val}


def test_choice_rule_reads_val_and_the_pass_budget():
    exact = CANDIDATES[0].name  # 140 passes per image, 2240 per class at 16 images
    rows = [
        _row(exact, 16, (120, 20), [90.0, 80.0]),
        _row("cheap but worse", 16, (1, 1), [89.0, 80.0]),        # 1 pt below at 50 %: out
        _row("good but too dear", 16, (12, 2), [91.0, 81.0]),     # 10× fewer: out
        _row("good", 16, (4, 4), [89.8, 80.4]),                   # 17.5× per image, 17.5× per class: out
        _row("good", 4, (4, 4), [89.6, 80.2]),                    # 70× per class, within 0.5: in
        _row("better", 8, (2, 2), [89.9, 80.3]),                  # 70× per class, best mean: chosen
        _row("yardstick", 16, (0, 0), [95.0, 95.0]),              # no passes: not a candidate
    ]
    assert choose(_result([rows])) == ("better", 8)
    assert choose(_result([rows]), max_loss=0.05) is None
    assert within_target(_result([rows])) == [("good", 4), ("better", 8)]
    assert within_target(_result([rows[1:]])) == []  # no exact JAS at 16 images: nothing to compare with


def test_joint_ig_candidate_scores_shape():
    model = random_vit(depth=3, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0, num_classes=4)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([0, 1])
    for c in (Candidate("j", "joint_ig", 2, "gauss"), Candidate("t", "jas", 2, "gauss", top=-1)):
        sc = candidate_scores(model, c, x, y)
        assert sc.shape == (2, 3, 32) and sc.dtype == torch.float32 and torch.isfinite(sc).all()


def test_lsq_reconstruction_is_evaluated_and_stored_apart_from_bias(tiny_builtin, tmp_path, monkeypatch):
    """Tiny setting: the builtin model replaced by a 2-block random ViT, 6 shapes images per class
    (5 probe: 2 fit / 3 val; 1 test), one candidate at 1 image per class, seed 0."""
    calls = []
    real = bench_fast.reconstruct

    def spy(pruned, dense, loader, **kw):
        fc2 = [(l.fc2, d.fc2) for l, d in zip(discover_ffn(pruned).layers, discover_ffn(dense).layers)]
        calls.append({**kw, "images": sum(len(b[0]) for b in loader), "model": pruned,
                      "widths": [p.in_features for p, _ in fc2],
                      # lsq replaces bias compensation: fc2 biases are still the dense ones when it starts
                      "dense_bias": all(torch.equal(p.bias, d.bias) for p, d in fc2)})
        return real(pruned, dense, loader, **kw)

    evaluated = []
    real_predict = bench_fast.predict_logits

    def predict(model, loader, **kw):
        if calls and kw.get("desc") in ("val", "test"):  # the pruned models of the lsq runs
            evaluated.append(model)
        return real_predict(model, loader, **kw)

    monkeypatch.setattr(bench_fast, "reconstruct", spy)
    monkeypatch.setattr(bench_fast, "predict_logits", predict)
    out = tmp_path / "fast"
    base = ["--out", str(out), "--seeds", "0", "--images-per-class", "6", "--candidates", "joint IG gauss 1"]
    assert bench_fast.main(base + ["--only-images", "1"]) == 0
    assert calls == []  # bias: no reconstruction
    bias_seed, bias_summary = (out / "seed0" / "result.json").read_bytes(), (out / "fast.json").read_bytes()

    assert bench_fast.main(base + ["--only-images", "1", "--reconstruction", "lsq"]) == 0
    assert [c["widths"] for c in calls] == [[32, 32], [19, 19]]  # 64 FFN neurons: 50 %, then 70 % removed
    assert all(c["method"] == "lsq" and c["target"] == "residual" and c["damping"] == 1e-3 for c in calls)
    assert all(c["dense_bias"] for c in calls)
    assert [c["images"] for c in calls] == [48 * 2] * 2  # the attribution images: 2 fit (not 3 val) x 48 classes
    # bias results untouched; lsq ones in their own files, marked as such
    assert (out / "seed0" / "result.json").read_bytes() == bias_seed
    assert (out / "fast.json").read_bytes() == bias_summary
    lsq = json.loads((out / "fast-lsq.json").read_text())
    bias = json.loads(bias_summary)
    assert lsq["reconstruction"] == "lsq" and bias["reconstruction"] == "bias"
    assert lsq["seeds"][0]["reconstruction"] == {"method": "lsq", "target": "residual", "damping": 1e-3,
                                                 "calibration_images": 96}
    assert [(r["candidate"], r["images_per_class"]) for r in lsq["seeds"][0]["rows"]] == [("joint IG gauss 1", 1)]
    # the pruned models evaluated (val, then test) are the reconstructed ones
    assert [id(m) for m in evaluated] == [id(c["model"]) for c in calls for _ in ("val", "test")]

    # a wider selection evaluates only the missing row and keeps the cached one
    calls.clear()
    assert bench_fast.main(base + ["--only-images", "1", "2", "--reconstruction", "lsq"]) == 0
    assert len(calls) == 2
    rows = json.loads((out / "seed0" / "result-lsq.json").read_text())["rows"]
    assert [(r["candidate"], r["images_per_class"]) for r in rows] == [("joint IG gauss 1", 1), ("joint IG gauss 1", 2)]
    assert rows[0] == lsq["seeds"][0]["rows"][0]
