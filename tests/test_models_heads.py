"""Attention heads on every supported family (tiny random-init models of ``test_families``):
heads are found, the two routes of the engine agree on head paths, and attention pruning either
matches the family's own geometry with ONNX-grade parity (timm VisionTransformer) or is refused
in one line naming the family."""

from __future__ import annotations

import copy

import pytest
import torch
from test_models_families import FAMILIES, IDS, _images, models  # noqa: F401 - the fixture

from jas_prune.attribution import JointAttribution
from jas_prune.errors import UnsupportedModelError
from jas_prune.models import discover_ffn
from jas_prune.models.heads import discover_heads
from jas_prune.pruning.attention import SUPPORTED_FAMILIES, head_scores, prune_attention
from jas_prune.pruning.criteria import ScoringInputs


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_heads_located_and_routes_agree(fam, models):  # noqa: F811
    model = models(fam)
    heads = discover_heads(discover_ffn(model))
    assert [h.heads for h in heads] == [2, 2]
    x = _images(model, n=2)
    y = torch.tensor([1, 3])
    kw = dict(steps=2, units=["ffn", "heads"], scope="all", formula="ig")
    tan = JointAttribution(model).attribute(x, y, **kw)
    rev = JointAttribution(model, path_mode="reverse").attribute(x, y, **kw)
    assert tan.head_paths.shape == (2, 2, 1) and torch.equal(tan.head_paths, rev.head_paths)
    torch.testing.assert_close(tan.jas, rev.jas, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_attention_pruning_or_one_line_refusal(fam, models):  # noqa: F811
    model = models(fam)
    family = discover_ffn(model).family
    if family not in SUPPORTED_FAMILIES:
        with pytest.raises(UnsupportedModelError, match=f"^prune.attention: model family {family} is not supported"):
            head_scores("random", ScoringInputs(model=model))
        return
    pruned = copy.deepcopy(model)
    prune_attention(pruned, head_scores("magnitude", ScoringInputs(model=pruned)), heads=0.5, head_dims=0.5)
    assert all(b.attn.num_heads == 1 and b.attn.head_dim == 8 for b in pruned.blocks)
    out = pruned(_images(model, n=2))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
