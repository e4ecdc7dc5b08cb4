"""The fast-importance benchmark's bookkeeping: pass counts, calibration subsets, the choice rule.

The benchmark itself (minutes of locating and pruning) is not run here; its candidates are
methods the engine tests cover (``jas``, ``joint_ig``).
"""

from __future__ import annotations

import torch

from jas_prune.bench_fast import CANDIDATES, Candidate, _per_class_first, candidate_scores, choose, passes_per_image
from jas_prune.bench_locate import random_vit


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


def test_joint_ig_candidate_scores_shape():
    model = random_vit(depth=3, embed_dim=16, num_heads=2, img_size=16, patch_size=8, mlp_ratio=2.0, num_classes=4)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([0, 1])
    for c in (Candidate("j", "joint_ig", 2, "gauss"), Candidate("t", "jas", 2, "gauss", top=-1)):
        sc = candidate_scores(model, c, x, y)
        assert sc.shape == (2, 3, 32) and sc.dtype == torch.float32 and torch.isfinite(sc).all()
