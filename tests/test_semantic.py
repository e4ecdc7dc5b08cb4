"""The semantic check (paper Finding 4) on constructed similarity matrices with known answers."""

import numpy as np
import pytest

from jas_prune import shapes
from jas_prune.semantic import mann_whitney_auc, parse_attributes, semantic_check

NAMES = list(shapes.CLASS_NAMES)


def _constructed(same_colour: float, same_shape: float, nothing: float) -> np.ndarray:
    attrs = parse_attributes(NAMES)
    n = len(NAMES)
    sim = np.full((n, n), nothing)
    for i in range(n):
        for j in range(n):
            if i == j:
                sim[i, j] = 1.0
            elif attrs[i][0] == attrs[j][0]:
                sim[i, j] = same_colour
            elif attrs[i][1] == attrs[j][1]:
                sim[i, j] = same_shape
    return sim


def test_known_means_pair_counts_and_perfect_auc():
    check = semantic_check(_constructed(0.9, 0.6, 0.1), NAMES)
    n_shapes, n_colours = len(shapes.SHAPES), len(shapes.COLOURS)
    assert check["pairs"] == {"shape_only": n_shapes * n_colours * (n_colours - 1) // 2,
                              "colour_only": n_colours * n_shapes * (n_shapes - 1) // 2,
                              "none": len(NAMES) * (len(NAMES) - 1) // 2 - 120 - 168}
    assert check["mean"] == pytest.approx({"shape_only": 0.6, "colour_only": 0.9, "none": 0.1})
    assert check["auc"] == check["auc_shape"] == check["auc_colour"] == 1.0


def test_paths_blind_to_attributes_give_auc_one_half_and_reversed_gives_zero():
    assert semantic_check(_constructed(0.3, 0.3, 0.3), NAMES)["auc"] == 0.5
    reversed_ = semantic_check(_constructed(0.1, 0.2, 0.8), NAMES)
    assert reversed_["auc"] == 0.0 and reversed_["mean"]["none"] == pytest.approx(0.8)


def test_mann_whitney_auc_with_ties():
    assert mann_whitney_auc([1, 2, 3], [2]) == pytest.approx(0.5)  # 0 + ½ + 1 over 3 pairs
    assert mann_whitney_auc([3, 4], [1, 2, 3]) == pytest.approx(5.5 / 6)
    assert mann_whitney_auc([], [1.0]) is None


def test_folder_names_parse_other_names_do_not():
    assert parse_attributes(["07-red-semicircle", "cyan-ring"]) == [("red", "semicircle"), ("cyan", "ring")]
    assert parse_attributes(["tench", "goldfish"]) is None
    assert parse_attributes(["red-circle", "purple-hexagon"]) is None
    assert semantic_check(np.eye(2), ["tench", "goldfish"]) is None


def test_classes_without_probe_images_are_left_out():
    sim = _constructed(0.9, 0.6, 0.1)
    valid = np.ones(len(NAMES), dtype=bool)
    valid[0] = False  # red-circle
    sim[0, :] = sim[:, 0] = -5.0  # would wreck every mean if it were used
    check = semantic_check(sim, NAMES, valid=valid)
    assert check["mean"] == pytest.approx({"shape_only": 0.6, "colour_only": 0.9, "none": 0.1})
    assert check["pairs"]["colour_only"] == 168 - (len(shapes.SHAPES) - 1)
