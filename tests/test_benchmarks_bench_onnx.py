"""The ONNX speed-up vs MACs benchmark end to end on the tiny model (seconds)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_onnx import main, round_to_supported
from jas_prune.errors import InvalidArgumentError

# the tiny model: 32 px, patch 8 -> 16 patches + class token; width 32; FFN 64 neurons; 2 blocks
TOKENS, DIM, FFN, DEPTH = 17, 32, 64, 2


def test_bench_onnx_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--out", str(out), "--model", "tiny", "--ratios", "0.5", "--round-to", "8",
                 "--round-ratios", "0.3", "--batch-sizes", "1", "2", "--repeats", "3", "--iters", "1",
                 "--warmup", "0", "--threads", "1"]) == 0
    result = json.loads((out / "onnx.json").read_text())
    assert set(result) == {"settings", "machine", "round_to", "models", "rows", "target", "timings"}
    assert result["round_to"]["supported"] == round_to_supported()
    labels = [m["label"] for m in result["models"]]
    assert labels == ["dense", "p0.5"] + (["p0.3-r8"] if round_to_supported() else [])
    models = {m["label"]: m for m in result["models"]}
    dense = models["dense"]
    assert dense["width"] == str(FFN) and dense["macs_ratio"] == 1.0
    assert set(models["p0.5"]["widths"].values()) == {FFN // 2}
    if round_to_supported():  # 64 - round(0.3 * 64) = 45 kept -> the nearest multiple of 8
        assert set(models["p0.3-r8"]["widths"].values()) == {48}
    for m in result["models"]:
        # the repo's MAC count (Torch-Pruning's): a removed neuron saves its fc1 row (T·D, + 1
        # for the bias), its GELU (T) and its fc2 column (T·D)
        removed = sum(FFN - w for w in m["widths"].values())
        assert dense["macs"] - m["macs"] == removed * (TOKENS * (2 * DIM + 1) + 1)
        assert m["macs_ratio"] == pytest.approx(dense["macs"] / m["macs"])
        assert m["parity_max_abs"] < 1e-4 and m["top1_agreement"] == 1.0
        assert (out / "onnx" / f"{m['label']}.onnx").is_file()
    rows = result["rows"]
    assert sorted((r["label"], r["batch_size"]) for r in rows) == sorted((k, b) for k in labels for b in (1, 2))
    for r in rows:
        assert r["repeats"] == 3 and r["iters"] == 1
        if r["label"] == "dense":
            assert r["speedup"] == 1.0
            continue
        assert r["speedup_low"] <= r["speedup"] <= r["speedup_high"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["macs_ratio"])
        assert result["timings"][r["label"]][[1, 2].index(r["batch_size"])]["speedup"]["median"] == r["speedup"]
    assert set(result["target"]["met"]) == set(labels[1:]) and result["target"]["batch_size"] == 2
    assert all(t["interleaved"] for recs in result["timings"].values() for t in recs)
    printed = capsys.readouterr().out
    assert "| model | FFN width | MACs ratio | speed-up b=1 |" in printed
    assert "| p0.5 | 32 |" in printed


def test_bench_onnx_refuses_mismatched_repeats(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"--repeats: give one value or one per batch size \(2\), not 3"):
        main(["--out", str(tmp_path), "--model", "tiny", "--batch-sizes", "1", "2", "--repeats", "1", "2", "3"])
