"""The recipe's export stage and ``jas-prune export onnx`` in one call each: export, verify and
time a model into its ``metrics.json`` ``export`` record (:func:`export_and_verify`), and time
every exported model of a run together (:func:`benchmark_exports`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ExportVerificationError, StorageError
from ..io import storage_errors
from .latency import benchmark_many, benchmark_onnx, benchmark_torch
from .onnx_export import DEFAULT_OPSET, export_onnx
from .runtime import CUDA_PROVIDERS, cuda_usable, resolve_providers
from .sidecar import sidecar_path
from .verify import verify_onnx

log = logging.getLogger("jas_prune.export")

__all__ = ["export_and_verify", "benchmark_exports"]


def export_and_verify(
    model: nn.Module,
    path: str | os.PathLike[str],
    batch: torch.Tensor,
    *,
    label: str,
    checkpoint: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    sidecar: Mapping[str, Any] | None = None,
    verify: bool = True,
    benchmark: bool = True,
    providers: Sequence[str] = ("cuda", "cpu"),
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 5,
    iters: int = 20,
    threads: int | None = None,
    torch_latency: bool = True,
    onnx_latency: bool = True,
    fp16: bool = False,
) -> dict[str, Any]:
    """Export, verify and time one model; returns its ``metrics.json`` ``export`` record
    (:class:`jas_prune.metrics.ExportRecord`).

    The record has the SPEC keys ``model`` (= ``label``), ``checkpoint``, ``path``,
    ``parity_max_abs``, ``top1_agreement``, ``latency_ms_p50``, ``latency_ms_p90`` (at the first
    of ``batch_sizes``), ``provider`` (the one that ran the timing, else the verification), plus
    ``exporter``, ``fallback_reason``, ``opset``, ``sidecar``, ``verified``, ``latency`` (ONNX
    records for every batch size), ``torch_latency`` and, with ``fp16=True`` and usable CUDA,
    ``fp16`` (its own export/parity/latency).

    Args:
        benchmark: time the model (ONNX Runtime, and PyTorch with ``torch_latency``).
        onnx_latency: with ``benchmark``, time the ONNX file here, on its own. A pipeline that
            compares several models passes False and times them all together afterwards with
            :func:`benchmark_exports` (interleaved, with a spread).

    Raises:
        ExportVerificationError: float32 parity beyond ``FP32_TOLERANCE`` or non-finite logits;
            the error's ``record`` is this record so far, and nothing is left at ``path`` (the
            file is exported and verified in a staging folder and moved into place only when it
            passes). A failing float16 parity is only recorded.
    """
    path = Path(path)
    # exported and verified under a staging folder beside ``path``: a file that fails verification
    # (e.g. non-finite logits) never appears at ``path`` with a matching sidecar
    stage = path.parent / f".{path.stem}.verify-{os.getpid()}"
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    staged = stage / path.name
    try:
        info = export_onnx(model, staged, opset=opset,
                           sidecar={**(sidecar or {}), "checkpoint": str(checkpoint) if checkpoint else None})
        record: dict[str, Any] = {
            "model": label,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "path": str(path),
            "parity_max_abs": None,
            "top1_agreement": None,
            "latency_ms_p50": None,
            "latency_ms_p90": None,
            "latency_batch_size": int(batch_sizes[0]) if batch_sizes else None,
            "provider": None,
            "exporter": info["exporter"],
            "fallback_reason": info["fallback_reason"],
            "opset": opset,
            "sidecar": str(sidecar_path(path)),
            "export_seconds": round(info["seconds"], 3),
            "verified": None,
            "latency": [],
            "torch_latency": [],
        }
        if verify:
            log.info("export %s: verifying against PyTorch on %d images", path.name, len(batch))
            try:
                v = verify_onnx(staged, model, batch)
            except ExportVerificationError as err:
                v = err.record
                record.update(parity_max_abs=v.get("parity_max_abs"), top1_agreement=v.get("top1_agreement"),
                              provider=v.get("provider"), verified=False, error=str(err))
                raise ExportVerificationError(str(err), record=record) from err
            record.update(parity_max_abs=v["parity_max_abs"], top1_agreement=v["top1_agreement"],
                          provider=v["provider"], verified=True, parity_tolerance=v["tolerance"])
        with storage_errors(path):  # never an old sidecar beside the new file: drop it first, move it last
            sidecar_path(path).unlink(missing_ok=True)
            os.replace(staged, path)
            os.replace(sidecar_path(staged), sidecar_path(path))
        log.info("export %s: written to %s%s", path.name, path, " (verified)" if verify else "")
    except StorageError as err:  # name the files the user asked for, not their staging copies
        raise StorageError(str(err).replace(str(stage), str(path.parent))) from err.__cause__
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if benchmark and batch_sizes:
        n_threads = int(threads) if threads is not None else torch.get_num_threads()
        run_on = resolve_providers(providers)[0]
        if onnx_latency:
            lat = benchmark_onnx(path, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                                 providers=providers, threads=n_threads)
            record["latency"] = lat
            record.update(latency_ms_p50=lat[0]["latency_ms_p50"], latency_ms_p90=lat[0]["latency_ms_p90"],
                          provider=lat[0]["provider"])
            run_on = lat[0]["provider"]
        if torch_latency:
            dev = "cuda" if run_on in CUDA_PROVIDERS else "cpu"
            record["torch_latency"] = benchmark_torch(model, batch_sizes=batch_sizes, warmup=warmup,
                                                      iters=iters, device=dev, threads=n_threads)
    if fp16 and cuda_usable() and "CUDAExecutionProvider" in resolve_providers(("cuda",)):
        p16 = Path(path).with_name(Path(path).stem + ".fp16.onnx")
        info16 = export_onnx(model, p16, opset=opset, dtype="float16",
                             sidecar={**(sidecar or {}), "checkpoint": record["checkpoint"]})
        fp16_rec: dict[str, Any] = {"path": info16["path"], "exporter": info16["exporter"]}
        try:
            v16 = verify_onnx(p16, model, batch, providers=("cuda",))
            fp16_rec.update(verified=True)
        except ExportVerificationError as err:
            v16 = err.record
            fp16_rec.update(verified=False, error=str(err))
        fp16_rec.update(parity_max_abs=v16.get("parity_max_abs"), top1_agreement=v16.get("top1_agreement"),
                        parity_tolerance=v16.get("tolerance"), provider=v16.get("provider"))
        if benchmark and batch_sizes and onnx_latency:
            fp16_rec["latency"] = benchmark_onnx(p16, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                                                 providers=("cuda",), threads=threads)
        record["fp16"] = fp16_rec
    return record


def benchmark_exports(
    records: Sequence[dict[str, Any]],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    providers: Sequence[str] = ("cuda", "cpu"),
    threads: int | None = None,
    max_seconds: float | None = 120.0,
    reference: str | None = None,
    **timing: Any,
) -> Sequence[dict[str, Any]]:
    """Time every successfully exported model of ``records`` together, interleaved
    (:func:`~jas_prune.deploy.latency.benchmark_many`), and write the timings into the records
    as :func:`export_and_verify` would (``latency``, ``latency_ms_p50``/``p90`` at the first batch
    size, ``provider``), each with its speed-up over the dense model (the record without a
    checkpoint) and that speed-up's spread. Float16 exports (``fp16.path``) are timed the same
    way among themselves, on CUDA. The tested copies in other precisions (``precisions[j]``) are
    timed in the same interleaved rounds, labelled ``MODEL@PRECISION``, their speed-ups over the
    dense float32 model.

    Args:
        max_seconds: time budget per batch size (at least a few rounds run; see ``benchmark_many``).
        reference: the label speed-ups are over (default: the dense model, the record without a
            checkpoint).
        timing: ``warmup``, ``repeats``, ``iters``, ``seed``, ``confidence``, ``min_rounds`` of
            ``benchmark_many``.

    Returns:
        ``records`` (changed in place).
    """
    ok = [r for r in records if not r.get("error") and r.get("path")]
    if not ok or not batch_sizes:
        return records
    dense = reference or next((r["model"] for r in ok if r.get("checkpoint") is None), None)
    # the other precisions are timed in the same rounds as the float32 files: their speed-ups are
    # over the dense float32 model, measured moments apart
    paths = {r["model"]: r["path"] for r in ok}
    copies = {f"{r['model']}@{p['precision']}": p for r in ok for p in r.get("precisions") or []
              if not p.get("error") and p.get("tested") and p.get("path")}
    paths.update({label: p["path"] for label, p in copies.items()})
    log.info("timing %d ONNX file(s) interleaved at batch size(s) %s%s", len(paths),
             ", ".join(map(str, batch_sizes)), f" (about {max_seconds:.0f} s each)" if max_seconds else "")
    timed = benchmark_many(paths, reference=dense, batch_sizes=batch_sizes,
                           providers=providers, threads=threads, max_seconds=max_seconds, **timing)
    for r in ok:
        lat = timed[r["model"]]
        r["latency"] = lat
        r.update(latency_ms_p50=lat[0]["latency_ms_p50"], latency_ms_p90=lat[0]["latency_ms_p90"],
                 latency_batch_size=lat[0]["batch_size"], provider=lat[0]["provider"])
    for label, p in copies.items():
        p["latency"] = timed[label]
    half = [r for r in ok if (r.get("fp16") or {}).get("path") and not r["fp16"].get("error")]
    if half:
        ref16 = dense if any(r["model"] == dense for r in half) else None
        timed16 = benchmark_many({r["model"]: r["fp16"]["path"] for r in half}, reference=ref16,
                                 batch_sizes=batch_sizes, providers=("cuda",), threads=threads,
                                 max_seconds=max_seconds, **timing)
        for r in half:
            r["fp16"]["latency"] = timed16[r["model"]]
    return records
