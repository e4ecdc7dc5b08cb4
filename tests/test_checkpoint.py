"""Pruned checkpoints: no pickle, exact round trip, clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

from jas_prune.checkpoint import load_pruned, read_pruned_meta, save_pruned
from jas_prune.errors import CheckpointError
from jas_prune.importance import random_scores
from jas_prune.prune import prune_ffn


@pytest.fixture
def pruned(tiny_vit):
    model = tiny_vit(num_classes=6, depth=3)
    prune_ffn(model, random_scores(model, seed=0), ratio=0.6, mode="global",
              head_classes=[1, 3, 4], class_names=list("abcdef"))
    return model


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_identical(pruned, x, tmp_path, suffix):
    path = save_pruned(pruned, tmp_path / f"pruned{suffix}", extra={"method": "random", "ratio": 0.6})
    loaded = load_pruned(path)
    assert not loaded.training
    assert [b.mlp.fc1.out_features for b in loaded.blocks] == [b.mlp.fc1.out_features for b in pruned.blocks]
    assert len({b.mlp.fc1.out_features for b in loaded.blocks}) > 1  # widths differ per block
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.jas_head_classes == [1, 3, 4]
    assert loaded.jas_head_class_names == ["b", "d", "e"]
    assert loaded.jas_checkpoint_extra == {"method": "random", "ratio": 0.6}
    meta = read_pruned_meta(path)
    assert meta["ffn_widths"] == [b.mlp.fc1.out_features for b in pruned.blocks]
    assert meta["name"] == "vit_tiny_patch16_224" and meta["num_classes"] == 3
    assert meta["arch"]["embed_dim"] == 32 and meta["arch"]["img_size"] == [32, 32]


def test_pt_needs_no_pickle(pruned, tmp_path):
    path = save_pruned(pruned, tmp_path / "pruned.pt")
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"jas_prune", "state_dict"}
    assert obj["jas_prune"]["format"] == "jas-prune/pruned-vit"


def test_builtin_name_round_trip(tiny_builtin, x, tmp_path):
    model = tiny_builtin
    prune_ffn(model, random_scores(model, seed=1), ratio=0.5)
    loaded = load_pruned(save_pruned(model, tmp_path / "b.safetensors"))
    assert loaded.pretrained_cfg["architecture"] == "builtin:shapes-vit"
    assert tuple(loaded.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_unpruned_model_round_trip(tiny_vit, x, tmp_path):
    model = tiny_vit(num_classes=5, depth=2, global_pool="avg", qkv_bias=False)
    loaded = load_pruned(save_pruned(model, tmp_path / "dense.pt"))
    assert not hasattr(loaded, "jas_head_classes")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bad_files_raise_checkpoint_error(pruned, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_pruned(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_pruned(garbage)
    good = save_pruned(pruned, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_pruned(truncated)
    plain = tmp_path / "plain.pt"
    torch.save(pruned.state_dict(), plain)
    with pytest.raises(CheckpointError, match="plain.pt is not a jas-prune pruned checkpoint"):
        load_pruned(plain)


def test_mismatching_widths_raise(pruned, tmp_path):
    path = save_pruned(pruned, tmp_path / "p.pt")
    obj = torch.load(path, weights_only=True)
    obj["jas_prune"]["ffn_widths"][0] += 1
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt does not match"):
        load_pruned(tmp_path / "bad.pt")
    obj["jas_prune"]["ffn_widths"] = [8]
    torch.save(obj, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="short.pt stores 1 FFN widths"):
        load_pruned(tmp_path / "short.pt")


def test_extra_must_be_json(pruned, tmp_path):
    with pytest.raises(ValueError, match="extra"):
        save_pruned(pruned, tmp_path / "x.pt", extra={"tensor": torch.zeros(1)})
    path = save_pruned(pruned, tmp_path / "y.safetensors", extra={"note": "ok"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["jas_prune"])["extra"] == {"note": "ok"}
