"""CUDA paths (marked ``cuda``: skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import json

import pytest
import torch

import jas_prune
from jas_prune.cli import main

pytestmark = pytest.mark.cuda


def _probe(n: int = 8):
    from jas_prune.data import build_source, make_loader, model_transform

    model = jas_prune.load_model("builtin:shapes-vit")
    source = build_source("shapes", seed=0, images_per_class=4)
    loader = make_loader(source.subset("probe")[:n], model_transform(model), batch_size=n)
    x, y, _ = next(iter(loader))
    return model, x, y


def test_locate_on_cuda_picks_what_the_cpu_picks():
    model, x, y = _probe()
    cpu = jas_prune.locate(model, x, y, steps=8)
    gpu = jas_prune.locate(model.cuda(), x, y, steps=8)
    assert gpu.paths.device.type == "cpu"  # results come back on the CPU
    assert (cpu.paths == gpu.paths).float().mean() >= 0.95
    assert torch.allclose(cpu.jas, gpu.jas, rtol=1e-3, atol=1e-6)


def test_bfloat16_locate_accumulates_in_float32():
    model, x, y = _probe()
    ref = jas_prune.locate(model.cuda(), x, y, steps=8, scope="all", formula="ig")
    res = jas_prune.locate(model.to(torch.bfloat16), x, y, steps=8, scope="all", formula="ig")
    assert res.jas.dtype == torch.float32 and all(s.dtype == torch.float32 for s in res.scores)
    assert torch.isfinite(res.jas).all()
    assert (res.paths == ref.paths).float().mean() >= 0.5


def test_recipe_runs_on_cuda_and_exports_with_a_provider_that_ran(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""version: 1
data: {images_per_class: 2}
attribution: {steps: 2, scope: all, formula: ig}
masks: {topk: 2}
prune: {methods: [jas, magnitude], ratios: [0.5]}
export: {onnx: {providers: [cuda, cpu]}}
runtime: {device: cuda}
""")
    out = tmp_path / "run"
    assert main(["recipe", "run", str(recipe), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["locate"]["device"].startswith("cuda")
    assert m["run"]["device"].startswith("cuda")
    assert all(r["parity_max_abs"] <= 1e-4 for r in m["export"])
    assert all(r["provider"] in ("CUDAExecutionProvider", "CPUExecutionProvider") for r in m["export"])
