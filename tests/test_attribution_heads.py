"""Attention heads as attribution units (``attribution.units``), against a brute-force reference.

The reference has its own hooks (the attention output projection's input and the FFN activation
output), runs one image and one quadrature step at a time, and reads SPEC §2 with a head as one
unit: value ``‖v_h‖``, gradient along its clean direction ``⟨v_h/‖v_h‖, ∂F/∂v_h⟩``.
"""

from __future__ import annotations

import pytest
import torch
from reference import ref_rule

from jas_prune.attribution import JointAttribution, LocateSettings, locate, path_jas
from jas_prune.testing import random_vit
from jas_prune.errors import AttributionSettingError, UnsupportedModelError

B, HEADS, D = 2, 4, 16


@pytest.fixture(scope="module")
def model():
    return random_vit(depth=3, embed_dim=D, num_heads=HEADS, img_size=16, patch_size=8, mlp_ratio=2.0,
                      num_classes=5, seed=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


LABELS = torch.tensor([1, 4])


def _module(model, site):
    l, kind = site
    return model.blocks[l].attn.proj if kind == "heads" else model.blocks[l].mlp.act


def _run(model, x1, scope, values=None, sites=()):
    """F's softmax vector and the site tensors (scope view); with ``values`` the scope positions
    of each site are replaced by a leaf and its gradient of F[target] is returned instead."""
    seen, hs = {}, []
    leaves = {s: v.detach().clone().requires_grad_(True) for s, v in (values or {}).items()}

    def swap(site, t):
        t = t.clone()
        if site in leaves:
            if scope == "cls":
                t[0, 0] = leaves[site]
            else:
                t[0] = leaves[site]
        seen[site] = (t[0, 0] if scope == "cls" else t[0]).detach().clone()
        return t

    for site in sites:
        mod = _module(model, site)
        if site[1] == "heads":
            hs.append(mod.register_forward_pre_hook(lambda m, a, s=site: (swap(s, a[0]),)))
        else:
            hs.append(mod.register_forward_hook(lambda m, i, o, s=site: swap(s, o)))
    try:
        with torch.enable_grad():
            p = torch.softmax(model(x1), -1)[0]
    finally:
        for h in hs:
            h.remove()
    return p, seen, leaves


def _unit(site, u):
    return slice(u * (D // HEADS), (u + 1) * (D // HEADS)) if site[1] == "heads" else slice(u, u + 1)


def ref_locate_one(model, x1, target, units, *, steps, topk, scope, formula, quadrature):
    """Layer-progressive JAS (layer_scaled candidates) over the sites in forward order."""
    sites = [(l, k) for l in range(3) for k in ("heads", "ffn") if k in units]
    _, clean, _ = _run(model, x1, scope, sites=sites)
    nodes, w = ref_rule(quadrature, steps)

    def val(site, u):  # the unit's value per position: [T?, d]
        return clean[site][..., _unit(site, u)]

    def vbar(site, u):
        v = val(site, u)
        return float(v.norm(dim=-1).sum()) if site[1] == "heads" else float(v.sum())

    def gunit(g, site, u):  # paper: gradient along the unit's direction; ig: value · gradient
        v, gg = val(site, u), g[site][..., _unit(site, u)]
        if formula == "ig":
            return float((v * gg).sum())
        if site[1] == "heads":
            n = v.norm(dim=-1, keepdim=True)
            return float((v / n * gg).sum())
        return float(gg.sum())

    path, scores = {}, {}
    for cur in sites:
        grads = []
        for a in nodes:
            vals = {}
            for site, P in path.items():
                v = clean[site].clone()
                for u in P:
                    v[..., _unit(site, u)] *= a
                vals[site] = v
            vals[cur] = clean[cur] * a
            p, _, leaves = _run(model, x1, scope, vals, sites)
            gs = torch.autograd.grad(p[target], list(leaves.values()))
            grads.append(dict(zip(leaves, gs)))
        n = HEADS if cur[1] == "heads" else model.blocks[cur[0]].mlp.fc1.out_features
        sc = []
        for j in range(n):
            S = [(site, u) for site, P in path.items() for u in P] + [(cur, j)]
            gsum = sum(w[k] * sum(gunit(g, s, u) for s, u in S) for k, g in enumerate(grads))
            sc.append(gsum if formula == "ig" else sum(vbar(s, u) for s, u in S) * gsum)
        scores[cur] = torch.tensor(sc, dtype=torch.float64)
        path[cur] = scores[cur].topk(min(topk, HEADS) if cur[1] == "heads" else topk).indices.tolist()
    return path, scores


COMBOS = [
    dict(units=["heads"], scope="cls", formula="paper", quadrature="left", topk=1),
    dict(units=["ffn", "heads"], scope="cls", formula="ig", quadrature="gauss", topk=2),
    dict(units=["ffn", "heads"], scope="all", formula="paper", quadrature="right", topk=1),
    dict(units=["heads"], scope="all", formula="ig", quadrature="trapezoid", topk=2),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
@pytest.mark.parametrize("path_mode", ["tangent", "reverse"])
def test_head_jas_matches_bruteforce_reference(model, images, combo, path_mode):
    res = JointAttribution(model, path_mode=path_mode).attribute(images, LABELS, steps=3, **combo)
    assert res.head_layers == [0, 1, 2]
    assert res.layers == ([0, 1, 2] if "ffn" in combo["units"] else [])
    for b in range(B):
        kw = {k: combo[k] for k in ("scope", "formula", "quadrature", "topk")}
        path, scores = ref_locate_one(model, images[b:b + 1], int(LABELS[b]), combo["units"], steps=3, **kw)
        for i in range(3):
            torch.testing.assert_close(res.head_scores[i][b], scores[(i, "heads")], rtol=1e-7, atol=1e-12)
            assert res.head_paths[b, i].tolist() == path[(i, "heads")]
            if "ffn" in combo["units"]:
                torch.testing.assert_close(res.scores[i][b], scores[(i, "ffn")], rtol=1e-7, atol=1e-12)
                assert res.paths[b, i].tolist() == path[(i, "ffn")]


def test_path_jas_of_located_heads_matches_locate(model, images):
    s = LocateSettings(steps=4, units=("ffn", "heads"), topk=2, formula="ig", scope="all")
    res = locate(model, images, LABELS, s)
    again = path_jas(model, images, LABELS, res.paths, s, head_paths=res.head_paths)
    torch.testing.assert_close(again, res.jas, rtol=1e-9, atol=1e-14)
    with pytest.raises(AttributionSettingError, match="head_paths is needed"):
        path_jas(model, images, LABELS, res.paths, s)


def test_joint_ig_over_heads_is_complete(model, images):
    """Every head of every block scaled from zero together: the scores sum to F(x) − F(heads zeroed)
    (this integrand converges slowly: 2 % at 64 Gauss nodes)."""
    res = locate(model, images, LABELS, method="joint_ig", steps=64, quadrature="gauss", units=["heads"], scope="all")
    sites = [(l, "heads") for l in range(3)]
    for b in range(B):
        p, clean, _ = _run(model, images[b:b + 1], "all", sites=sites)
        p0, _, _ = _run(model, images[b:b + 1], "all", {s: torch.zeros_like(v) for s, v in clean.items()}, sites)
        total = sum(sc[b].sum() for sc in res.head_scores)
        diff = float((p[LABELS[b]] - p0[LABELS[b]]).detach())
        assert abs(diff) > 1e-3 and abs(float(total) - diff) < 0.02 * abs(diff)


def test_units_default_is_ffn_and_setting_is_checked(model):
    assert LocateSettings().units == ("ffn",)
    assert LocateSettings(units=["heads", "ffn"]).units == ("ffn", "heads")
    with pytest.raises(AttributionSettingError, match="attribution.units.1: must be one of .ffn. or .heads."):
        LocateSettings(units=["ffn", "mlp"])
    with pytest.raises(AttributionSettingError, match="attribution.units: must name at least one"):
        LocateSettings(units=[])


def test_mixed_heads_refused_in_one_line():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                          num_classes=3, scale_attn_norm=True)
    with pytest.raises(UnsupportedModelError, match="block 0: the attention normalises"):
        locate(m, torch.randn(1, 3, 16, 16), torch.tensor([0]), steps=2, units=["heads"])
