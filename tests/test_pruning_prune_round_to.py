"""``round_to`` (issue 14): kept FFN widths a multiple of N, in ``prune_ffn`` and ``prune.round_to``;
plus the prune stage's canonical entry order and kept-entry log lines on resume (issue 13)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_recipe
from jas_prune.errors import BudgetError, InvalidArgumentError, PruneSettingError
from jas_prune.models import discover_ffn
from jas_prune.pruning.prune import prune_ffn, round_kept, uniform_widths

BASE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {l.index: torch.randn(l.hidden, generator=g) for l in discover_ffn(model).layers}


def _zeroed(dense, kept):
    """The dense model with every FFN neuron outside ``kept`` silenced (its fc2 column zeroed)."""
    ref = copy.deepcopy(dense)
    for layer in discover_ffn(ref).layers:
        removed = [i for i in range(layer.hidden) if i not in set(kept[layer.index])]
        with torch.no_grad():
            layer.fc2.weight[:, removed] = 0
    return ref


@pytest.mark.parametrize("n", [1, 3, 8, 16, 64])
def test_round_kept_is_the_nearest_allowed_multiple(n):
    for width in (1, 7, 32, 64, 100, 3072):
        for count in range(1, width + 1, max(1, width // 97)):
            for at_least in (1, min(count, 5)):
                if n > width:
                    with pytest.raises(PruneSettingError, match=f"round_to: {n} exceeds the FFN width {width}"):
                        round_kept(count, width, n, at_least=at_least)
                    continue
                k = round_kept(count, width, n, at_least=at_least)
                # brute force: the allowed multiples, the nearest to count (a tie keeps more)
                allowed = [m for m in range(n, width + 1, n) if m >= at_least]
                best = min(allowed, key=lambda m: (abs(m - count), -m))
                assert k == best, (width, count, n, at_least)
                assert k % n == 0 and at_least <= k <= width and abs(k - count) < n
    assert round_kept(37, 64, None) == 37 and round_kept(37, 64, 1) == 37


def test_round_kept_refuses_what_cannot_be_rounded():
    with pytest.raises(BudgetError, match="5 neurons of block 2 must stay, and the next multiple of 4 "
                                          r"\(8\) exceeds the FFN width 6"):
        round_kept(5, 6, 4, at_least=5, block=2)


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("n", [8, 16])
def test_pruned_widths_are_multiples_and_outputs_equal_the_zeroed_dense_model(tiny_vit, mode, ratio, n):
    dense = tiny_vit(num_classes=6, depth=3, mlp_ratio=4.0)  # FFN width 128
    scores = _scores(dense)
    plain = prune_ffn(copy.deepcopy(dense), scores, ratio=ratio, mode=mode)
    model = copy.deepcopy(dense)
    s = prune_ffn(model, scores, ratio=ratio, mode=mode, round_to=n)
    assert s.round_to == n
    for b, w in s.widths_after.items():
        assert w % n == 0 and 0 < w <= 128, (b, w)
        assert abs(w - plain.widths_after[b]) < n  # within one multiple of the unrounded count
        assert len(s.kept[b]) == w == discover_ffn(model).layers[b].hidden
    if mode == "uniform":  # the top-w neurons by score, whatever w became
        for b, keep in s.kept.items():
            top = torch.sort(scores[b], descending=True, stable=True).indices[:len(keep)]
            assert keep == sorted(top.tolist())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _zeroed(dense, s.kept)(x), rtol=1e-5, atol=1e-5)


def test_round_to_keeps_protected_neurons(model):
    scores = _scores(model)  # width 64
    protect = {0: [1, 2, 3, 4, 5], 1: [0]}
    s = prune_ffn(copy.deepcopy(model), scores, ratio=0.9, protect=protect, round_to=8)  # 6 kept -> 8
    assert set(protect[0]) <= set(s.kept[0]) and s.widths_after == {0: 8, 1: 8, 2: 8}
    with pytest.raises(BudgetError, match=r"protect\[0\]: 5 protected neurons but ratio 0.95 keeps only 3 of 64"):
        prune_ffn(copy.deepcopy(model), scores, ratio=0.95, protect=protect, round_to=8)


def test_bad_round_to_names_the_argument(model):
    scores = _scores(model)
    with pytest.raises(PruneSettingError, match="^round_to: 128 exceeds the FFN width 64 of block 0: no multiple "
                                                "of 128 fits; lower round_to$"):
        prune_ffn(copy.deepcopy(model), scores, ratio=0.5, round_to=128)
    for bad in (0, 2.0, True, "8"):
        with pytest.raises(InvalidArgumentError, match=f"^round_to: expected an integer ≥ 1 or None, got {bad!r}$"):
            prune_ffn(copy.deepcopy(model), scores, ratio=0.5, round_to=bad)


def test_uniform_widths_match_prune_ffn(model):
    for ratio in (0.1, 0.45, 0.8):
        for n in (None, 8, 16):
            s = prune_ffn(copy.deepcopy(model), _scores(model), ratio=ratio, round_to=n)
            assert uniform_widths({0: 64, 1: 64, 2: 64}, ratio, n) == s.widths_after


@pytest.mark.parametrize("prune, message", [
    ("prune: {round_to: 0}", "prune.round_to: must be ≥ 1 (got 0)"),
    ("prune: {round_to: 8.5}", "prune.round_to: input should be a valid integer (got 8.5)"),
    ("prune: {round_to: true}", "prune.round_to: input should be a valid integer (got True)"),
    ("prune: {roundto: 8}", "prune.roundto: unknown key (did you mean 'round_to'?)"),
])
def test_recipe_round_to_rejects_bad_values_with_one_line(refused_recipe, prune, message):
    assert refused_recipe(BASE + prune + "\n") == f"jas-prune: error: {message}"


# -- the pipeline -----------------------------------------------------------------------------

RUN = BASE + """prune:
  methods: [magnitude, random]
  ratios: [0.7, 0.3]
  reconstruction: [none, bias]
export: null
"""


def _pruned(out):
    return json.loads((out / "metrics.json").read_text())["pruned"]


def _kept_lines(capsys) -> list[str]:
    """The prune stage's kept-entry lines of the last run (the CLI logs to stderr)."""
    return [line.strip() for line in capsys.readouterr().err.splitlines() if "already on disk" in line]


def test_pipeline_round_to_names_records_and_resumes(tmp_path, tiny_builtin, capsys):
    out = tmp_path / "run"
    assert run_recipe(tmp_path, RUN, out, "prune.round_to=16") == 0
    entries = _pruned(out)
    assert [e["checkpoint"] for e in entries] == [
        f"pruned-{m}-r{r}{s}-rt16.safetensors" for m in ("magnitude", "random") for r in (70, 30) for s in ("", "-bc")]
    for e in entries:
        assert e["round_to"] == 16 and all(w % 16 == 0 for w in e["widths"].values())
        assert e["widths"] == {"0": 16 if e["ratio"] == 0.7 else 48, "1": 16 if e["ratio"] == 0.7 else 48}
    # the same round_to: every entry kept, one log line each
    mtimes = {e["checkpoint"]: (out / e["checkpoint"]).stat().st_mtime_ns for e in entries}
    capsys.readouterr()
    assert run_recipe(tmp_path, RUN, out, "prune.round_to=16", resume=True) == 0
    assert _kept_lines(capsys) == [f"prune {e['checkpoint'].removesuffix('.safetensors')}: kept {e['checkpoint']} "
                    "(already on disk, made with the same settings)" for e in entries]
    assert {e["checkpoint"]: (out / e["checkpoint"]).stat().st_mtime_ns for e in _pruned(out)} == mtimes
    # another round_to is another entry: recomputed under its own name; null drops the suffix
    assert run_recipe(tmp_path, RUN, out, "prune.round_to=32", resume=True) == 0
    assert {e["round_to"] for e in _pruned(out)} == {32}
    assert {e["widths"]["0"] for e in _pruned(out)} == {32}  # 0.7 keeps 19 -> 32, 0.3 keeps 45 -> 32
    assert run_recipe(tmp_path, RUN, out, resume=True) == 0
    assert all("round_to" not in e and "-rt" not in e["checkpoint"] for e in _pruned(out))


def test_round_to_wider_than_the_ffn_is_refused_naming_the_key(tmp_path, tiny_builtin, capsys):
    assert run_recipe(tmp_path, RUN, tmp_path / "run", "prune.round_to=128") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "jas-prune: error: prune.round_to: 128 exceeds the FFN width 64 of block 0; lower prune.round_to"


def test_resumed_run_writes_entries_in_the_uninterrupted_order(tmp_path, tiny_builtin, capsys):
    """An entry recomputed on resume (its checkpoint went missing) takes its place in the recipe's
    order, not the end of the list; class subsets come after prune.classes."""
    sets = ["prune.class_subsets={count: 1, size: 3, ratios: [0.5], head: cut}"]
    whole = tmp_path / "whole"
    assert run_recipe(tmp_path, RUN, whole, *sets) == 0
    order = [e["checkpoint"] for e in _pruned(whole)]
    assert order[:8] == [f"pruned-{m}-r{r}{s}.safetensors" for m in ("magnitude", "random") for r in (70, 30)
                         for s in ("", "-bc")]
    assert len(order) == 8 + 4 and all("-c" in c for c in order[8:])
    broken = tmp_path / "broken"
    assert run_recipe(tmp_path, RUN, broken, *sets) == 0
    for name in (order[0], order[5], order[8]):  # the first of each selection, and one in the middle
        (broken / name).unlink()
    capsys.readouterr()
    assert run_recipe(tmp_path, RUN, broken, *sets, resume=True) == 0
    assert [e["checkpoint"] for e in _pruned(broken)] == order
    assert [line.split()[1].rstrip(":") for line in _kept_lines(capsys)] == [c.removesuffix(".safetensors") for c in order if c not in (order[0], order[5], order[8])]
