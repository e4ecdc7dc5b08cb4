"""Score maps: checks, per-layer normalisation and the ranking that global pruning sorts."""

from __future__ import annotations

import math

import pytest
import torch

from jas_prune.errors import InvalidArgumentError
from jas_prune.pruning.scoremap import (
    clean_protect,
    clean_score_map,
    floor_count,
    normalize_layer_scores,
    ranking_scores,
)


def test_normalizers():
    s = torch.tensor([2.0, -1.0, 3.0, 0.0])
    assert torch.equal(normalize_layer_scores(s, "mean"), s / 1.5)
    assert torch.equal(normalize_layer_scores(s, "max"), s / 3.0)
    assert torch.equal(normalize_layer_scores(s, "minmax"), (s + 1.0) / 4.0)
    assert torch.equal(normalize_layer_scores(s, "none"), s)
    assert torch.equal(normalize_layer_scores(torch.zeros(3), "mean"), torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="normalizer: unknown 'zscore'; choose one of mean, max"):
        normalize_layer_scores(s, "zscore")


def test_floor_count():
    assert [floor_count(64, k) for k in (0.05, 0.0, 5, 100, 0)] == [4, 1, 5, 64, 1]
    for bad in (-1, True, "5"):
        with pytest.raises(InvalidArgumentError, match="min_keep: expected a count"):
            floor_count(64, bad)


def test_ranking_floor_and_protection():
    s = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 3: torch.tensor([1.0, 1.0, 5.0, 0.0])}
    r = ranking_scores(s, min_keep=1, protect={3: [3]})
    inf = math.inf
    torch.testing.assert_close(r[0], torch.tensor([inf, 3.0, 2.0, 1.0]) / 2.5)
    torch.testing.assert_close(r[3], torch.tensor([1.0, 1.0, inf, inf]) / 1.75)
    assert s[0][0] == 4.0  # the input is not changed


def test_clean_maps():
    clean = clean_score_map({"2": [1, 2], torch.tensor(0): torch.ones(2, dtype=torch.float64)})
    assert list(clean) == [0, 2] and clean[2].dtype == torch.float32
    with pytest.raises(InvalidArgumentError, match="scores: block 1 given twice"):
        clean_score_map({1: [1.0], "1": [2.0]})
    with pytest.raises(InvalidArgumentError, match="scores: block index -1 is negative"):
        clean_score_map({-1: [1.0]})
    mask = torch.tensor([True, False, True])
    assert clean_protect({0: mask, 1: [2, 0, 2]}, {0: 3, 1: 3}) == {0: [0, 2], 1: [0, 2]}
    with pytest.raises(InvalidArgumentError, match=r"protect\[0\]: a boolean mask must be 1-D with one entry"):
        clean_protect({0: torch.tensor([True])}, {0: 3})
