"""benchmarks/gpu_check.sh rehearses every step on the CPU (``--device cpu --dry-run``)."""

from __future__ import annotations

import json
import os
import sys
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu",
                           "--dry-run"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["builtin"]["identical_picks"] == 1.0  # the same device twice: bit for bit
    precisions = result["vit_b"]["precisions"]
    assert set(precisions) == {"fp32", "tf32", "bf16-autocast", "bf16-weights"}
    assert precisions["fp32"]["picks_agree_with_fp32"] == 1.0
    assert all(r["images_per_second"] > 0 for r in precisions.values())
    assert "## Exact JAS on" in (out / "gpu_check.md").read_text()
    assert (out / "quickstart" / "metrics.json").is_file()
    assert "passed" in (out / "pytest-cuda.log").read_text() or "deselected" in (out / "pytest-cuda.log").read_text()
