"""The criterion registry and the baseline criteria: each against a reference computed another
way (hooks, the formula of Torch-Pruning's group importance), and each through MetaPruner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from jas_prune.errors import InvalidArgumentError
from jas_prune.pruning.criteria import CRITERIA, Criterion, CriterionScores, MasksRef, ScoringInputs, criterion_scores
from jas_prune.pruning.criteria.activation import activation_scores, variance_scores
from jas_prune.pruning.criteria.magnitude import magnitude_scores
from jas_prune.pruning.criteria.random import random_scores
from jas_prune.pruning.criteria.taylor import taylor_scores
from jas_prune.pruning.criteria.vit_slim import VitSlimOptions, vit_slim_scores
from jas_prune.pruning.plugin import JASImportance
from jas_prune.testing import meta_prune
from jas_prune.pruning.stats import ffn_activation_stats

N_CLASSES = 6  # the six-class model, batch and loader fixtures live in conftest.py


def test_activation_statistics_match_hooks(model, loader, batch):
    x, _ = batch
    acts = {}
    hooks = [b.mlp.act.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.detach()))
             for k, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    stats = ffn_activation_stats(model, loader)
    for k, a in acts.items():
        flat = a.reshape(-1, a.shape[-1]).double()
        assert torch.allclose(stats[k]["mean"], flat.mean(0).float(), atol=1e-6)
        assert torch.allclose(activation_scores(model, loader, stats=stats)[k], flat.abs().mean(0).float(), atol=1e-6)
        assert torch.allclose(variance_scores(model, loader)[k], flat.var(0, unbiased=False).float(), atol=1e-6)
    sub = ffn_activation_stats(model, loader, classes=[1])
    assert sub[0]["count"] == 2 * acts[0].shape[1]
    with pytest.raises(InvalidArgumentError, match=r"loader: no images of classes \[42\]"):
        ffn_activation_stats(model, loader, classes=[42])


def test_magnitude_is_tp_group_l2(model):
    scores = magnitude_scores(model)
    for k, blk in enumerate(model.blocks):
        w1, w2 = blk.mlp.fc1.weight.detach(), blk.mlp.fc2.weight.detach()
        expected = (w1.pow(2).sum(1) + w2.pow(2).sum(0)) / 2  # TP: p=2, mean over the group's layers
        assert torch.allclose(scores[k], expected, rtol=1e-5)


def test_taylor_leaves_model_untouched(model, loader):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_scores(model, loader)
    assert all(p.grad is None for p in model.parameters())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(s.shape == (model.blocks[k].mlp.fc1.out_features,) and (s >= 0).all() and s.sum() > 0
               for k, s in scores.items())


def test_vit_slim_learns_scales_with_frozen_params(model, loader):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = vit_slim_scores(model, loader, lam=1e-2, epochs=2, lr=0.05)
    assert set(scores) == {0, 1, 2}
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in scores.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # hooks are gone: the model computes what it computed before
    with torch.no_grad():
        x = loader[0][0]
        assert torch.equal(model(x), model(x))
    assert len(model.blocks[0].mlp.act._forward_hooks) == 0
    with pytest.raises(InvalidArgumentError, match="lam: must be >= 0, got -1.0"):
        vit_slim_scores(model, loader, lam=-1.0)


def test_random_is_seeded(model):
    a, b, c = random_scores(model, seed=4), random_scores(model, seed=4), random_scores(model, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("method", [m for m in CRITERIA.names() if m != "jas"])
def test_every_baseline_prunes_through_metapruner(tiny_vit, loader, method):
    model = tiny_vit(num_classes=N_CLASSES, depth=2)
    scores = criterion_scores(method, model, loader, vit_slim={"lambda": 1e-3, "epochs": 1, "lr": 0.01})
    n = model.blocks[0].mlp.fc1.out_features
    assert set(scores) == {0, 1} and all(s.shape == (n,) for s in scores.values())
    meta_prune(model, JASImportance(scores), 0.5)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [n // 2, n // 2]
    assert torch.isfinite(model(loader[0][0])).all()


def test_criterion_scores_errors(model, loader):
    with pytest.raises(InvalidArgumentError, match="method: unknown pruning criterion 'l1'; choose one of jas, "):
        criterion_scores("l1", model, loader)
    with pytest.raises(InvalidArgumentError, match="loader: the 'taylor' criterion needs probe data"):
        criterion_scores("taylor", model, None)
    with pytest.raises(InvalidArgumentError,
                       match=r"vit_slim: unknown setting\(s\) \['momentum'\]; use lambda, epochs, lr"):
        criterion_scores("vit_slim", model, loader, vit_slim={"momentum": 0.9})
    with pytest.raises(InvalidArgumentError, match="vit_slim.epochs: Input should be greater than 0"):
        criterion_scores("vit_slim", model, loader, options={"epochs": 0})




# -- the registry ---------------------------------------------------------------------------


def test_registry_order_labels_and_colours():
    first = ("jas", "vit_slim", "magnitude", "taylor", "activation", "variance", "random")
    assert CRITERIA.names()[:7] == first  # the order recipes and reports always used; new ones follow
    original = {c.name: c for c in CRITERIA if c.name in first}
    # the figures' labels and colours of the original seven (jas_prune/figures.py before the registry)
    assert {n: c.label for n, c in original.items()} == {
        "jas": "JAS", "vit_slim": "ViT-Slim", "magnitude": "magnitude", "taylor": "Taylor",
        "activation": "activation", "variance": "act. variance", "random": "random"}
    assert {n: c.colour for n, c in original.items()} == {
        "jas": "#d62728", "vit_slim": "#1f77b4", "magnitude": "#2ca02c", "taylor": "#9467bd",
        "activation": "#ff7f0e", "variance": "#8c564b", "random": "#7f7f7f"}
    assert {n for n, c in original.items() if not c.needs_data} == {"magnitude", "random"}
    assert {n for n, c in original.items() if c.options is not None} == {"vit_slim"}
    # every criterion, added ones included: a colour of its own, a one-line summary
    assert len({c.colour for c in CRITERIA}) == len(CRITERIA)
    assert all(isinstance(c, Criterion) and c.summary and "\n" not in c.summary for c in CRITERIA)


def test_vit_slim_options_are_the_recipe_section():
    assert VitSlimOptions().model_dump(by_alias=True) == {"lambda": 1e-4, "epochs": 3.0, "lr": 1e-2}
    assert VitSlimOptions.model_validate({"lambda": 1e-3}).lambda_ == 1e-3
    assert VitSlimOptions.model_validate({"lambda_": 1e-3}).lambda_ == 1e-3
    for bad in ({"lambda": -1}, {"epochs": 0}, {"lr": 0}, {"momentum": 0.9}):
        with pytest.raises(Exception):
            VitSlimOptions.model_validate(bad)


def test_importing_the_registry_costs_neither_torch_pruning_nor_timm():
    code = ("import sys, jas_prune.pruning.criteria as c; "
            "assert len(c.CRITERIA) >= 7; "
            "print(sorted(m for m in ('torch_pruning', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_criterion_is_one_registered_definition(model, monkeypatch):
    """What a new module does: register, then every entry point (criterion_scores) finds it."""
    from jas_prune.registry import Registry

    fresh = Registry("pruning criterion")
    for c in CRITERIA:
        fresh.add(c)
    monkeypatch.setattr("jas_prune.pruning.criteria.CRITERIA", fresh)
    fresh.add(Criterion(name="ones", label="ones", colour="#000000", summary="all ones", needs_data=False,
                        score=lambda inputs: CriterionScores({0: torch.ones(64)})))
    assert torch.equal(criterion_scores("ones", model)[0], torch.ones(64))
    with pytest.raises(ValueError, match="registered twice"):
        fresh.add(fresh.get("ones"))


def test_activation_and_variance_share_one_pass(model, loader, monkeypatch):
    import jas_prune.pruning.stats as stats_mod

    calls = []
    real = stats_mod.ffn_activation_stats

    def counting(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(stats_mod, "ffn_activation_stats", counting)
    base = ScoringInputs(model=model, loader=loader, classes=[1, 2])
    act = CRITERIA.get("activation").score(dataclasses.replace(base))
    var = CRITERIA.get("variance").score(dataclasses.replace(base))
    assert len(calls) == 1 and calls[0]["classes"] == [1, 2]
    ref = real(model, loader, classes=[1, 2])
    assert all(torch.equal(act.scores[b], ref[b]["mean_abs"]) and torch.equal(var.scores[b], ref[b]["var"])
               for b in ref)
    assert act.protect is None
    base.activation_stats()  # the copies' pass is the original's
    assert len(calls) == 1
    given = ScoringInputs(model=model, loader=None, stats=ref)  # a pass made elsewhere (bias compensation)
    assert torch.equal(CRITERIA.get("activation").score(given).scores[0], ref[0]["mean_abs"]) and len(calls) == 1


def test_jas_criterion_reads_masks_or_loader(model, loader, monkeypatch):
    seen = {}

    def from_run(run_dir, classes=None, *, aggregation, digest):
        seen.update(run_dir=run_dir, classes=classes, aggregation=aggregation, digest=digest)
        return JASImportance({0: torch.arange(64.0)}, protect={0: [1, 2]})

    monkeypatch.setattr(JASImportance, "from_run", staticmethod(from_run))
    out = CRITERIA.get("jas").score(ScoringInputs(model=model, classes=[3], masks=MasksRef("runs/x", "mean_abs", "d")))
    assert seen == {"run_dir": "runs/x", "classes": [3], "aggregation": "mean_abs", "digest": "d"}
    assert out.protect == {0: [1, 2]} and torch.equal(out.scores[0], torch.arange(64.0))
    scores = criterion_scores("jas", model, loader, max_batches=1, steps=2)
    ref = JASImportance.from_loader(model, loader, max_batches=1, steps=2)
    assert all(torch.equal(scores[b], ref.scores[b]) for b in ref.scores)


@pytest.mark.parametrize("method", ["taylor", "hessian", "magnitude"])
def test_gated_ffn_groups_include_the_gate_rows(method):
    """On a SwiGLU FFN a neuron's group is a row of both input projections and a column of fc2:
    changing only the gate projection changes the neuron's score."""
    import timm
    from timm.layers import SwiGLU

    from jas_prune.pruning.criteria import criterion_scores

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          mlp_ratio=2.0, num_classes=6, mlp_layer=SwiGLU, act_layer=torch.nn.SiLU).eval()
    for blk in m.blocks:  # timm starts the gate at ~0 weights and bias 1; give it weights that matter
        torch.nn.init.normal_(blk.mlp.fc1_g.weight, std=0.2)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6)
    loader = [(x, y, torch.arange(6))]
    before = criterion_scores(method, m, loader)
    assert all(s.shape == (m.blocks[b].mlp.fc2.in_features,) and torch.isfinite(s).all() for b, s in before.items())
    with torch.no_grad():
        m.blocks[0].mlp.fc1_g.weight[3] *= 3.0  # only neuron 3's gate row
    after = criterion_scores(method, m, loader)
    changed = (before[0] - after[0]).abs() > 1e-9 * before[0].abs().max()
    assert changed[3]
