"""Compare two run directories by their results: paths chunks, masks and metrics, leaving out
what measures time or the history of the run (shared by the resume and torchrun tests)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

__all__ = ["NOT_RESULTS", "results", "assert_same_results"]

#: metrics that measure time or the history of the run, not its results
NOT_RESULTS = {"seconds", "images_per_second", "images_this_run", "chunks_resumed", "world_size",
               "seconds_per_rank"}


def results(run: Path) -> dict:
    """Paths, masks and metrics of a run directory, timings and run history left out."""

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
