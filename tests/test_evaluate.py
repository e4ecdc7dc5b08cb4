import pytest
import torch

from jas_prune.evaluate import accuracy, cls_mask_protocol, count_params_macs, intervention_metrics, predict_logits
from jas_prune.errors import NonFiniteOutputError


def _manual_logits(model, x, edits):
    """Reference: forward hooks on mlp.act that multiply the class token by per-image factors."""
    handles = []
    for block, mult in edits.items():
        def hook(_m, _i, out, mult=mult):
            out = out.clone()
            out[:, 0, :] = out[:, 0, :] * mult
            return out
        handles.append(model.blocks[block].mlp.act.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def test_accuracy_topk_and_label_map():
    logits = torch.tensor([[0.0, 3, 2, 1, 0, -1], [5, 0, 0, 0, 0, 4]])
    acc = accuracy(logits, torch.tensor([1, 5]))
    assert acc["top1"] == 0.5 and acc["top5"] == 1.0
    acc = accuracy(logits[:, [1, 5]], torch.tensor([1, 5]), label_map={1: 0, 5: 1})
    assert acc["top1"] == 1.0


def test_intervention_matches_manual_hooks(tiny_vit):
    model = tiny_vit(num_classes=5, depth=2)
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    paths = torch.randint(0, 64, (6, 2, 3))
    targets = y.clone()
    batches = [(x[:4], y[:4], targets[:4], paths[:4]), (x[4:], y[4:], targets[4:], paths[4:])]
    m = intervention_metrics(model, batches, [0, 1], scope="cls")
    clean = _manual_logits(model, x, {}).softmax(-1)[torch.arange(6), targets]
    for name, factor in (("removal", 0.0), ("enhancement", 2.0)):
        edits = {}
        for j in range(2):
            mult = torch.ones(6, 64)
            mult.scatter_(1, paths[:, j], factor)
            edits[j] = mult
        edited = _manual_logits(model, x, edits).softmax(-1)[torch.arange(6), targets]
        rel = (edited - clean) / clean
        assert m[f"{name}_prob_dev_mean"] == pytest.approx(100 * rel.mean().item(), rel=1e-4, abs=1e-6)
        assert m[f"{name}_prob_dev_median"] == pytest.approx(100 * rel.median().item(), rel=1e-4, abs=1e-6)


def test_cls_mask_protocol_limits(tiny_vit):
    model = tiny_vit(num_classes=4, depth=3)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    plain = accuracy(_manual_logits(model, x, {}), y)
    keep_none = torch.zeros(4, 3, 64, dtype=torch.bool)
    keep_all = torch.ones(4, 3, 64, dtype=torch.bool)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert cls_mask_protocol(model, data, keep_none, [0, 1, 2], depth=3, fraction=0.0)["top1"] == plain["top1"]
    assert cls_mask_protocol(model, data, keep_all, [0, 1, 2], depth=3, fraction=1.0)["top5"] == plain["top5"]
    # fraction 1, nothing kept, depth 2: the class token of blocks 0 and 1 is zeroed, block 2 untouched
    zero_two = accuracy(_manual_logits(model, x, {0: torch.zeros(8, 64), 1: torch.zeros(8, 64)}), y)
    got = cls_mask_protocol(model, data, keep_none, [0, 1, 2], depth=2, fraction=1.0)
    assert got["top1"] == zero_two["top1"] and got["top5"] == zero_two["top5"]


def test_predict_names_non_finite_image(tiny_vit):
    model = tiny_vit(num_classes=3, depth=1)
    x = torch.randn(4, 3, 32, 32)
    x[2] = float("nan")
    loader = [(x[:2], torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])),
              (x[2:], torch.zeros(2, dtype=torch.long), torch.tensor([2, 3]))]
    with pytest.raises(NonFiniteOutputError, match="image img-c"):
        predict_logits(model, loader, sample_ids=["img-a", "img-b", "img-c", "img-d"])


def test_params_and_macs_shrink_with_ffn(tiny_vit):
    model = tiny_vit(num_classes=3, depth=2)
    full = count_params_macs(model, (3, 32, 32))
    assert full["params"] == sum(p.numel() for p in model.parameters())
    blk = model.blocks[0].mlp
    blk.fc1 = torch.nn.Linear(32, 16)
    blk.fc2 = torch.nn.Linear(16, 32)
    small = count_params_macs(model, (3, 32, 32))
    assert full["params"] - small["params"] == 2 * 32 * 48 + 48
    # 17 tokens x (fc1 + fc2) x 48 removed neurons; Torch-Pruning also counts bias additions
    removed = full["macs"] - small["macs"]
    assert 17 * 2 * 32 * 48 <= removed <= 17 * (2 * 32 * 48 + 2 * 48)
