"""A budget split over FFN neurons, heads and head dimensions (issue 20 item 4): the cost table
against Torch-Pruning's counter, the allocator against uniform splits, the recipe's refusals, and
the prune stage's split entries (MACs; latency with its table cached across a resume)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_recipe
from jas_prune.errors import BudgetError
from jas_prune.evaluate import count_params_macs
from jas_prune.pruning.allocate import UnitScores, removed_score, score_split, uniform_split
from jas_prune.pruning.attention import HeadScores, prune_attention
from jas_prune.pruning.costs import CostTable, dense_geometry
from jas_prune.pruning.prune import prune_ffn

BASE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"


def _scores(model, seed=0) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    return UnitScores(*({b: torch.rand(n, generator=g) for b, n in dims.items()} for dims in (
        {b: f for b, (f, _, _) in dense_geometry(model).items()},
        {b: h for b, (_, h, _) in dense_geometry(model).items()},
        {b: d for b, (_, _, d) in dense_geometry(model).items()})))


def _pruned(model, scores: UnitScores, geometry, head_classes=None):
    m = copy.deepcopy(model)
    prune_ffn(m, scores.ffn, ratio=0.5, keep_widths={b: g[0] for b, g in geometry.items()}, head_classes=head_classes)
    prune_attention(m, HeadScores(scores.heads, scores.dims), keep={b: g[1:] for b, g in geometry.items()})
    return m


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cost_table_is_torch_pruning_count(tiny_vit, qkv_bias):
    model = tiny_vit(num_classes=6, depth=2, num_heads=4, qkv_bias=qkv_bias)  # FFN 64, 4 heads x 8
    scores = _scores(model)
    for head in (None, [1, 4]):
        macs = CostTable.from_model(model, "macs", head_classes=head)
        params = CostTable.from_model(model, "params", head_classes=head)
        assert macs.dense == count_params_macs(model, (3, 32, 32))["macs"]
        for geo in ({0: (64, 4, 8), 1: (64, 4, 8)}, {0: (17, 3, 8), 1: (64, 1, 5)}, {0: (1, 1, 1), 1: (40, 2, 3)}):
            m = _pruned(model, scores, geo, head)
            assert dense_geometry(m) == geo
            got = count_params_macs(m, (3, 32, 32))
            assert (macs.total(geo), params.total(geo)) == (got["macs"], got["params"]), geo


def test_score_split_meets_the_target_with_floors_and_round_to(tiny_vit):
    model = tiny_vit(num_classes=6, depth=3, num_heads=4)
    table, dense, scores = CostTable.from_model(model, "macs"), dense_geometry(model), _scores(model, 1)
    for frac in (0.8, 0.5, 0.3):
        for round_to in (None, 8):
            a = score_split(table, scores, dense, frac * table.dense, round_to=round_to)
            m = _pruned(model, scores, a.geometry)
            assert count_params_macs(m, (3, 32, 32))["macs"] == a.cost <= frac * table.dense
            assert all(f >= 1 and h >= 1 and d >= 1 for f, h, d in a.geometry.values())
            assert all(f % (round_to or 1) == 0 for f, _, _ in a.geometry.values())
    with pytest.raises(BudgetError, match="^prune.budget: .* cannot be met"):
        score_split(table, scores, dense, 0.01 * table.dense, key="prune.budget")


def test_score_split_never_removes_more_score_than_uniform(tiny_vit):
    """FFN neurons of one block cost alike: the greedy removes the fewest, lowest-scoring ones,
    so no uniform cut meeting the same target removes less score."""
    model = tiny_vit(num_classes=6, depth=3)
    table, dense = CostTable.from_model(model, "macs"), dense_geometry(model)
    for seed in range(4):
        scores = _scores(model, seed)
        scores.ffn = {b: s ** (3 * (b + 1)) for b, s in scores.ffn.items()}  # blocks with unlike distributions
        floor = table.total({b: (1, h, d) for b, (_, h, d) in dense.items()})
        for frac in (0.9, 0.5, 0.1):  # of the way from the dense count to the deepest FFN cut
            limit = table.dense - frac * (table.dense - floor)
            a = score_split(table, scores, dense, limit, units=["ffn"], normalise="model")
            u = uniform_split(table, dense, limit)
            assert a.cost <= limit and u.cost <= limit
            assert removed_score(scores, a.geometry, dense) <= removed_score(scores, u.geometry, dense) + 1e-12
    # constructed: block 0's heads carry nothing, block 1's everything; a uniform head cut loses half
    scores = _scores(model)
    scores.heads = {0: torch.tensor([0.0, 0.0]), 1: torch.tensor([1.0, 1.0]), 2: torch.tensor([1.0, 1.0])}
    limit = table.total({0: (64, 1, 16)})
    a = score_split(table, scores, dense, limit, units=["heads"], normalise="model")
    assert a.geometry == {0: (64, 1, 16), 1: (64, 2, 16), 2: (64, 2, 16)} and a.removed == 0.0


@pytest.mark.parametrize("budget,message", [
    ("{macs: 0.5, units: [ffn, ffn]}", "prune.budget.units: must list at least one of ffn, heads, head_dims, each once"),
    ("{macs: 0.5, units: [heads], split: uniform}",
     "prune.budget.split: uniform searches the FFN ratio; add ffn to units or use split: score"),
    ("{macs: 0.5, shares: [0.3]}", "prune.budget.shares: only with split uniform and heads or head_dims in units"),
    ("{macs: 0.5, units: [ffn, heads], weights: [0]}",
     "prune.budget.weights: 0.0: an attention weight is a finite number > 0"),
    ("{macs: 0.5, units: [ffn, heads], shares: [1.0]}",
     "prune.budget.shares: 1.0 is outside (0, 1): a share of each block's attention removed"),
    ("{macs: 0.5, units: [ffn, heads], logits: affine}",
     "prune.budget.logits: 'affine' compensates removed query/key channels; add head_dims to units (or logits: none)"),
])
def test_recipe_refuses_bad_split_settings_in_one_line(refused_recipe, budget, message):
    assert refused_recipe(BASE + f"prune: {{budget: {budget}}}\n") == f"jas-prune: error: {message}"


def test_recipe_refuses_a_split_with_fixed_attention_or_a_criterion_without_head_scores(refused_recipe, monkeypatch):
    from jas_prune.pruning.attention import HEAD_CRITERIA

    monkeypatch.delitem(HEAD_CRITERIA._entries, "obs")  # a criterion without head scores
    line = refused_recipe(BASE + "prune: {attention: {heads: 0.5}, budget: {macs: 0.5, units: [ffn, heads]}}\n")
    assert line.startswith("jas-prune: error: prune: budget.units: spends over heads")
    line = refused_recipe(BASE + "prune: {methods: [obs], budget: {macs: 0.5, units: [ffn, heads]}}\n")
    assert line.startswith("jas-prune: error: prune.budget.units: criterion 'obs' cannot score attention heads")


RUN = BASE + """prune:
  methods: [magnitude]
  ratios: [0.3]
  reconstruction: lsq
export: null
"""


def test_pipeline_macs_split_records_the_split_per_block(tmp_path, tiny_builtin):
    out = tmp_path / "run"
    split = "prune.budget={macs: 0.6, units: [ffn, heads, head_dims], shares: [0.25], weights: [1.0]}"
    assert run_recipe(tmp_path, RUN, out, split) == 0
    m = json.loads((out / "metrics.json").read_text())
    e = m["pruned"][1]
    b = e["budget"]
    assert e["checkpoint"].endswith("-lsq-macs60-split.safetensors")
    assert b["achieved"] == e["macs"] / m["dense"]["macs"] <= 0.6 and b["met"]
    assert [c["candidate"].split(":")[0] for c in b["candidates"]] == ["uniform", "score"]
    assert b["held_out"] is False and b["choice_images"] > 0  # every probe image calibrates here
    widths = {k: v["ffn"] for k, v in b["blocks"].items()}
    assert e["widths"] == widths and {k: len(v) for k, v in e["attention"]["kept_heads"].items()} == {
        k: v["heads"] for k, v in b["blocks"].items()}
    assert e["reconstruction_attention"] or all(v["head_dim"] == 16 and v["heads"] == 2 for v in b["blocks"].values())
    assert "## Budget split" in (out / "report.md").read_text()
    # resume: kept as it is
    assert run_recipe(tmp_path, RUN, out, split, resume=True) == 0
    assert json.loads((out / "metrics.json").read_text())["pruned"][1] == e


def test_pipeline_latency_split_keeps_its_table_on_resume(tmp_path, tiny_builtin, monkeypatch):
    from jas_prune.deploy import block_latency, latency

    timed: list = []

    def fake(path, **kw):  # each branch exported and "timed" (the test's speed: no real timing)
        timed.append(path)
        return [{"latency_ms_p50": 0.01 * len(timed), "provider": "CPUExecutionProvider", "threads": 1}]

    def whole(model, batch_size, **kw):  # the whole model: not exported (seconds each)
        return fake(None)[0]

    monkeypatch.setattr(block_latency, "benchmark_onnx", fake)
    monkeypatch.setattr(block_latency, "onnx_latency", whole)
    monkeypatch.setattr(latency, "onnx_latency", whole)
    out = tmp_path / "run"
    split = "prune.budget={latency_ms: 1000, units: [ffn, heads], split: score, points: 2}"
    assert run_recipe(tmp_path, RUN, out, split) == 0
    tables = list((out / "budget").glob("latency-*.json"))
    assert len(tables) == 1 and len(timed) == 2 + 2 * 2 + 2  # FFN grid, heads x dims grid, dense, chosen
    b = json.loads((out / "metrics.json").read_text())["pruned"][1]["budget"]
    assert b["table_cached"] is False and b["met"] and b["achieved"] > 0
    # the checkpoint lost: the entry is made again from the cached table, no block timed again
    next(out.glob("*-split.safetensors")).unlink()
    monkeypatch.setattr(block_latency, "benchmark_onnx", lambda *a, **k: pytest.fail("table measured again"))
    assert run_recipe(tmp_path, RUN, out, split, resume=True) == 0
    again = json.loads((out / "metrics.json").read_text())["pruned"][1]["budget"]
    assert again["table_cached"] is True and again["table"] == b["table"] and again["blocks"] == b["blocks"]


def test_split_budget_refuses_a_family_without_its_cost_table():
    import timm

    from jas_prune.errors import UnsupportedModelError
    from jas_prune.pruning.allocate import check_split_reachable
    from jas_prune.pruning.budget import Budget

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=14, embed_dim=32,
                            depth=1, num_heads=2, ref_feat_shape=(2, 2), num_classes=5).eval()
    with pytest.raises(UnsupportedModelError, match=r"^prune.budget: a budget split over units is made for "
                                                    r"timm-vit only, not timm-eva"):
        check_split_reachable(eva, Budget("macs", 0.5, units=("ffn", "heads"), split=("score",), weights=(1.0,)),
                              key="prune.budget")


def test_pipeline_split_with_logit_compensation(tmp_path, tiny_builtin):
    """``prune.budget.logits`` compensates the head dimensions the split removes, in every such
    block, and is part of what the entry is made with (a resume with another value remakes it)."""
    out = tmp_path / "run"
    split = "prune.budget={macs: 0.7, units: [ffn, head_dims], split: uniform, shares: [0.5], logits: affine}"
    assert run_recipe(tmp_path, RUN, out, split) == 0
    e = json.loads((out / "metrics.json").read_text())["pruned"][1]
    dims = {k for k, v in e["budget"]["blocks"].items() if v["head_dim"] < 16}
    assert dims and set(e["attention"]["logits_kept"]) == dims
    assert e["budget"]["logits"] == "affine"
    assert run_recipe(tmp_path, RUN, out, split.replace("affine", "none"), resume=True) == 0
    again = json.loads((out / "metrics.json").read_text())["pruned"][1]
    assert "logits_kept" not in again["attention"] and "logits" not in again["budget"]


def test_loss_increments_of_cumulative_scores():
    """OBS scores are the block's error after each removal: the losses are the rises, ordered as
    the greedy removed them, summing to the error of every prefix when the rises increase."""
    from jas_prune.pruning.allocate import loss_increments

    cumulative = torch.tensor([0.30, 0.01, 1e6, 0.06])  # removal order: 1, 3, 0; unit 2 never removed
    inc = loss_increments(cumulative)
    assert torch.allclose(inc, torch.tensor([0.24, 0.01, 0.24, 0.05], dtype=torch.float64))
    order = torch.argsort(cumulative)[:-1]
    assert torch.equal(torch.argsort(inc, stable=True)[:3], order)  # the lowest losses = the greedy prefix
    assert torch.allclose(torch.cumsum(inc[order], 0), cumulative[order].double())
    # a rise smaller than the one before: kept at the running maximum (an upper bound, same order)
    assert torch.allclose(loss_increments(torch.tensor([0.1, 0.3, 0.35, 9.0], dtype=torch.float64)),
                          torch.tensor([0.1, 0.2, 0.2, 0.2], dtype=torch.float64))


def test_pipeline_score_split_with_obs_scores(tmp_path, tiny_builtin):
    """A score split over obs's cumulative scores spends on their rises and meets the target."""
    out = tmp_path / "run"
    split = "prune.budget={macs: 0.6, units: [ffn, heads, head_dims], split: score, weights: [1.0]}"
    assert run_recipe(tmp_path, RUN.replace("[magnitude]", "[obs]"), out, split) == 0
    e = json.loads((out / "metrics.json").read_text())["pruned"][1]
    assert e["budget"]["met"] and e["budget"]["achieved"] <= 0.6
