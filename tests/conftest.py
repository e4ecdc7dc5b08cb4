"""Shared fixtures and helpers: tiny random-init timm ViTs (so the suite stays fast on a 2-core
CPU), running a recipe through the CLI, running a deployment script without Torch, replacing a
stage, comparing two run directories' results. Tests import the plain helpers with
``from conftest import ...``; tiny models and references shared with the benchmarks live in
:mod:`jas_prune.testing`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_tiny_vit(num_classes: int = 48, depth: int = 2, embed_dim: int = 32, seed: int = 0, **kw):
    """A tiny timm VisionTransformer on 32x32 inputs (patch 8 -> 16 tokens + class token)."""
    import timm

    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=2,
                mlp_ratio=2.0, num_classes=num_classes)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit


@pytest.fixture
def tiny_builtin(monkeypatch, tmp_path):
    """Replace ``builtin:shapes-vit`` by a tiny random-init model with weights in tmp_path."""
    from safetensors.torch import save_file

    from jas_prune import models

    entry = dict(models.BUILTIN_MODELS["shapes-vit"])
    entry["kwargs"] = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                           num_classes=48)
    weights = tmp_path / "tiny-shapes-vit.safetensors"
    monkeypatch.setitem(models.BUILTIN_MODELS, "shapes-vit", entry)
    torch.manual_seed(0)
    model = models.create_model("builtin:shapes-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    monkeypatch.setattr(models, "builtin_weights_path", lambda name: weights)
    return model.eval()


# -- a six-class tiny ViT with a fixed batch, shared by the importance and pruning tests ----------


@pytest.fixture
def model(tiny_vit):
    return tiny_vit(num_classes=6, depth=3)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 6


@pytest.fixture
def loader(batch):
    x, y = batch
    return [(x[:6], y[:6], torch.arange(6)), (x[6:], y[6:], torch.arange(6, 12))]


@pytest.fixture
def refused_recipe(tmp_path, capsys):
    """``refused_recipe(text)`` validates a recipe through the CLI and returns its one stderr line,
    after checking the refusal is exit code 2, one line, no traceback."""
    from jas_prune.cli import main

    def refuse(text: str) -> str:
        recipe = tmp_path / "refused.yaml"
        recipe.write_text(text)
        code = main(["recipe", "validate", str(recipe)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    return refuse


def replace_stage(monkeypatch, name: str, run) -> None:
    """Make the pipeline stage ``name`` run ``run(ctx)`` instead (for the duration of a test)."""
    import dataclasses

    from jas_prune.pipeline.stages import STAGES

    monkeypatch.setitem(STAGES._entries, name, dataclasses.replace(STAGES.get(name), run=run))


def run_recipe(tmp_path, text: str, out, *sets: str, resume: bool = False) -> int:
    """Write the recipe ``text`` to ``tmp_path/r.yaml`` and run it through the CLI into ``out``
    (``--set`` each of ``sets``, ``--resume`` with ``resume``); the exit code."""
    from jas_prune.cli import main

    recipe = Path(tmp_path) / "r.yaml"
    recipe.write_text(text)
    args = ["recipe", "run", str(recipe), "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    return main(args + (["--resume"] if resume else []))


REPO = Path(__file__).resolve().parents[1]

#: runs ``argv[1]`` as ``__main__`` with Torch, timm, ONNX and jas_prune unimportable, then checks
#: that none of them was imported anyway (the deployment scripts need onnxruntime, numpy, Pillow)
_TORCHLESS = (
    "import runpy, sys\n"
    "for m in ('torch', 'torchvision', 'timm', 'jas_prune', 'onnx', 'onnxscript'):\n"
    "    sys.modules[m] = None\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(script, run_name='__main__')\n"
    "finally:\n"
    "    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'jas_prune')\n"
    "                    and sys.modules[m] is not None)\n"
    "    assert not leaked, leaked\n"
)


def run_torchless(script: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``export/<script>`` in a fresh interpreter that cannot import Torch (nor jas_prune)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", _TORCHLESS, str(REPO / "export" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO.parent)


# -- comparing two run directories by their results (the resume and torchrun tests) ------------------

#: metrics that measure time or the history of the run, not its results
NOT_RESULTS = {"seconds", "images_per_second", "images_this_run", "chunks_resumed", "world_size",
               "seconds_per_rank"}


def results(run: Path) -> dict:
    """Paths, masks and metrics of a run directory, timings and run history left out."""
    from safetensors.torch import load_file

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in NOT_RESULTS and not k.endswith("_seconds")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    out = {"metrics": strip(json.loads((run / "metrics.json").read_text()))}
    for f in sorted((run / "paths").rglob("chunk-*.safetensors")) + [run / "masks.safetensors"]:
        out[str(f.relative_to(run))] = {k: v.tolist() for k, v in load_file(f).items()}
    return out


def assert_same_results(a: Path, b: Path) -> None:
    """Same files and identical content, naming the first part that differs."""
    ra, rb = results(a), results(b)
    assert sorted(ra) == sorted(rb)
    for key in ra:
        assert ra[key] == rb[key], f"{key} differs between {a.name} and {b.name}"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where CUDA is usable (``benchmarks/gpu_check.sh`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def laughs(use: str) -> str:
    """A "billion laughs" recipe: nine levels of nine aliases each (9**9 strings once expanded)."""
    lines = ["version: 1", 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines + [use]) + "\n"
