"""The whole recipe pipeline on a tiny stand-in for the built-in model: every stage, the run
directory contents, the report, and the pruned checkpoint -> ONNX path outside a recipe."""

import json

import pytest

from conftest import replace_stage, run_recipe
from jas_prune import load_pruned
from jas_prune.cli import main
from jas_prune.models import discover_ffn
from jas_prune.pipeline import STAGES

RECIPE = """version: 1
data: {images_per_class: 3, batch_size: 16}
attribution: {method: [jas, activation], steps: 3}
masks: {topk: 2}
prune: {methods: [jas, random], ratios: [0.5], bias_compensation: [false, true]}
evaluate: {protocols: [structured, paper_cls_mask], intervention: true,
           cls_mask: {fractions: [0.5], depth: 1, ablation: {topk: [1, 2], depth: [1, 2]}}}
export: {onnx: {benchmark: false}}
report: {atlas: {images: 2, classes: [red-circle, 5]}}
"""


@pytest.fixture
def run_dir(tmp_path, tiny_builtin, monkeypatch):
    """The recipe above run once; it enables every registered stage, and each one runs (a new
    stage fails here until the recipe enables it)."""
    ran = []
    for stage in STAGES:
        replace_stage(monkeypatch, stage.name, lambda ctx, stage=stage: (ran.append(stage.name), stage.run(ctx)))
    out = tmp_path / "run"
    assert run_recipe(tmp_path, RECIPE, out) == 0
    assert ran == list(STAGES.names())
    return out


def test_every_stage_writes_its_part(run_dir, tiny_builtin):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m) >= {"dense", "locate", "masks", "paper", "pruned", "export"}
    assert {e["method"] for e in m["pruned"]} == {"jas", "random"} and len(m["pruned"]) == 4
    for e in m["pruned"]:
        assert set(e) >= {"method", "ratio", "classes", "top1", "top5", "params", "macs", "bias_compensation",
                          "checkpoint"}
        assert e["params"] < m["dense"]["params"] and e["macs"] < m["dense"]["macs"]
        model = load_pruned(run_dir / e["checkpoint"])
        assert discover_ffn(model).widths == [32, 32]  # 64 -> 32 neurons per block
        assert model.blocks[0].attn.qkv.weight.shape == tiny_builtin.blocks[0].attn.qkv.weight.shape
    assert len(m["export"]) == 5  # dense + 4 pruned
    for rec in m["export"]:
        assert rec["parity_max_abs"] <= 1e-4 and rec["top1_agreement"] == 1.0
        assert (run_dir / f"{rec['model']}.onnx").is_file() and (run_dir / f"{rec['model']}.json").is_file()
    cm = m["paper"]["cls_mask"]
    assert {"jas", "activation", "vit_slim", "random"} <= set(cm["results"])
    ablation = {(r["mask"], r["topk"], r["depth"], r["fraction"]): r for r in cm["ablation"]}
    assert set(ablation) == {(mask, k, d, 0.5) for mask in ("jas", "random") for k in (1, 2) for d in (1, 2)}
    # the ablation's K = masks.topk, depth = cls_mask.depth cell is the main protocol's measurement
    for mask in ("jas", "random"):
        assert ablation[(mask, 2, 1, 0.5)]["top5"] == cm["results"][mask][0]["top5"]
        assert ablation[(mask, 2, 1, 0.5)]["top1"] == cm["results"][mask][0]["top1"]
    assert (run_dir / "figures" / "cls_mask_ablation.png").is_file()
    report = (run_dir / "report.md").read_text()
    for heading in ("## Dense model", "## Neuron paths", "## Paper Table 1", "## Paper protocol",
                    "### Ablation: top-K × depth × fraction", "## Structured FFN pruning", "## ONNX export",
                    "## Settings"):
        assert heading in report


def test_resume_with_another_importance_aggregation_redoes_only_jas(run_dir, capsys):
    before = json.loads((run_dir / "metrics.json").read_text())
    assert {e.get("importance") for e in before["pruned"] if e["method"] == "jas"} == {"mean"}
    mtime = {e["checkpoint"]: (run_dir / e["checkpoint"]).stat().st_mtime_ns for e in before["pruned"]}
    recipe = run_dir.parent / "r.yaml"
    assert main(["recipe", "run", str(recipe), "--out", str(run_dir), "--resume",
                 "--set", "masks.importance=mean_abs_centered", "--set", "export.onnx.verify=false"]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["masks"]["importance"] == "mean_abs_centered" and len(after["pruned"]) == 4
    jas = [e for e in after["pruned"] if e["method"] == "jas"]
    assert len(jas) == 2 and {e["importance"] for e in jas} == {"mean_abs_centered"}
    rand = lambda m: sorted((e["checkpoint"], e["top1"], e["score_seconds"]) for e in m["pruned"]
                            if e["method"] == "random")  # noqa: E731
    assert rand(after) == rand(before)  # finished entries of other methods are not recomputed
    for e in after["pruned"]:  # the JAS checkpoints were written again, the others left alone
        rewritten = (run_dir / e["checkpoint"]).stat().st_mtime_ns != mtime[e["checkpoint"]]
        assert rewritten == (e["method"] == "jas"), e["checkpoint"]


def test_pruned_checkpoint_reproduces_its_accuracy(run_dir):
    """The saved checkpoint, rebuilt without pickle, scores what metrics.json says."""
    from jas_prune.data import build_source, make_loader, model_transform
    from jas_prune.evaluate import accuracy, predict_logits

    m = json.loads((run_dir / "metrics.json").read_text())
    entry = next(e for e in m["pruned"] if e["method"] == "jas" and e["bias_compensation"])
    model = load_pruned(run_dir / entry["checkpoint"])
    src = build_source("shapes", seed=0, images_per_class=3)
    logits, labels = predict_logits(model, make_loader(src.subset("test"), model_transform(model), batch_size=32))
    assert accuracy(logits, labels)["top1"] == pytest.approx(entry["top1"])


def test_export_onnx_command_outside_a_recipe(run_dir, tmp_path, capsys):
    ckpt = run_dir / "pruned-jas-r50-bc.safetensors"
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", "onnx", str(ckpt), "--out", str(out), "--no-benchmark"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["parity_max_abs"] <= 1e-4 and out.is_file()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model"]["ffn_widths"] == [32, 32] and len(side["class_names"]) == 48


def test_report_rebuilds_from_metrics(run_dir):
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "## Structured FFN pruning" in (run_dir / "report.md").read_text()


def test_class_specialised_head_cut(tmp_path, tiny_builtin):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""version: 1
data: {images_per_class: 3, batch_size: 16}
attribution: {method: jas, steps: 2}
masks: {topk: 2}
prune: {methods: [jas], ratios: [0.8], classes: [red-circle, 9, blue-star], head: cut}
""")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0
    e = json.loads((out / "metrics.json").read_text())["pruned"][0]
    assert e["classes"] == [0, 9, 21] and e["test_images"] == 3
    model = load_pruned(out / e["checkpoint"])
    assert model.num_classes == 3 and model.jas_head_classes == [0, 9, 21]
    # the class TopK masks of the kept classes survive pruning
    from jas_prune.aggregate import load_masks

    masks = load_masks(out)
    kept = json.loads((out / "metrics.json").read_text())["pruned"][0]["widths"]
    assert all(int(w) >= masks.topk[[0, 9, 21], j].any(0).sum() for j, w in enumerate(kept.values()))


# An unknown prune.classes entry, and protected class masks larger than the keep budget (a user error
# found only in the prune stage, after locate): tests/test_cli_bad_input.py.


def test_export_latency_is_sized_by_the_recipe(run_dir):
    recipe = run_dir.parent / "r.yaml"
    assert main(["recipe", "run", str(recipe), "--out", str(run_dir), "--resume",
                 "--set", "export.onnx.benchmark=true", "--set", "export.onnx.batch_sizes=[3]",
                 "--set", "export.onnx.torch_latency=false", "--set", "export.onnx.max_seconds=0.01"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["export"]) == 5
    for rec in m["export"]:
        assert [lat["batch_size"] for lat in rec["latency"]] == [3] and rec["latency_batch_size"] == 3
        assert rec["torch_latency"] == [] and rec["latency"][0]["repeats"] >= 1
