"""Hugging Face ViT/DeiT from a local directory (``model.name: hf:DIR``): what is loaded, what
is refused and why, and a whole recipe run on one. Skipped when transformers is not installed
(``pip install -e ".[hf]"``)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from jas_prune.errors import CheckpointError, JasPruneError, PretrainedUnavailableError, UnsupportedModelError

transformers = pytest.importorskip("transformers")


def _save(tmp_path, kind: str = "ViT", name: str = "m", **over):
    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, num_labels=5)
    cfg.update(over)
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForImageClassification")(getattr(transformers, f"{kind}Config")(**cfg))
    path = tmp_path / name
    model.eval().save_pretrained(path)
    return model, path


def test_loads_as_a_logits_model_with_the_directory_data_config(tmp_path):
    from jas_prune.models import discover_ffn, input_size, load_model
    from jas_prune.models.hf import HFImageClassifier

    hf, path = _save(tmp_path, "DeiT", id2label={i: f"c{i}" for i in range(5)},
                     label2id={f"c{i}": i for i in range(5)})
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "do_center_crop": True, "size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}}))
    model = load_model(f"hf:{path}")
    assert isinstance(model, HFImageClassifier) and not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), hf(pixel_values=x).logits)
    info = discover_ffn(model)
    assert info.family == "hf-vit" and info.num_prefix_tokens == 2 and info.widths == [64, 64]
    assert model.num_classes == 5 and model.jas_class_names == [f"c{i}" for i in range(5)]
    assert input_size(model) == (3, 32, 32)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.8
    assert cfg["architecture"] == f"hf:{path}"


def test_refusals_name_what_was_found(tmp_path, monkeypatch):
    from jas_prune.models import discover_ffn, load_model
    from jas_prune.models.hf import wrap_hf

    hf, path = _save(tmp_path)
    with pytest.raises(CheckpointError, match=f"directory not found: {tmp_path / 'nope'}"):
        load_model(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(CheckpointError, match="model.num_classes: 7, but .* has a 5-class classifier"):
        load_model(f"hf:{path}", num_classes=7)
    with pytest.raises(PretrainedUnavailableError, match="loads the weights in its directory"):
        load_model(f"hf:{path}", pretrained=True)
    with pytest.raises(CheckpointError, match="leave model.checkpoint unset"):
        load_model(f"hf:{path}", checkpoint=tmp_path / "w.safetensors")
    teacher = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(UnsupportedModelError, match="holds a DeiTForImageClassificationWithTeacher; jas-prune supports "
                                                    "ViTForImageClassification and DeiTForImageClassification"):
        load_model(f"hf:{tmp_path / 'teacher'}")
    with pytest.raises(UnsupportedModelError, match=r"returns a ModelOutput; load it with jas_prune.load_model\('hf:DIR'\)"):
        discover_ffn(hf)  # the raw transformers model: its forward does not return logits
    assert discover_ffn(wrap_hf(hf)).depth == 2
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load the weights"):
        load_model(f"hf:{path}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(UnsupportedModelError, match=r'pip install -e "\.\[hf\]"'):
        load_model(f"hf:{path}")


def test_cli_refuses_a_bad_hf_directory_with_exit_code_2(tmp_path, capsys):
    from jas_prune.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {{name: 'hf:{tmp_path / 'missing'}'}}\n")
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"model.name: hf:{tmp_path / 'missing'}: directory not found" in err


def test_recipe_runs_on_an_hf_directory(tmp_path, capsys):
    """The whole pipeline (locate, masks, JAS pruning, export) on a 48-class HF ViT for the
    built-in shapes data; the exported file keeps the pixel_values/logits names, and the model's
    id2label names its outputs in the checkpoint, the run's sidecars and ``jas-prune export onnx``
    alike (docs/class-names.md)."""
    from jas_prune.checkpoint import read_pruned_meta
    from jas_prune.cli import main

    id2label = {i: f"hf-{i}" for i in range(48)}
    _, path = _save(tmp_path, num_labels=48, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{name: 'hf:{path}'}}\ndata: {{images_per_class: 2, batch_size: 96}}\n"
        "attribution: {steps: 2}\nmasks: {topk: 2}\nprune: {methods: [jas], ratios: [0.5]}\n"
        "export: {onnx: {benchmark: false}}\n")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["method"] for e in metrics["pruned"]] == ["jas"]
    assert all(e["parity_max_abs"] <= 1e-4 for e in metrics["export"])
    import onnx

    for e in metrics["export"]:
        g = onnx.load(str(out / e["path"]) if not e["path"].startswith("/") else e["path"]).graph
        assert [i.name for i in g.input] == ["pixel_values"] and [o.name for o in g.output] == ["logits"]
        side = json.loads((out / e["path"]).with_suffix(".json").read_text())
        assert side["class_names"] == list(id2label.values()), e["path"]
    ckpt = out / metrics["pruned"][0]["checkpoint"]
    assert read_pruned_meta(ckpt)["class_names"] == list(id2label.values())
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "cli.onnx"), "--no-benchmark"]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["class_names"] == list(id2label.values())


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_pruned_model_save_pretrained_reloads_with_from_pretrained(tmp_path, mode):
    """Hugging Face users' own save/load path: uniform widths are written into the config
    (the wrapper's save_pretrained and the transformers model's own); widths that differ per
    layer are refused in one line pointing to save_pruned/load_pruned, nothing written."""
    from jas_prune.models import load_model
    from jas_prune.pruning import prune_ffn

    _, path = _save(tmp_path)
    model = load_model(f"hf:{path}")
    g = torch.Generator().manual_seed(0)
    scores = {0: torch.rand(64, generator=g), 1: torch.rand(64, generator=g) * 10}
    prune_ffn(model, scores, ratio=0.5, mode=mode, normalizer="none" if mode == "global" else "mean", min_keep=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    if mode == "global":
        with pytest.raises(JasPruneError, match=r"^save_pretrained: FFN widths differ per layer .*jas_prune\.load_pruned"):
            model.save_pretrained(tmp_path / "pruned")
        assert not (tmp_path / "pruned").exists()
        return
    model.save_pretrained(tmp_path / "pruned")
    model.model.save_pretrained(tmp_path / "inner")  # the transformers model's own, after prune_ffn
    for d in ("pruned", "inner"):
        back = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / d)).eval()
        with torch.no_grad():
            assert torch.allclose(back(pixel_values=x).logits, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(load_model(f"hf:{tmp_path / 'pruned'}")(x), expected, atol=1e-6)
