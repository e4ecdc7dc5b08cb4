"""Export: ONNX of the dense model and every pruned checkpoint, verified against PyTorch on a
real test batch and timed in ONNX Runtime.

Each export record lists the ONNX file and its sidecar with their size and SHA-256 and what the
file was exported from (the checkpoint's SHA-256, or the dense weights' digest). On ``--resume`` a
model whose files still match those records, exported from the same checkpoint with the same
settings and verified when verification is asked for, is kept instead of exported again; the
interleaved timing (``export.onnx.benchmark``) is always redone over every model, since speed-ups
are only comparable when measured together.
"""

from __future__ import annotations

import logging
from typing import Any

from ...classes import output_class_names
from ...errors import ExportVerificationError, TamperedFileError
from ...io import check_file_record, file_record, sha256_file
from ...metrics import ExportRecord
from .base import STAGES, Stage

log = logging.getLogger("jas_prune")


def _source_sha256(ctx, entry) -> str:
    """What a model is exported from: the checkpoint file's SHA-256 (as recorded when it was
    written, else read now), or the dense weights' digest."""
    if entry is None:
        return ctx.digest
    recorded = entry.checkpoint_file or {}
    if recorded.get("file") == entry.checkpoint and recorded.get("sha256"):
        return recorded["sha256"]
    return sha256_file(ctx.run.file(entry.checkpoint))


def _keep(ctx, old: ExportRecord | None, source: str) -> str | None:
    """Why ``old`` cannot be kept on ``--resume`` (None: keep it)."""
    o = ctx.recipe.export.onnx
    if old is None:
        return "not exported yet"
    if not old.ok:
        return "its export failed"
    if old.source_sha256 != source:
        return "exported from another checkpoint" if old.source_sha256 else "exported without checksums"
    if old.opset != o.opset:
        return f"exported with opset {old.opset}"
    if o.verify and not old.verified:
        return "not verified"
    if o.fp16 and old.fp16 is None:
        return "no float16 export"
    records = [old.onnx_file, old.sidecar_file]
    if old.fp16 is not None and o.fp16:
        records += [old.fp16.onnx_file, old.fp16.sidecar_file]
    for rec in records:
        if not rec:
            return "exported without checksums"
        try:
            check_file_record(ctx.run.root, rec)
        except TamperedFileError as exc:
            return str(exc)
    return None


def _record_files(ctx, rec: dict[str, Any], source: str) -> dict[str, Any]:
    """``rec`` with the file records of what was written, and its source."""
    root = ctx.run.root
    if rec.get("path"):
        rec["onnx_file"] = file_record(rec["path"], root)
    if rec.get("sidecar"):
        rec["sidecar_file"] = file_record(rec["sidecar"], root)
    fp16 = rec.get("fp16") or {}
    if fp16.get("path"):
        from ...deploy import sidecar_path

        fp16["onnx_file"] = file_record(fp16["path"], root)
        if sidecar_path(fp16["path"]).is_file():
            fp16["sidecar_file"] = file_record(sidecar_path(fp16["path"]), root)
    rec["source_sha256"] = source
    return rec


def run_export(ctx) -> None:
    from ...checkpoint import load_pruned
    from ...deploy import benchmark_exports, export_and_verify

    o = ctx.recipe.export.onnx
    test_loader, _ = ctx.loader("test", batch_size=32)
    batch = next(iter(test_loader))[0]
    sidecar = {"class_names": output_class_names(ctx.model, ctx.source.class_names)}  # as the checkpoints
    jobs = [("dense", None)] + [(e.stem, e) for e in ctx.metrics.pruned or []]
    before = {r.model: r for r in ctx.metrics.export or []} if ctx.resume else {}
    records, failed, kept = [], [], []
    for label, entry in jobs:
        ckpt = entry.checkpoint if entry is not None else None
        source = _source_sha256(ctx, entry)
        why = _keep(ctx, before.get(label), source) if ctx.resume else "a new run"
        if why is None:
            rec = before[label].to_dict()
            kept.append(label)
            log.info("export %s: kept %s (its file, sidecar and checkpoint match metrics.json)", label,
                     ctx.run.onnx(label).name)
        else:
            if ctx.resume:
                log.info("export %s: exporting (%s)", label, why)
            model = ctx.model if entry is None else load_pruned(ctx.run.file(ckpt))
            model = model.to("cpu").float().eval()
            try:
                rec = export_and_verify(model, ctx.run.onnx(label), batch, label=label, checkpoint=ckpt,
                                        opset=o.opset, sidecar=sidecar, verify=o.verify, benchmark=o.benchmark,
                                        onnx_latency=False, providers=o.providers, fp16=o.fp16,
                                        batch_sizes=o.batch_sizes, torch_latency=o.torch_latency)
            except ExportVerificationError as exc:
                rec = dict(exc.record) or {"model": label, "checkpoint": ckpt}
                rec["error"] = str(exc)
                failed.append(label)
            rec = _record_files(ctx, rec, source)
        records.append(rec)
        ctx.metrics.export = [ExportRecord.from_dict(r) for r in records]
        ctx.save_metrics()
    if o.benchmark:  # every model timed together, interleaved: speed-ups with their spread
        benchmark_exports(records, providers=o.providers, batch_sizes=o.batch_sizes, max_seconds=o.max_seconds)
        ctx.metrics.export = [ExportRecord.from_dict(r) for r in records]
    ctx.model.to(ctx.device)
    if kept:
        log.info("export: %d of %d model(s) kept from the interrupted run", len(kept), len(jobs))
    if failed:
        raise ExportVerificationError(f"export: ONNX parity check failed for {', '.join(failed)} "
                                      "(figures in metrics.json)")


STAGES.add(Stage("export", "ONNX of the dense and every pruned model, parity and ONNX Runtime latency -> *.onnx, "
                 "metrics.export", enabled=lambda r: r.export is not None and r.export.onnx is not None,
                 run=run_export))
