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

import torch

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


def _keep_precision(ctx, old: ExportRecord | None, fp32_kept: bool):
    """precision -> the earlier record of that copy when ``--resume`` may keep it (its float32 file
    was kept, its settings are unchanged and its files match), else None."""
    from ...deploy.variants import variant_settings

    def keep(precision: str) -> dict[str, Any] | None:
        if not fp32_kept or old is None:
            return None
        rec = next((p for p in old.precisions or [] if p.precision == precision), None)
        if rec is None or not rec.ok or rec.settings != variant_settings(precision, ctx.recipe.export.onnx.calibration):
            return None
        try:
            for f in (rec.onnx_file, rec.sidecar_file):
                if not f:
                    return None
                check_file_record(ctx.run.root, f)
        except TamperedFileError:
            return None
        return rec.to_dict()
    return keep


def _record_files(ctx, rec: dict[str, Any], source: str) -> dict[str, Any]:
    """``rec`` with the file records of what was written, and its source."""
    from pathlib import Path

    root = ctx.run.root
    for r in [rec, *(rec.get("precisions") or [])]:
        if r.get("path") and Path(r["path"]).is_file():
            r["onnx_file"] = file_record(r["path"], root)
        if r.get("sidecar") and Path(r["sidecar"]).is_file():
            r["sidecar_file"] = file_record(r["sidecar"], root)
    fp16 = rec.get("fp16") or {}
    if fp16.get("path"):
        from ...deploy import sidecar_path

        fp16["onnx_file"] = file_record(fp16["path"], root)
        if sidecar_path(fp16["path"]).is_file():
            fp16["sidecar_file"] = file_record(sidecar_path(fp16["path"]), root)
    rec["source_sha256"] = source
    return rec


#: Test images every exported file is scored on through ONNX Runtime, at most (held in memory).
TEST_IMAGES_MAX = 1024


class _Images:
    """The partitions' images as arrays, read once: the test partition (top-1 of every file) and,
    for INT8 static, the probe partition's calibration images and float-group check images."""

    def __init__(self, ctx):
        from ...deploy.quantize import per_class

        o = ctx.recipe.export.onnx
        test = ctx.source.subset("test")
        if len(test) > TEST_IMAGES_MAX:  # held in memory for every file: an even share of every class
            test = per_class(test, max(1, TEST_IMAGES_MAX // max(1, ctx.source.num_classes)))
        x, y = ctx.images(test)
        self.test, self.test_labels = x.numpy(), y.numpy()
        self.calib = self.probe = self.probe_labels = None
        if "int8_static" in o.precision:
            probe = ctx.source.subset("probe")
            if not probe:
                from ...errors import DataError

                raise DataError("export.onnx.precision: int8_static needs calibration images, and the probe "
                                "partition is empty")
            self.calib = ctx.images(per_class(probe, o.calibration.images_per_class))[0].numpy()
            k = max(1, o.calibration.probe_images // max(1, ctx.source.num_classes))
            px, py = ctx.images(per_class(probe, k)[:o.calibration.probe_images])
            self.probe, self.probe_labels = px.numpy(), py.numpy()


def _precisions(ctx, rec: dict[str, Any], model, images: _Images, keep) -> None:
    """The float32 file's test top-1 through ONNX Runtime, then its other precisions, into ``rec``."""
    from ...deploy.quantize import onnx_logits
    from ...deploy.variants import export_precisions, test_figures

    o = ctx.recipe.export.onnx
    ref = onnx_logits(rec["path"], images.test)
    figures = test_figures(ref, images.test_labels)
    rec.update(test_top1=figures.get("test_top1"), test_images=figures["test_images"])
    rec.pop("precisions", None)
    if len(o.precision) > 1:
        rec["precisions"] = export_precisions(
            model, rec["path"], o.precision, test_images=images.test, test_labels=images.test_labels,
            fp32_logits=ref, calib=images.calib, probe=images.probe, probe_labels=images.probe_labels,
            settings=o.calibration, opset=o.opset,
            sidecar={"class_names": output_class_names(ctx.model, ctx.source.class_names)}, keep=keep)


def _needs_precisions(o, old: ExportRecord) -> bool:
    """A kept float32 export whose test top-1 or whose copies in other precisions are missing or
    out of date (their own files are checked by :func:`_keep_precision`)."""
    return old.test_top1 is None or len(o.precision) > 1 or bool(old.precisions)


def run_export(ctx) -> None:
    from ...checkpoint import load_pruned
    from ...deploy import benchmark_exports, export_and_verify

    o = ctx.recipe.export.onnx
    images = _Images(ctx)
    batch = torch.from_numpy(images.test[:32])
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
            if _needs_precisions(o, before[label]):
                model = ctx.model if entry is None else load_pruned(ctx.run.file(ckpt))
                _precisions(ctx, rec, model.to("cpu").float().eval(), images,
                            _keep_precision(ctx, before[label], True))
                rec = _record_files(ctx, rec, source)
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
                _precisions(ctx, rec, model, images, _keep_precision(ctx, before.get(label), False))
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


@STAGES.register
def _export_stage() -> Stage:
    return Stage("export", "ONNX of the dense and every pruned model, parity and ONNX Runtime latency -> *.onnx, "
                 "metrics.export", enabled=lambda r: r.export is not None and r.export.onnx is not None,
                 run=run_export, order=80)
