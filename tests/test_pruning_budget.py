"""``prune.budget`` (issue 14): the smallest uniform ratio whose pruned model meets a MACs, params
or ONNX latency target — the search (against brute force on a tiny model), its refusals, and the
prune stage's budget entries."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import run_recipe
from jas_prune.deploy import onnx_latency
from jas_prune.errors import BudgetError, InvalidArgumentError
from jas_prune.evaluate import count_params_macs
from jas_prune.models import discover_ffn
from jas_prune.pruning.budget import Budget, bisect_first, find_ratio, ratio_grid
from jas_prune.pruning.prune import prune_ffn

BASE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"


def _fraction(dense, ratio, what, round_to=None, seed=0):
    """Brute force: prune a copy with random scores at ``ratio`` and count (widths do not depend
    on the scores under a uniform cut, so any scores give the same count)."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(dense)
    prune_ffn(model, {l.index: torch.randn(l.hidden, generator=g) for l in discover_ffn(model).layers},
              ratio=ratio, round_to=round_to)
    return count_params_macs(model, (3, 32, 32))[what] / count_params_macs(dense, (3, 32, 32))[what]


def test_bisect_first_finds_the_first_true_in_few_calls():
    for n in range(1, 41):
        for t in range(n + 1):
            calls = []

            def meets(i):
                calls.append(i)
                return i >= t

            assert bisect_first(n, meets) == (t if t < n else None)
            assert len(calls) <= math.ceil(math.log2(n)) + 2, (n, t, calls)


def test_ratio_grid_ends_at_one_neuron_per_block():
    assert ratio_grid({0: 64}, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 63 / 64]
    grid = ratio_grid({0: 32, 1: 16}, 0.01)
    assert grid == [i / 100 for i in range(1, 100)]  # 0.99 already keeps one neuron of 32
    assert ratio_grid([3072], 0.01)[-1] == 3071 / 3072


@pytest.mark.parametrize("what", ["macs", "params"])
@pytest.mark.parametrize("round_to", [None, 8])
def test_budget_is_met_by_the_smallest_ratio(tiny_vit, what, round_to):
    dense = tiny_vit(num_classes=6, depth=3, mlp_ratio=4.0)  # FFN width 128
    for target in (0.55, 0.6, 0.8, 0.97):  # the FFNs are about half of this model's MACs
        budget = Budget(what, target, step=0.05)
        res = find_ratio(dense, budget, round_to=round_to)
        got = _fraction(dense, res.ratio, what, round_to)
        assert got == pytest.approx(res.achieved) and got <= target, (target, res.ratio)
        grid = ratio_grid({0: 128}, 0.05)
        i = grid.index(res.ratio)
        if i > 0:  # minimal: one step less does not meet it
            assert _fraction(dense, grid[i - 1], what, round_to) > target, (target, res.ratio)
        assert res.record() == {"target": what, "value": target, "step": 0.05, "ratio": res.ratio,
                                "achieved": res.achieved, "models_measured": res.models}
        assert all(w % (round_to or 1) == 0 for w in res.widths.values())


def test_unreachable_budget_names_the_key(tiny_vit):
    dense = tiny_vit(num_classes=6, depth=2)  # FFN width 64
    floor = _fraction(dense, 63 / 64, "macs")
    with pytest.raises(BudgetError) as err:
        find_ratio(dense, Budget("macs", 0.05), key="prune.budget")
    assert str(err.value) == (f"prune.budget.macs: 0.05 cannot be met: keeping one FFN neuron per block leaves "
                              f"{floor:.3f} of the dense model's MACs; raise prune.budget.macs")
    floor8 = _fraction(dense, 63 / 64, "params", round_to=8)
    with pytest.raises(BudgetError, match=f"^budget.params: 0.1 cannot be met: keeping 8 FFN neurons per block "
                                          f"leaves {floor8:.3f} of the dense model's parameters; raise budget.params$"):
        find_ratio(dense, Budget("params", 0.1), round_to=8)


def _fake_latency(calls):
    """A latency that grows with the FFN widths: 1 ms per 32 neurons (dense tiny model: 4 ms)."""
    def latency(model, batch_size=1, **kw):
        calls.append(tuple(discover_ffn(model).widths))
        return {"latency_ms_p50": sum(discover_ffn(model).widths) / 32, "latency_ms_p90": 9.0,
                "provider": "fake", "threads": 1, "iters": 3}
    return latency


def test_latency_budget_measures_each_width_once_and_is_minimal(tiny_vit):
    dense = tiny_vit(num_classes=6, depth=2)
    calls: list = []
    res = find_ratio(dense, Budget("latency_ms", 2.5, batch_size=4), latency=_fake_latency(calls))
    # 2.5 ms allows 80 neurons over 2 blocks: 40 of 64 each -> round(64 r) >= 24 -> r = 0.37
    assert res.ratio == 0.37 and res.widths == {0: 40, 1: 40} and res.achieved == 2.5
    assert len(calls) == len(set(calls)) == res.models
    assert res.record()["batch_size"] == 4 and res.record()["provider"] == "fake"
    with pytest.raises(BudgetError, match=r"^budget.latency_ms: 0.01 cannot be met: keeping one FFN neuron per "
                                          r"block takes 0.0625 ms p50 at batch 1 in ONNX Runtime; raise "
                                          r"budget.latency_ms$"):
        find_ratio(dense, Budget("latency_ms", 0.01), latency=_fake_latency([]))


def test_latency_budget_through_onnx_runtime(tiny_vit):
    """The real path: each candidate exported to a temporary ONNX file and timed; a budget the
    least pruning meets costs two measurements (the deepest cut, then the first ratio)."""
    dense = tiny_vit(num_classes=6, depth=2)
    res = find_ratio(dense, Budget("latency_ms", 1e4, batch_size=2, threads=1),
                     latency=lambda m: onnx_latency(m, 2, threads=1, providers=("cpu",)))
    assert res.ratio == 0.01 and res.models == 2 and 0 < res.achieved < 1e4
    assert res.latency["provider"] == "CPUExecutionProvider" and res.latency["batch_size"] == 2


def test_budget_arguments_are_checked():
    with pytest.raises(InvalidArgumentError, match="budget: unknown target 'flops'"):
        Budget("flops", 0.5)
    with pytest.raises(InvalidArgumentError, match=r"budget.macs: 1.5 is a fraction of the dense model's"):
        Budget("macs", 1.5)
    with pytest.raises(InvalidArgumentError, match="budget.batch_size: only with latency_ms"):
        Budget("macs", 0.5, batch_size=8)
    assert Budget("latency_ms", 3).batch_size == 1
    assert [Budget("macs", 0.6).suffix(), Budget("params", 0.455).suffix(),
            Budget("latency_ms", 12.5, batch_size=8).suffix()] == ["macs60", "params45p5", "lat12p5ms-bs8"]


@pytest.mark.parametrize("prune, message", [
    ("prune: {budget: {}}", "prune.budget: give exactly one of macs, params or latency_ms"),
    ("prune: {budget: {macs: 0.5, params: 0.5}}",
     "prune.budget: give exactly one of macs, params or latency_ms (got macs, params)"),
    ("prune: {budget: {macs: 0}}", "prune.budget.macs: must be > 0.0 (got 0)"),
    ("prune: {budget: {macs: 1.5}}", "prune.budget.macs: must be ≤ 1.0 (got 1.5)"),
    ("prune: {budget: {params: -0.1}}", "prune.budget.params: must be > 0.0 (got -0.1)"),
    ("prune: {budget: {latency_ms: .inf}}", "prune.budget.latency_ms: input should be a finite number (got inf)"),
    ("prune: {budget: {latency_ms: 5, batch_size: 0}}", "prune.budget.batch_size: must be ≥ 1 (got 0)"),
    ("prune: {budget: {macs: 0.5, batch_size: 8}}",
     "prune.budget.batch_size: only with latency_ms (MACs and parameters do not depend on the batch)"),
    ("prune: {budget: {macs: 0.5, step: 1}}", "prune.budget.step: must be < 1.0 (got 1)"),
    ("prune: {budget: {mac: 0.5}}", "prune.budget.mac: unknown key (did you mean 'macs'?)"),
    ("prune: {budget: 0.5}", "prune.budget: must be a mapping of keys to values (got 0.5)"),
])
def test_recipe_budget_rejects_bad_values_with_one_line(refused_recipe, prune, message):
    assert refused_recipe(BASE + prune + "\n") == f"jas-prune: error: {message}"


# -- the pipeline -----------------------------------------------------------------------------

RUN = BASE + """prune:
  methods: [magnitude, random]
  ratios: [0.3]
export: null
"""


def test_pipeline_macs_budget_adds_minimal_entries(tmp_path, tiny_builtin, capsys):
    out = tmp_path / "run"
    assert run_recipe(tmp_path, RUN, out, "prune.budget={macs: 0.8, step: 0.02}") == 0
    m = json.loads((out / "metrics.json").read_text())
    entries = m["pruned"]
    ratio = entries[1]["ratio"]
    assert [e["checkpoint"] for e in entries] == [
        "pruned-magnitude-r30.safetensors", f"pruned-magnitude-r{round(ratio * 100)}-macs80.safetensors",
        "pruned-random-r30.safetensors", f"pruned-random-r{round(ratio * 100)}-macs80.safetensors"]
    budget = [e for e in entries if "budget" in e]
    assert len(budget) == 2 and "budget" not in entries[0]
    for e in budget:
        assert e["ratio"] == ratio and e["mode"] == "uniform"
        achieved = e["macs"] / m["dense"]["macs"]
        assert achieved <= 0.8 and e["budget"]["achieved"] == pytest.approx(achieved)
        assert {k: e["budget"][k] for k in ("target", "value", "step", "ratio")} == {
            "target": "macs", "value": 0.8, "step": 0.02, "ratio": ratio}
    assert _fraction(tiny_builtin, round(ratio - 0.02, 10), "macs") > 0.8  # one step less misses it
    err = capsys.readouterr().err
    assert f"budget MACs ≤ 80 % of dense: ratio {ratio:g} gives {budget[0]['budget']['achieved'] * 100:.1f} %" in err
    # resume: every entry kept, nothing searched again
    assert run_recipe(tmp_path, RUN, out, "prune.budget={macs: 0.8, step: 0.02}", resume=True) == 0
    err = capsys.readouterr().err
    assert err.count("already on disk") == 4 and "models measured" not in err
    # another budget: its entries replace the old budget's, the ratio entries stay
    assert run_recipe(tmp_path, RUN, out, "prune.budget={macs: 0.7, step: 0.02}", resume=True) == 0
    again = json.loads((out / "metrics.json").read_text())["pruned"]
    assert [e["checkpoint"] for e in again][0::2] == [e["checkpoint"] for e in entries][0::2]
    assert {e["budget"]["value"] for e in again if "budget" in e} == {0.7}


def test_pipeline_latency_budget_is_read_back_on_resume(tmp_path, tiny_builtin, capsys, monkeypatch):
    from jas_prune.deploy import latency as latency_module

    calls: list = []
    monkeypatch.setattr(latency_module, "onnx_latency", _fake_latency(calls))
    out = tmp_path / "run"
    assert run_recipe(tmp_path, RUN, out, "prune.budget={latency_ms: 2.5, batch_size: 4}") == 0
    entries = json.loads((out / "metrics.json").read_text())["pruned"]
    assert [e["checkpoint"] for e in entries if "budget" in e] == [
        "pruned-magnitude-r37-lat2p5ms-bs4.safetensors", "pruned-random-r37-lat2p5ms-bs4.safetensors"]
    assert calls and all(e["budget"]["batch_size"] == 4 for e in entries if "budget" in e)
    # a missing budget checkpoint is remade at the ratio recorded, without timing anything again
    (out / "pruned-random-r37-lat2p5ms-bs4.safetensors").unlink()
    monkeypatch.setattr(latency_module, "onnx_latency", lambda *a, **k: pytest.fail("measured again"))
    assert run_recipe(tmp_path, RUN, out, "prune.budget={latency_ms: 2.5, batch_size: 4}", resume=True) == 0
    after = json.loads((out / "metrics.json").read_text())["pruned"]
    assert [e["checkpoint"] for e in after] == [e["checkpoint"] for e in entries]
    assert after[3]["budget"] == entries[3]["budget"] and after[3]["widths"] == {"0": 40, "1": 40}


def test_pipeline_refuses_an_unreachable_budget(tmp_path, tiny_builtin, capsys):
    assert run_recipe(tmp_path, RUN, tmp_path / "run", "prune.budget={macs: 0.01}", "prune.round_to=8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    floor = _fraction(tiny_builtin, 63 / 64, "macs", round_to=8)
    assert err[-1] == (f"jas-prune: error: prune.budget.macs: 0.01 cannot be met: keeping 8 FFN neurons per block "
                       f"leaves {floor:.3f} of the dense model's MACs; raise prune.budget.macs")
    assert not list((tmp_path / "run").glob("pruned-*"))
