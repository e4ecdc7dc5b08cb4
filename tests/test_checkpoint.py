"""Pruned checkpoints: no pickle, exact round trip, clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

from jas_prune.checkpoint import load_pruned, read_pruned_meta, save_pruned
from jas_prune.errors import CheckpointError
from jas_prune.pruning.criteria.random import random_scores
from jas_prune.pruning.prune import prune_ffn


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


# -- everything Torch-Pruning may change, class names, older files (issue 15) ---------------------


def _heads_and_embedding_pruned(tiny_vit):
    import warnings

    import torch_pruning as tp

    from jas_prune.pruning.graph import update_attention_geometry
    from jas_prune.pruning.plugin import JASImportance

    model = tiny_vit(num_classes=10, depth=2, embed_dim=64, num_heads=4)
    scores = random_scores(model, seed=0)
    imp = JASImportance(scores, fallback=tp.importance.GroupMagnitudeImportance())
    num_heads = {b.attn.qkv: b.attn.num_heads for b in model.blocks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.25,
                                      num_heads=num_heads, prune_num_heads=True, head_pruning_ratio=0.5,
                                      ignored_layers=[model.head])
        pruner.step()
    update_attention_geometry(model, pruner.num_heads)
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_heads_and_embedding_pruned_round_trip(tiny_vit, x, tmp_path, suffix):
    """Heads, head dims and the embedding width pruned by Torch-Pruning: every shape and the
    attention geometry come back, from a file torch.load(weights_only=True) reads."""
    model = _heads_and_embedding_pruned(tiny_vit)
    attn = model.blocks[0].attn
    assert attn.num_heads == 2 and model.patch_embed.proj.out_channels < 64  # heads and embedding went
    path = save_pruned(model, tmp_path / f"p{suffix}")
    if suffix == ".pt":
        obj = torch.load(path, weights_only=True)
        assert obj["jas_prune"]["geometry"]["blocks.0.attn"]["num_heads"] == 2
    loaded = load_pruned(path)
    for a, b in zip(loaded.blocks, model.blocks):
        assert (a.attn.num_heads, a.attn.head_dim, a.attn.attn_dim) == (b.attn.num_heads, b.attn.head_dim,
                                                                         b.attn.attn_dim)
        assert a.attn.qkv.weight.shape == b.attn.qkv.weight.shape and a.norm1.normalized_shape == b.norm1.normalized_shape
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_class_names_are_kept(tiny_vit, tmp_path):
    model = tiny_vit(num_classes=4, depth=1)
    names = ["cat", "dog", "eel", "fox"]
    loaded = load_pruned(save_pruned(model, tmp_path / "n.safetensors", class_names=names))
    assert loaded.jas_class_names == names
    assert read_pruned_meta(tmp_path / "n.safetensors")["class_names"] == names
    # names of another data set in extra (a recipe's 48 classes) do not fit a 4-class head: not kept as names
    meta = read_pruned_meta(save_pruned(model, tmp_path / "e.pt", extra={"class_names": list("abcdefgh")}))
    assert meta["class_names"] is None and meta["extra"]["class_names"] == list("abcdefgh")
    with pytest.raises(ValueError, match="class_names: 3 names for a head with 4 outputs"):
        save_pruned(model, tmp_path / "bad.pt", class_names=["a", "b", "c"])


def test_first_format_still_loads(pruned, x, tmp_path):
    """Files written before the family/geometry fields (format version 1) load as before."""
    path = save_pruned(pruned, tmp_path / "v2.pt")
    obj = torch.load(path, weights_only=True)
    meta = obj["jas_prune"]
    for key in ("family", "geometry", "transforms", "class_names", "ffn_kinds"):
        meta.pop(key)
    meta["version"] = 1
    meta["arch"] = {k: meta["arch"][k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                                 "num_heads", "qkv_bias", "class_token", "reg_tokens",
                                                 "no_embed_class", "global_pool", "pre_norm")}
    torch.save(obj, tmp_path / "v1.pt")
    loaded = load_pruned(tmp_path / "v1.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def _export(tmp_path, ckpt, *args):
    from jas_prune.cli import main

    out = tmp_path / f"{ckpt.stem}.onnx"
    code = main(["export", "onnx", str(ckpt), "--out", str(out), "--no-benchmark", *args])
    side = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else None
    return code, side


def test_export_cli_takes_class_names_from_the_checkpoint_or_numbers_them(tiny_vit, tmp_path, capsys):
    """A 10-class checkpoint exported without --data-root: names from the checkpoint, or class_j."""
    model = tiny_vit(num_classes=10, depth=1)
    names = [f"n{j}" for j in range(10)]
    code, side = _export(tmp_path, save_pruned(model, tmp_path / "named.safetensors", class_names=names))
    assert code == 0 and side["class_names"] == names
    capsys.readouterr()
    code, side = _export(tmp_path, save_pruned(model, tmp_path / "anon.safetensors"))
    err = capsys.readouterr().err
    assert code == 0 and side["class_names"] == [f"class_{j}" for j in range(10)]
    assert "holds no class names" in err and "Traceback" not in err
    data = tmp_path / "data"
    for c in ("a", "b", "c"):  # an ImageFolder with 3 classes for a 10-class head: numbered, with a warning
        (data / c).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.new("RGB", (32, 32), (40 * i, 90, 10)).save(data / c / f"{i}.png")
    code, side = _export(tmp_path, tmp_path / "anon.safetensors", "--data-root", str(data))
    assert code == 0 and side["class_names"] == [f"class_{j}" for j in range(10)]
    assert "--data-root has 3 classes but the checkpoint's head has 10 outputs" in capsys.readouterr().err
