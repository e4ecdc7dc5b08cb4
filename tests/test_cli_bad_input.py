"""Bad input never crashes and never loses work (issue #7, part 3).

Every case goes through the real CLI (``jas_prune.cli.main``) and must end with exit code 2 and
exactly one line on stderr, ``jas-prune: error: ...``, naming the key, file or layer, and no
traceback. Progress and log lines may precede it; the error is the last line.

Covered elsewhere (not repeated here):
- ``parse_recipe`` / ``apply_overrides`` messages for many more schema values: tests/test_recipe.py;
- a stage enabled without its prerequisite: tests/test_cli.py
  ``test_stage_without_its_prerequisite_is_refused_before_any_work``;
- an existing run directory without ``--resume``: tests/test_cli.py ``test_run_dense_end_to_end``;
- resuming with other attribution settings: tests/test_aggregate.py
  ``test_run_locate_masks_intervention_and_resume``;
- ``JASImportance.from_run`` scores applied to another model: tests/test_pruning_plugin.py
  ``test_from_run_for_another_model_is_a_fingerprint_error``;
- ``load_pruned`` on missing / garbage / truncated / plain files: tests/test_checkpoint.py
  ``test_bad_files_raise_checkpoint_error``;
- ``predict_logits`` naming a non-finite image: tests/test_evaluate.py.

Set ``JAS_BAD_INPUT_TABLE=FILE`` to append one JSON line per case (id, command, exit code, the
stderr line): the table in the issue is generated from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import laughs
from jas_prune.cli import main

BASE = "version: 1\ndata: {images_per_class: 2, batch_size: 96}\n"
LOCATE = BASE + "attribution: {steps: 2}\n"
#: a random-init model with one output per class of the two-class folders of :func:`_folder`
TWO_CLASS_MODEL = "model: {name: vit_tiny_patch16_224, num_classes: 2}\n"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _recipe(tmp: Path, text: str | bytes) -> Path:
    return _write(tmp / "r.yaml", text)


def _run(tmp: Path, text: str | bytes, *sets: str) -> list[str]:
    args = ["recipe", "run", str(_recipe(tmp, text)), "--out", str(tmp / "run")]
    for s in sets:
        args += ["--set", s]
    return args


def _png(path: Path, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _folder(tmp: Path, bad: str | None = None) -> Path:
    """An ImageFolder with classes ``a`` and ``b`` (2 PNGs each); ``bad`` spoils class ``a``'s
    images: ``garbage`` (not an image at all) or ``truncated`` (a valid header, cut body), or
    adds a class ``c`` without images (``no-images``)."""
    root = tmp / "images"
    if bad == "single":  # class a keeps one image: it cannot be in both the probe and the test partition
        _png(root / "b" / "0.png", seed=10)
        _png(root / "b" / "1.png", seed=11)
        _png(root / "a" / "0.png", seed=0)
        return root
    if bad == "no-images":
        _write(root / "c" / "notes.txt", "not an image")
    for c, name in enumerate(("a", "b")):
        for i in range(2):
            p = _png(root / name / f"{i}.png", seed=10 * c + i)
            if name == "a" and bad == "garbage" and i == 1:
                p.write_bytes(b"<html>404 not found</html>")
            if name == "a" and bad == "truncated":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return root


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def _nan_checkpoint(tmp: Path, model: torch.nn.Module) -> Path:
    state = _state(model)
    state["head.weight"].fill_(float("nan"))
    return _save_state(tmp / "nan.safetensors", state)


def _other_arch_checkpoint(tmp: Path) -> Path:
    from jas_prune.models import create_model

    return _save_state(tmp / "wide.safetensors", _state(create_model("builtin:shapes-vit", embed_dim=48)))


def _pruned_checkpoint(tmp: Path, model: torch.nn.Module) -> Path:
    from jas_prune.checkpoint import save_pruned

    return save_pruned(model, tmp / "pruned.safetensors")


def _truncated_pth(tmp: Path, model: torch.nn.Module) -> Path:
    path = tmp / "w.pth"
    torch.save(_state(model), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _pickled_model(tmp: Path, model: torch.nn.Module) -> Path:
    """``torch.save(model)``: a whole pickled module, which jas-prune never unpickles."""
    torch.save(model, tmp / "model.pth")
    return tmp / "model.pth"


def _blocker(tmp: Path) -> Path:
    """A plain file, so that ``blocker/sub`` cannot be created."""
    return _write(tmp / "blocker", "x")


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Path, torch.nn.Module], list[str]]
    needle: str  # ``{tmp}`` is replaced by the case's tmp_path


#: issue 18: recipes accepted by validation before, then a crash (or a run that never ends);
#: refused before the run directory exists
RECIPE_CASES = [
    Case("billion-laughs", lambda t, m: _run(t, laughs("model: {name: *i}")),
         "r.yaml: more than 100000 values once its YAML aliases are expanded"),
    Case("billion-laughs-section", lambda t, m: _run(t, laughs("model: *i")),
         "r.yaml: more than 100000 values once its YAML aliases are expanded"),
    Case("recipe-too-big", lambda t, m: _run(t, "version: 1\nprune: {classes: [" + "1, " * 400_000 + "1]}\n"),
         "bytes; a recipe file is at most 1048576 bytes"),
    Case("name-huge", lambda t, m: _run(t, "version: 1\nmodel: {name: " + "x" * 500_000 + "}\n"),
         "model.name: string should have at most 4096 characters (got 'xxx"),
    Case("seed-negative", lambda t, m: _run(t, "version: 1\n", "runtime.seed=-1"),
         "runtime.seed: must be ≥ 0 (got -1)"),
    Case("seed-huge", lambda t, m: _run(t, "version: 1\n", "runtime.seed=100000000000000000000000"),
         "runtime.seed: must be ≤ 4294967295 (got 100000000000000000000000)"),
    Case("model-name-a-directory", lambda t, m: _run(t, "version: 1\n", f"model.name={_empty_dir(t)}"),
         "model.name: '{tmp}/empty' is a directory, not a timm model name"),
    Case("vit_slim-epochs-inf", lambda t, m: _run(t, "version: 1\nprune: {methods: [vit_slim]}\n",
                                                  "prune.vit_slim.epochs=.inf"),
         "prune.vit_slim.epochs: input should be a finite number (got inf)"),
    Case("finetune-epochs-inf", lambda t, m: _run(t, "version: 1\nprune: {methods: [random]}\n",
                                                  "prune.finetune.epochs=.inf"),
         "prune.finetune.epochs: input should be a finite number (got inf)"),
    Case("finetune-epochs-huge", lambda t, m: _run(t, "version: 1\nprune: {methods: [random]}\n",
                                                   "prune.finetune.epochs=1000000000.0"),
         "prune.finetune.epochs: must be ≤ 1000.0 (got 1000000000.0)"),
    Case("finetune-lr-inf", lambda t, m: _run(t, "version: 1\nprune: {methods: [random]}\n",
                                              "prune.finetune.lr=.inf"),
         "prune.finetune.lr: input should be a finite number (got inf)"),
    Case("images_per_class-huge", lambda t, m: _run(t, "version: 1\n", "data.images_per_class=1000000000000"),
         "data.images_per_class: must be ≤ 10000 (got 1000000000000)"),
    Case("attribution-steps-huge", lambda t, m: _run(t, "version: 1\nattribution: {}\n",
                                                     "attribution.steps=1000000000"),
         "attribution.steps: must be ≤ 10000 (got 1000000000)"),
    Case("ratios-duplicate", lambda t, m: _run(t, "version: 1\nprune: {methods: [random], ratios: [0.5, 0.5]}\n"),
         "prune.ratios: 0.5 is listed twice: list each ratio once"),
]

CASES = [
    # -- the recipe file ------------------------------------------------------------------------
    Case("recipe-missing", lambda t, m: ["recipe", "run", str(t / "nope.yaml")],
         "{tmp}/nope.yaml: recipe file not found"),
    Case("recipe-validate-missing", lambda t, m: ["recipe", "validate", str(t / "nope.yaml")],
         "{tmp}/nope.yaml: recipe file not found"),
    Case("recipe-is-a-directory", lambda t, m: ["recipe", "run", str(t)], "is a directory"),
    Case("recipe-validate-is-a-directory", lambda t, m: ["recipe", "validate", str(t)], "is a directory"),
    Case("unknown-option", lambda t, m: ["recipe", "run", str(_recipe(t, "version: 1\n")), "--sett", "x=1"],
         "No such option '--sett'. Did you mean '--set'? (see 'jas-prune recipe run --help')"),
    Case("recipe-empty", lambda t, m: _run(t, ""), "version: missing"),
    Case("recipe-not-utf8", lambda t, m: _run(t, b"version: 1\nmodel: {name: \xff}\n"),
         "{tmp}/r.yaml: cannot read recipe"),
    Case("yaml-unclosed-bracket", lambda t, m: _run(t, "version: 1\nmodel: [\n"),
         "{tmp}/r.yaml: malformed YAML at line 3"),
    Case("yaml-bad-indent", lambda t, m: _run(t, "version: 1\nmodel:\n  name: x\n   pretrained: true\n"),
         "{tmp}/r.yaml: malformed YAML at line 4"),
    Case("yaml-tab", lambda t, m: _run(t, "version: 1\nmodel:\n\tname: x\n"), "{tmp}/r.yaml: malformed YAML at line 3"),
    Case("yaml-not-a-mapping", lambda t, m: _run(t, "- version: 1\n"), "a recipe must be a YAML mapping, got list"),
    Case("version-2", lambda t, m: _run(t, "version: 2\n"), "version: must be one of 1"),
    # -- unknown keys, at every level -------------------------------------------------------------
    Case("unknown-section", lambda t, m: _run(t, "version: 1\natribution: {steps: 2}\n"),
         "atribution: unknown key (did you mean 'attribution'?)"),
    Case("unknown-key", lambda t, m: _run(t, "version: 1\nattribution:\n  stepz: 3\n"),
         "attribution.stepz: unknown key (did you mean 'steps'?)"),
    Case("unknown-key-no-close-match", lambda t, m: _run(t, "version: 1\nmodel: {zzz: 1}\n"),
         "model.zzz: unknown key (valid keys: name, pretrained, checkpoint, num_classes)"),
    Case("unknown-data", lambda t, m: _run(t, "version: 1\ndata: {root_dir: /x}\n"),
         "data.root_dir: unknown key (did you mean 'root'?)"),
    Case("unknown-masks", lambda t, m: _run(t, "version: 1\nmasks: {top_k: 3}\n"),
         "masks.top_k: unknown key (did you mean 'topk'?)"),
    Case("unknown-prune.vit_slim", lambda t, m: _run(t, "version: 1\nprune: {vit_slim: {lamda: 1}}\n"),
         "prune.vit_slim.lamda: unknown key (did you mean 'lambda'?)"),
    Case("unknown-prune.finetune", lambda t, m: _run(t, "version: 1\nprune: {finetune: {epoch: 1}}\n"),
         "prune.finetune.epoch: unknown key (did you mean 'epochs'?)"),
    Case("unknown-export.onnx", lambda t, m: _run(t, "version: 1\nexport: {onnx: {opsett: 17}}\n"),
         "export.onnx.opsett: unknown key (did you mean 'opset'?)"),
    Case("unknown-evaluate.cls_mask", lambda t, m: _run(t, "version: 1\nevaluate: {cls_mask: {fraction: [0.5]}}\n"),
         "evaluate.cls_mask.fraction: unknown key (did you mean 'fractions'?)"),
    Case("unknown-runtime", lambda t, m: _run(t, "version: 1\nruntime: {sed: 1}\n"),
         "runtime.sed: unknown key (did you mean 'seed'?)"),
    # -- wrong types ------------------------------------------------------------------------------
    Case("steps-many", lambda t, m: _run(t, "version: 1\nattribution: {steps: many}\n"),
         "attribution.steps: input should be a valid integer"),
    Case("section-not-a-mapping", lambda t, m: _run(t, "version: 1\nattribution: 5\n"),
         "attribution: must be a mapping"),
    Case("ratios-not-a-list", lambda t, m: _run(t, "version: 1\nprune: {methods: [random], ratios: half}\n"),
         "prune.ratios: input should be a valid list"),
    Case("method-empty-list", lambda t, m: _run(t, "version: 1\nattribution: {method: []}\n"),
         "attribution.method: must name at least one method"),
    Case("classes-empty-list", lambda t, m: _run(t, "version: 1\nprune: {methods: [random], classes: []}\n"),
         "prune.classes: must list at least one class"),
    # -- out-of-range values ----------------------------------------------------------------------
    Case("steps-1-trapezoid", lambda t, m: _run(t, "version: 1\nattribution: {steps: 1, quadrature: trapezoid}\n"),
         "attribution.steps: must be ≥ 2 with quadrature 'trapezoid'"),
    Case("steps-0", lambda t, m: _run(t, "version: 1\n", "attribution.steps=0"), "attribution.steps: must be ≥ 1"),
    Case("attribution.topk-above-width", lambda t, m: _run(t, BASE + "attribution: {steps: 2, topk: 65}\n"),
         "attribution.topk: 65 exceeds the FFN width 64 of block 0"),
    Case("masks.topk-above-width", lambda t, m: _run(t, LOCATE + "masks: {topk: 65}\n"),
         "masks.topk: 65 exceeds the FFN width 64 of block 0"),
    Case("ratio-1", lambda t, m: _run(t, "version: 1\nprune: {methods: [random], ratios: [0.5, 1.0]}\n"),
         "prune.ratios: 1.0 is outside (0, 1)"),
    Case("ratio-0", lambda t, m: _run(t, "version: 1\nprune: {methods: [random], ratios: [0]}\n"),
         "prune.ratios: 0.0 is outside (0, 1)"),
    Case("class-without-test-images", lambda t, m: _run(
        t, f"version: 1\ndata: {{kind: imagefolder, root: {_folder(t, 'single')}}}\n" + TWO_CLASS_MODEL +
           "prune: {methods: [random], classes: [a]}\n"),
        "prune.classes: class 'a' has no test images (data.probe_fraction 0.8, 1 image(s) in the data set)"),
    Case("class-unknown-name", lambda t, m: _run(t, BASE + "prune: {methods: [random], classes: [purple-hexagon]}\n"),
         "prune.classes: 'purple-hexagon' is not a class of the data set"),
    Case("class-index-out-of-range", lambda t, m: _run(t, BASE + "prune: {methods: [random], classes: [3, 48]}\n"),
         "prune.classes: 48 is not a class of the data set (48 classes"),
    Case("probe_fraction-1.5", lambda t, m: _run(t, "version: 1\ndata: {probe_fraction: 1.5}\n"),
         "data.probe_fraction: must be < 1.0"),
    Case("probe_fraction-0", lambda t, m: _run(t, "version: 1\ndata: {probe_fraction: 0}\n"),
         "data.probe_fraction: must be > 0.0"),
    Case("images_per_class-1", lambda t, m: _run(t, "version: 1\ndata: {images_per_class: 1}\n"),
         "data.images_per_class: must be ≥ 2"),
    Case("layers-index-out-of-range", lambda t, m: _run(t, BASE + "attribution: {steps: 2, layers: [0, 5]}\n"),
         "attribution.layers: block index 5 is out of range 0..1"),
    Case("layers-depth-out-of-range", lambda t, m: _run(t, BASE + "attribution: {steps: 2, layers: 3}\n"),
         "attribution.layers: depth 3 is out of range 1..2"),
    Case("cls_mask.depth-above-depth", lambda t, m: _run(
        t, LOCATE + "masks: {topk: 2}\nevaluate: {protocols: [paper_cls_mask], cls_mask: {depth: 7}}\n"),
        "evaluate.cls_mask.depth: 7 exceeds the 2 blocks of model 'builtin:shapes-vit'"),
    Case("cls_mask.ablation-depth-above-depth", lambda t, m: _run(
        t, LOCATE + "masks: {topk: 2}\nevaluate: {protocols: [paper_cls_mask], cls_mask: {ablation: {depth: [1, 3]}}}\n"),
        "evaluate.cls_mask.ablation.depth: 3 exceeds the 2 blocks of model 'builtin:shapes-vit'"),
    Case("cls_mask.ablation-topk-above-width", lambda t, m: _run(
        t, LOCATE + "masks: {topk: 2}\nevaluate: {protocols: [paper_cls_mask], cls_mask: {ablation: {topk: [65]}}}\n"),
        "evaluate.cls_mask.ablation.topk: 65 exceeds the FFN width 64"),
    Case("num_classes-vs-checkpoint", lambda t, m: _run(t, BASE + "model: {num_classes: 10}\n"),
         "model.num_classes: 10, but the checkpoint"),
    Case("cuda-without-cuda", lambda t, m: _run(t, "version: 1\nruntime: {device: cuda}\n"),
         "runtime.device: 'cuda' requested but CUDA is not available"),
    # -- data -------------------------------------------------------------------------------------
    Case("root-missing", lambda t, m: _run(t, "version: 1\ndata: {kind: imagefolder, root: /nonexistent/dir}\n"),
         "data.root: directory not found: /nonexistent/dir"),
    Case("root-is-a-file", lambda t, m: _run(t, f"version: 1\ndata: {{kind: imagefolder, root: {_blocker(t)}}}\n"),
         "data.root: not a directory: {tmp}/blocker"),
    Case("root-empty", lambda t, m: _run(t, f"version: 1\ndata: {{kind: imagefolder, root: {_empty_dir(t)}}}\n"),
         "data.root: no class folders in {tmp}/empty"),
    Case("class-folder-without-images", lambda t, m: _run(
        t, f"version: 1\ndata: {{kind: imagefolder, root: {_folder(t, 'no-images')}}}\n"),
        "data.root: class folder 'c' in {tmp}/images has no images"),
    Case("image-not-an-image", lambda t, m: _run(
        t, f"version: 1\ndata: {{kind: imagefolder, root: {_folder(t, 'garbage')}}}\n"),
        "data.root: cannot read image {tmp}/images/a/1.png"),
    Case("image-truncated-in-a-worker", lambda t, m: _run(
        t, f"version: 1\ndata: {{kind: imagefolder, root: {_folder(t, 'truncated')}, workers: 1}}\n" + TWO_CLASS_MODEL),
        "data.root: cannot read image {tmp}/images/a/"),
    # -- models -----------------------------------------------------------------------------------
    Case("model-resnet18", lambda t, m: _run(t, "version: 1\nmodel: {name: resnet18}\n"),
         "model.name: model 'resnet18' (ResNet) is not a timm VisionTransformer"),
    Case("model-distilled-deit", lambda t, m: _run(t, "version: 1\nmodel: {name: deit_tiny_distilled_patch16_224}\n"),
         "model.name: model 'deit_tiny_distilled_patch16_224' has a distillation token"),
    Case("model-unknown-timm-name", lambda t, m: _run(t, "version: 1\nmodel: {name: vit_tiny_patch16_244}\n"),
         "model.name: unknown timm model 'vit_tiny_patch16_244' (did you mean 'vit_tiny_patch16_224'?)"),
    Case("model-unknown-builtin", lambda t, m: _run(t, "version: 1\nmodel: {name: 'builtin:nope'}\n"),
         "model.name: unknown built-in model 'builtin:nope'"),
    Case("model-builtin-pretrained", lambda t, m: _run(t, "version: 1\nmodel: {pretrained: true}\n"),
         "model.pretrained: 'builtin:shapes-vit' ships its weights"),
    # -- checkpoints ------------------------------------------------------------------------------
    Case("checkpoint-missing", lambda t, m: _run(t, "version: 1\nmodel: {checkpoint: /nonexistent/w.safetensors}\n"),
         "model.checkpoint: file not found: /nonexistent/w.safetensors"),
    Case("checkpoint-garbage", lambda t, m: _run(
        t, f"version: 1\nmodel: {{checkpoint: {_write(t / 'w.safetensors', b'garbage' * 9)}}}\n"),
        "model.checkpoint: cannot read {tmp}/w.safetensors"),
    Case("checkpoint-truncated-pth", lambda t, m: _run(
        t, f"version: 1\nmodel: {{checkpoint: {_truncated_pth(t, m)}}}\n"),
        "model.checkpoint: cannot read {tmp}/w.pth: corrupt or truncated file"),
    Case("checkpoint-pickled-model", lambda t, m: _run(
        t, f"version: 1\nmodel: {{checkpoint: {_pickled_model(t, m)}}}\n"),
        "model.checkpoint: cannot read {tmp}/model.pth: it holds pickled Python objects "
        "(timm.models.vision_transformer.VisionTransformer)"),
    Case("checkpoint-unknown-suffix", lambda t, m: _run(
        t, f"version: 1\nmodel: {{checkpoint: {_write(t / 'w.txt', 'x')}}}\n"),
        "model.checkpoint: unsupported file type '.txt'"),
    Case("checkpoint-other-architecture", lambda t, m: _run(
        t, f"version: 1\nmodel: {{checkpoint: {_other_arch_checkpoint(t)}}}\n"),
        "model.checkpoint: {tmp}/wide.safetensors does not match the model"),
    Case("export-garbage-checkpoint", lambda t, m: [
        "export", "onnx", str(_write(t / "p.safetensors", b"garbage" * 9)), "--out", str(t / "m.onnx")],
        "checkpoint: cannot read {tmp}/p.safetensors"),
    Case("export-missing-checkpoint", lambda t, m: ["export", "onnx", str(t / "p.pt"), "--out", str(t / "m.onnx")],
         "checkpoint: file not found: {tmp}/p.pt"),
    Case("export-dense-state-dict", lambda t, m: [
        "export", "onnx", str(_save_state(t / "dense.safetensors", _state(m))), "--out", str(t / "m.onnx")],
        "checkpoint: {tmp}/dense.safetensors is not a jas-prune pruned checkpoint"),
    # -- output directories -----------------------------------------------------------------------
    Case("out-below-a-file", lambda t, m: ["recipe", "run", str(_recipe(t, "version: 1\n")),
                                           "--out", str(_blocker(t) / "sub")],
         "--out {tmp}/blocker/sub: cannot write there ({tmp}/blocker is a file, not a directory)"),
    Case("export-out-json", lambda t, m: ["export", "onnx", str(t / "p.pt"), "--out", str(t / "m.json")],
         "--out {tmp}/m.json: the ONNX file must not end in .json"),
    Case("export-out-below-a-file", lambda t, m: [
        "export", "onnx", str(_pruned_checkpoint(t, m)), "--out", str(_blocker(t) / "m.onnx"), "--no-benchmark"],
        "--out {tmp}/blocker/m.onnx: cannot write there ({tmp}/blocker is a file, not a directory)"),
    Case("data-shapes-out-below-a-file", lambda t, m: [
        "data", "shapes", "--split", "test", "--images-per-class", "2", "--out", str(_blocker(t) / "d")],
        "--out {tmp}/blocker/d: cannot write there ({tmp}/blocker is a file, not a directory)"),
    # -- non-finite model output ------------------------------------------------------------------
    Case("nan-weights-dense", lambda t, m: _run(
        t, BASE + f"model: {{checkpoint: {_nan_checkpoint(t, m)}}}\n"),
        "evaluate dense: model output is not finite (NaN/Inf logits) for image shapes:eval:"),
    # -- --set ------------------------------------------------------------------------------------
    Case("set-without-equals", lambda t, m: _run(t, "version: 1\n", "attribution.steps"),
         "--set attribution.steps: expected KEY=VALUE"),
    Case("set-unknown-key", lambda t, m: _run(t, "version: 1\n", "attribution.stepz=3"),
         "attribution.stepz: unknown key (did you mean 'steps'?)"),
    Case("set-unknown-section", lambda t, m: _run(t, "version: 1\n", "atribution.steps=3"),
         "atribution: unknown key (did you mean 'attribution'?)"),
    Case("set-into-a-value", lambda t, m: _run(t, "version: 1\nmodel: {name: 'builtin:shapes-vit'}\n",
                                               "model.name.x=3"),
         "--set model.name.x=3: model.name is not a section"),
    Case("set-empty-segment", lambda t, m: _run(t, "version: 1\n", "attribution..steps=3"),
         "--set attribution..steps=3: empty key segment"),
    Case("set-wrong-type", lambda t, m: _run(t, "version: 1\n", "attribution.steps=many"),
         "attribution.steps: input should be a valid integer"),
    *RECIPE_CASES,
]


def _record(case_id: str, args: list[str], code: int, line: str, tmp: Path) -> None:
    table = os.environ.get("JAS_BAD_INPUT_TABLE")
    if table:
        shown = [a.replace(str(tmp), "$TMP") for a in args]
        recipe = tmp / "r.yaml"
        text = recipe.read_bytes().decode("utf-8", "replace").replace(str(tmp), "$TMP") if recipe.is_file() else None
        with open(table, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": case_id, "args": shown, "recipe": text, "code": code,
                                "stderr": line.replace(str(tmp), "$TMP")}) + "\n")


#: cases refused while a stage runs (the image or output is only met then): the run directory
#: keeps its recipe.yaml, and a fixed run continues with --resume
STARTED = {"nan-weights-dense", "image-truncated-in-a-worker"}


def check_user_error(capsys, args: list[str], needle: str, tmp: Path, case_id: str) -> str:
    """Run the CLI; assert exit code 2 and one ``jas-prune: error:`` line (the last) with ``needle``."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    last = lines[-1] if lines else ""
    _record(case_id, args, code, last, tmp)
    assert code == 2, err
    assert "Traceback" not in err, err
    assert [x for x in lines if x.startswith("jas-prune: error:")] == [last], err
    assert needle.replace("{tmp}", str(tmp)) in last, err
    return last


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, tmp_path, tiny_builtin, capsys):
    if case.id == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    args = case.args(tmp_path, tiny_builtin)
    line = check_user_error(capsys, args, case.needle, tmp_path, case.id)
    assert not (tmp_path / "run" / "metrics.json").exists()  # refused before any stage finished
    if args[:2] == ["recipe", "run"] and "--resume" not in args and case.id not in STARTED:
        # refused before any work: nothing marks the directory as a run, the fixed recipe re-runs there
        assert not (tmp_path / "run" / "recipe.yaml").exists()
    if case in RECIPE_CASES:  # no run directory, lock or log left behind; the value never echoed whole
        assert not (tmp_path / "run").exists() and len(line) < 300, line


def test_bare_group_prints_its_help(capsys):
    """``jas-prune recipe`` alone is not an error worth one line: it shows the group's help."""
    assert main(["recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: jas-prune recipe") and "\nCommands:\n" in err and "error" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out(tmp_path, tiny_builtin, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        check_user_error(capsys, ["recipe", "run", str(_recipe(tmp_path, "version: 1\n")), "--out", str(ro / "run")],
                         "--out {tmp}/ro/run: cannot write there", tmp_path, "out-read-only")
    finally:
        ro.chmod(0o755)


def test_nan_weights_in_locate_name_the_image(tmp_path, tiny_builtin, capsys, monkeypatch):
    """The locate stage checks its own outputs (here reached without the dense stage)."""
    from conftest import replace_stage

    replace_stage(monkeypatch, "dense", lambda ctx: None)
    args = _run(tmp_path, LOCATE + f"model: {{checkpoint: {_nan_checkpoint(tmp_path, tiny_builtin)}}}\n")
    check_user_error(capsys, args, "locate probe (jas): model output is not finite for image shapes:eval:", tmp_path, "nan-weights-locate")


def test_resume_with_another_model_is_refused(tmp_path, tiny_builtin, capsys):
    """paths/ and masks.safetensors of one model are never reused for another one."""
    from jas_prune.models import create_model

    recipe = _recipe(tmp_path, LOCATE + "masks: {topk: 2}\n")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0
    torch.manual_seed(1)
    other = _save_state(tmp_path / "other.safetensors", _state(create_model("builtin:shapes-vit")))
    args = ["recipe", "run", str(recipe), "--out", str(out), "--resume", "--set", f"model.checkpoint={other}"]
    check_user_error(capsys, args, "the stored results were computed with a different model",
                     tmp_path, "resume-with-another-model")


def test_error_after_locate_keeps_the_work_and_resume_reuses_it(tmp_path, tiny_builtin, capsys):
    """A user error only detectable mid-run (the protected class masks exceed the keep budget)
    leaves metrics.json with the finished stages and the paths/ chunks; --resume after fixing the
    recipe locates nothing again."""
    text = LOCATE + "masks: {topk: 8}\nprune: {methods: [jas], ratios: [0.95], classes: [0, 1, 2, 3], head: cut}\n"
    recipe = _recipe(tmp_path, text)
    out = tmp_path / "run"
    line = check_user_error(capsys, ["recipe", "run", str(recipe), "--out", str(out)],
                            "prune.ratios: 0.95 with method 'jas'", tmp_path, "prune-budget-mid-run")
    assert "lower prune.ratios or masks.topk" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"dense", "locate", "masks"} <= set(metrics) and "pruned" not in metrics
    assert metrics["locate"]["images_this_run"] == 48
    chunks = sorted((out / "paths" / "probe").glob("chunk-*.safetensors"))
    assert len(chunks) == 2 and not list(out.rglob("*.tmp"))
    assert (out / "masks.safetensors").is_file()
    assert "prune.ratios: 0.95" in (out / "run.log").read_text()
    assert main(["recipe", "run", str(recipe), "--out", str(out), "--resume", "--set", "prune.ratios=[0.5]"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["locate"]["images_this_run"] == 0 and again["locate"]["chunks_resumed"] == 2
    assert [e["ratio"] for e in again["pruned"]] == [0.5]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_write_that_dies_half_way_leaves_the_old_file(tmp_path, tiny_builtin, monkeypatch, suffix):
    """Checkpoints (like metrics.json, masks, paths/ chunks, figures and report.md, which all go
    through ``jas_prune.io.atomic_write``; ONNX files: tests/test_deploy.py
    ``test_failed_export_leaves_nothing``) are written to a temporary file and renamed: a write
    interrupted half-way leaves the previous file intact and no stray temporary behind."""
    import safetensors.torch

    from jas_prune.checkpoint import load_pruned, save_pruned

    target = save_pruned(tiny_builtin, tmp_path / f"pruned{suffix}")
    before, files = target.read_bytes(), sorted(tmp_path.iterdir())

    def dies(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(safetensors.torch, "save_file", dies)
        mp.setattr(torch, "save", dies)
        save_pruned(tiny_builtin, target)
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == files
    load_pruned(target)


def test_non_finite_attribution_scores_name_image_and_block():
    """Finite probabilities but a NaN candidate score (e.g. an overflowing gradient) are refused too."""
    import types

    from jas_prune.data import Sample
    from jas_prune.errors import NonFiniteOutputError
    from jas_prune.pipeline.stages.locate import _check_finite

    chunk = [Sample("img-a", 0, 0), Sample("img-b", 1, 1)]
    ok = types.SimpleNamespace(probs=torch.tensor([0.5, 0.4]), layers=[0, 3],
                               scores=[torch.zeros(2, 4), torch.zeros(2, 4)])
    _check_finite(ok, chunk, "locate probe (jas)")
    ok.scores[1][1, 2] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"^locate probe \(jas\): attribution scores are not finite "
                                                   r"for image img-b in block 3$"):
        _check_finite(ok, chunk, "locate probe (jas)")


def test_billion_laughs_refused_before_torch_is_imported(tmp_path):
    """Issue 18: the command line bounds the YAML before importing PyTorch (alone ~0.6 GB and
    seconds): the "billion laughs" recipe is refused in < 2 s and < 200 MB (the process's own
    peak resident memory, read from /proc at exit)."""
    import subprocess
    import sys
    import time

    recipe, seen = _recipe(tmp_path, laughs("model: {name: *i}")), tmp_path / "seen.txt"
    child = (
        "import atexit, runpy, sys\n"
        "def seen():\n"
        "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
        f"    open({str(seen)!r}, 'w').write(hwm + ' ' + str('torch' in sys.modules))\n"
        "atexit.register(seen)\n"
        f"sys.argv = ['jas-prune', 'recipe', 'validate', {str(recipe)!r}]\n"
        "runpy.run_module('jas_prune', run_name='__main__', alter_sys=True)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"jas-prune: error: {recipe}: more than 100000 values once its YAML aliases are expanded; "
        "a recipe is a few dozen settings"]
    peak_kb, torch_imported = seen.read_text().split()
    assert torch_imported == "False"
    assert int(peak_kb) < 200 * 1024, peak_kb
    assert seconds < 2.0, seconds
