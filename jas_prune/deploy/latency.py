"""Latency of exported models in ONNX Runtime (and of the PyTorch model, for comparison).

Timings on a shared machine drift: other processes come and go, caches and clocks change. Two
models timed one after the other therefore differ by more than their work does. To compare
models, :func:`benchmark_many` times them *interleaved*: every repetition runs each model in
turn (in a rotating order), so a slow spell hits all models alike, and the speed-up over a
reference is taken per repetition, as a ratio of times measured moments apart. Its spread is a
bootstrap interval of the median ratio. :func:`benchmark_onnx` times one file on its own.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..torchutil import frozen_eval
from .onnx_export import export_onnx
from .runtime import create_session
from .sidecar import INPUT_NAME, OUTPUT_NAME, model_input_size, read_sidecar

__all__ = ["onnx_latency", "benchmark_onnx", "benchmark_many", "benchmark_torch", "latency_summary", "bootstrap_median_ci",
           "MIN_ROUNDS"]

#: Rounds :func:`benchmark_many` runs whatever its time budget (a spread needs a few).
MIN_ROUNDS = 5


def latency_summary(times_s: Sequence[float], batch: int, *, quartiles: bool = False) -> dict[str, float]:
    """p50/p90/mean in ms and images per second of a list of timings in seconds (with
    ``quartiles``, also p25/p75)."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50 = float(np.percentile(ms, 50))
    out = {
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_mean": float(ms.mean()),
        "images_per_second": batch * 1e3 / p50 if p50 > 0 else float("inf"),
    }
    if quartiles:
        out["latency_ms_p25"] = float(np.percentile(ms, 25))
        out["latency_ms_p75"] = float(np.percentile(ms, 75))
    return out


def bootstrap_median_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded: the same values give
    the same interval)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def _input_chw(sess, path: str | os.PathLike[str]) -> list[int]:
    side = read_sidecar(path)
    return list(side["input_size"]) if side else [int(d) for d in sess.get_inputs()[0].shape[1:]]


def benchmark_onnx(
    path: str | os.PathLike[str],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """ONNX Runtime latency of one file at each batch size (timed on its own; to compare models,
    use :func:`benchmark_many`).

    Args:
        threads: intra-op threads; ``None`` uses ``torch.get_num_threads()`` so that the ONNX and
            PyTorch figures are taken with the same count.

    Returns:
        One record per batch size: ``runtime`` ("onnxruntime"), ``provider`` (the one that ran),
        ``threads``, ``batch_size``, ``warmup``, ``iters``, ``latency_ms_p50``,
        ``latency_ms_p90``, ``latency_ms_mean``, ``images_per_second``.
    """
    threads = int(threads) if threads is not None else torch.get_num_threads()
    sess = create_session(path, providers=providers, threads=threads)
    provider = sess.get_providers()[0]
    chw = _input_chw(sess, path)
    rng = np.random.default_rng(seed)
    records = []
    for bs in batch_sizes:
        x = rng.standard_normal((int(bs), *chw), dtype=np.float32)
        for _ in range(warmup):
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        times = []
        for _ in range(max(1, iters)):
            t = time.perf_counter()
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
            times.append(time.perf_counter() - t)
        records.append({"runtime": "onnxruntime", "path": str(path), "provider": provider, "threads": threads,
                        "batch_size": int(bs), "warmup": warmup, "iters": max(1, iters),
                        **latency_summary(times, bs)})
    return records


def benchmark_many(
    paths: Mapping[str, str | os.PathLike[str]],
    *,
    reference: str | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 15,
    iters: int = 4,
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    max_seconds: float | None = None,
    min_rounds: int = MIN_ROUNDS,
) -> dict[str, list[dict[str, Any]]]:
    """ONNX Runtime latency of several files, timed interleaved, with the spread of each
    model's speed-up over ``reference``.

    Per batch size: every model is warmed up, then ``repeats`` rounds each run every model
    ``iters`` times in turn (the order rotates by one model per round, so no model always runs
    first). A model's sample of a round is the median of its ``iters`` timings; its speed-up in a
    round is the reference's sample over its own; the reported speed-up is the median over
    rounds with a bootstrap interval at ``confidence``. All models get the same input.

    Args:
        paths: label -> ONNX file, in the order to time them.
        reference: the label speed-ups are relative to (e.g. ``"dense"``); None for no speed-ups.
        threads: intra-op threads (``None``: ``torch.get_num_threads()``).
        max_seconds: per batch size, stop after the round that passes this time (at least
            ``min_rounds`` rounds run, :data:`MIN_ROUNDS` by default), so that large models stay
            affordable; the records' ``repeats`` say how many rounds ran.

    Returns:
        label -> one record per batch size, with :func:`benchmark_onnx`'s keys (``iters`` counts
        every timed run) plus ``latency_ms_p25``, ``latency_ms_p75``, ``repeats``,
        ``interleaved`` (True) and, for every model but the reference, ``speedup``:
        ``{"reference", "median", "low", "high", "confidence", "repeats"}``.

    Raises:
        InvalidArgumentError: an empty ``paths``, a ``reference`` that is not one of its labels, or
            ``repeats``/``iters`` below 1.
    """
    if not paths:
        raise InvalidArgumentError("paths: give at least one ONNX file to time")
    if reference is not None and reference not in paths:
        raise InvalidArgumentError(f"reference: {reference!r} is not one of the timed models ({', '.join(paths)})")
    if repeats < 1 or iters < 1:
        raise InvalidArgumentError(f"repeats and iters must be ≥ 1 (got {repeats}, {iters})")
    threads = int(threads) if threads is not None else torch.get_num_threads()
    labels = list(paths)
    sessions = {k: create_session(paths[k], providers=providers, threads=threads) for k in labels}
    chw = {k: _input_chw(sessions[k], paths[k]) for k in labels}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in labels}
    for bs in batch_sizes:
        rng = np.random.default_rng(seed)
        inputs: dict[tuple, np.ndarray] = {}
        x = {k: inputs.setdefault(tuple(chw[k]), rng.standard_normal((int(bs), *chw[k]), dtype=np.float32))
             for k in labels}
        for _ in range(warmup):
            for k in labels:
                sessions[k].run([OUTPUT_NAME], {INPUT_NAME: x[k]})
        times: dict[str, list[float]] = {k: [] for k in labels}
        rounds: dict[str, list[float]] = {k: [] for k in labels}
        start = time.perf_counter()
        for r in range(repeats):
            if max_seconds is not None and r >= min_rounds and time.perf_counter() - start > max_seconds:
                break
            for k in labels[r % len(labels):] + labels[:r % len(labels)]:
                block = []
                for _ in range(iters):
                    t = time.perf_counter()
                    sessions[k].run([OUTPUT_NAME], {INPUT_NAME: x[k]})
                    block.append(time.perf_counter() - t)
                times[k] += block
                rounds[k].append(float(np.median(block)))
        done = len(rounds[labels[0]])
        for k in labels:
            rec: dict[str, Any] = {
                "runtime": "onnxruntime", "path": str(paths[k]), "provider": sessions[k].get_providers()[0],
                "threads": threads, "batch_size": int(bs), "warmup": warmup, "iters": done * iters,
                **latency_summary(times[k], bs, quartiles=True), "repeats": done, "interleaved": True,
            }
            if reference is not None and k != reference:
                ratios = np.asarray(rounds[reference]) / np.asarray(rounds[k])
                low, high = bootstrap_median_ci(ratios, confidence=confidence, seed=seed)
                rec["speedup"] = {"reference": reference, "median": float(np.median(ratios)), "low": low,
                                  "high": high, "confidence": confidence, "repeats": done}
            out[k].append(rec)
    return out


def benchmark_torch(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """PyTorch eager latency (float32, ``inference_mode``), same records as :func:`benchmark_onnx`.

    The model is moved to ``device`` for the measurement and moved back. ``provider`` is
    ``torch-cpu`` or ``torch-cuda``; ``threads`` (default ``torch.get_num_threads()``) is set
    for the measurement and restored.
    """
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    threads = int(threads) if threads is not None else old_threads
    first = next(model.parameters())
    old_device, old_dtype = first.device, first.dtype
    chw = model_input_size(model)
    gen = torch.Generator().manual_seed(seed)
    records = []
    torch.set_num_threads(threads)
    try:
        model.to(device, torch.float32)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with frozen_eval(model), torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(int(bs), *chw, generator=gen).to(device)
                for _ in range(warmup):
                    model(x)
                sync()
                times = []
                for _ in range(max(1, iters)):
                    t = time.perf_counter()
                    model(x)
                    sync()
                    times.append(time.perf_counter() - t)
                records.append({"runtime": "torch", "path": None, "provider": f"torch-{device.type}",
                                "threads": threads, "batch_size": int(bs), "warmup": warmup,
                                "iters": max(1, iters), **latency_summary(times, bs)})
    finally:
        model.to(old_device, old_dtype)
        torch.set_num_threads(old_threads)
    return records


def onnx_latency(model: nn.Module, batch_size: int, *, threads: int | None = None,
                 providers: Sequence[str] = ("cuda", "cpu"), warmup: int = 5, iters: int = 30) -> dict[str, Any]:
    """ONNX Runtime latency of ``model`` at ``batch_size``: exported to a temporary directory
    (removed afterwards), timed by :func:`benchmark_onnx`; its record. The latency function a
    latency budget (:func:`jas_prune.pruning.find_ratio`) is given."""
    with tempfile.TemporaryDirectory(prefix="jas-prune-budget-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, path)
        return benchmark_onnx(path, batch_sizes=[batch_size], warmup=warmup, iters=iters, providers=providers,
                              threads=threads)[0]
