"""Every precision of one exported model, checked on the test partition through ONNX Runtime.

:func:`export_precisions` turns a verified float32 file into its ``int8_dynamic``,
``int8_static`` and ``fp16`` copies (:mod:`.quantize`) and gives each the figures users choose
by: test-partition top-1 through ONNX Runtime, top-1 agreement and max |Δlogit| with the float32
file on the same images, file size. A copy whose logits are not finite is an error record, and
its files are removed. Every copy is written under a temporary name and moved into place with
its sidecar only when it is complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..io import storage_errors
from .quantize import (CalibrationSettings, choose_static, onnx_logits, precision_path, quantize_dynamic_file, timed,
                       write_variant_sidecar)
from .sidecar import sidecar_path

__all__ = ["test_figures", "export_precisions", "variant_settings"]

log = logging.getLogger("jas_prune.export")


def test_figures(logits: np.ndarray, labels: np.ndarray | None, ref: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 on ``labels`` and, against reference logits ``ref``, top-1 agreement and max |Δlogit|."""
    out: dict[str, Any] = {"test_images": int(len(logits))}
    if labels is not None and len(labels):
        out["test_top1"] = float((logits.argmax(1) == labels).mean())
    if ref is not None:
        out["top1_agreement"] = float((logits.argmax(1) == ref.argmax(1)).mean())
        out["parity_max_abs"] = float(np.abs(logits - ref).max())
    return out


def variant_settings(precision: str, calibration: CalibrationSettings) -> dict[str, Any]:
    """What a copy depends on besides its float32 file (``--resume`` keeps it when unchanged)."""
    if precision == "int8_static":
        return {"precision": precision, "calibration": calibration.model_dump()}
    return {"precision": precision}


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def _make(precision: str, model: nn.Module, fp32_path: Path, tmp: Path, *, calib: np.ndarray | None,
          probe: np.ndarray | None, probe_labels: np.ndarray | None, settings: CalibrationSettings,
          opset: int, sidecar: Mapping[str, Any], threads: int | None) -> dict[str, Any]:
    """Write the ``precision`` copy of ``fp32_path`` at ``tmp``; its sidecar extras."""
    if precision == "int8_dynamic":
        return quantize_dynamic_file(fp32_path, tmp)
    if precision == "int8_static":
        if calib is None or not len(calib) or probe is None or probe_labels is None:
            raise ValueError("int8_static needs calibration and probe images")
        info = choose_static(fp32_path, tmp, calib, probe, probe_labels, settings, threads=threads,
                             label=precision_path(fp32_path, precision).name)
        info["calibration"] = {"method": settings.method, "images": int(len(calib)),
                               "images_per_class": settings.images_per_class, "partition": "probe"}
        return info
    if precision == "fp16":
        from .onnx_export import export_onnx

        export_onnx(model, tmp, opset=opset, dtype="float16", sidecar=sidecar)
        return {"float_ops": [], "calibration": None}
    raise ValueError(f"unknown precision {precision!r}")


def export_precisions(
    model: nn.Module,
    fp32_path: str | os.PathLike[str],
    precisions: Sequence[str],
    *,
    test_images: np.ndarray,
    test_labels: np.ndarray | None,
    fp32_logits: np.ndarray,
    calib: np.ndarray | None = None,
    probe: np.ndarray | None = None,
    probe_labels: np.ndarray | None = None,
    settings: CalibrationSettings = CalibrationSettings(),
    opset: int = 18,
    sidecar: Mapping[str, Any] | None = None,
    keep: Callable[[str], dict[str, Any] | None] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """The lower-precision copies of one verified float32 file, each with its test figures.

    Args:
        fp32_path: the float32 file (its sidecar is the copies' template).
        precisions: names of :data:`~jas_prune.deploy.quantize.PRECISIONS`; ``fp32`` is skipped.
        test_images, test_labels: the test partition, preprocessed (labels None: agreement only).
        fp32_logits: the float32 file's ONNX Runtime logits of ``test_images``.
        calib: calibration images (``int8_static``); probe, probe_labels: the probe partition
            the float groups are chosen on.
        keep: precision -> an earlier record to keep as it is (``--resume``), or None.

    Returns:
        One :class:`jas_prune.metrics.PrecisionRecord` mapping per precision, in order:
        ``precision``, ``path``, ``sidecar``, ``size_bytes``, ``seconds``, ``tested``,
        ``test_top1``, ``top1_agreement``, ``parity_max_abs``, ``test_images``, ``calibration``,
        ``float_ops``, the static ladder's ``selection`` and probe top-1s, ``settings``, and
        ``error`` or ``note`` when something did not work. Figures on a copy ONNX Runtime's CPU
        provider cannot run (float16 without CPU kernels) are missing and ``tested`` is False.
    """
    fp32_path = Path(fp32_path)
    out: list[dict[str, Any]] = []
    for precision in precisions:
        if precision == "fp32":
            continue
        path = precision_path(fp32_path, precision)
        old = keep(precision) if keep is not None else None
        if old is not None:
            log.info("export %s: kept (its file and sidecar match metrics.json)", path.name)
            out.append(old)
            continue
        rec: dict[str, Any] = {"precision": precision, "path": str(path), "sidecar": str(sidecar_path(path)),
                               "settings": variant_settings(precision, settings), "tested": False}
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
        try:
            extra, seconds = timed(lambda: _make(precision, model, fp32_path, tmp, calib=calib, probe=probe,
                                                 probe_labels=probe_labels, settings=settings, opset=opset,
                                                 sidecar=sidecar or {}, threads=threads))
            rec["seconds"] = round(seconds, 3)
            rec.update({k: v for k, v in extra.items() if k in ("calibration", "float_ops", "float_nodes",
                                                                 "selection", "probe_top1", "probe_top1_fp32",
                                                                 "probe_images")})
            try:
                logits = onnx_logits(tmp, test_images, threads=threads)
            except Exception as exc:  # noqa: BLE001 - no CPU kernel for an operator (float16)
                if precision != "fp16":
                    raise
                rec["note"] = ("exported but untested: ONNX Runtime's CPU provider cannot run it "
                               f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
                logits = None
            if logits is not None:
                if not np.isfinite(logits).all():
                    raise ValueError("its ONNX Runtime logits are not finite")
                rec.update(test_figures(logits, test_labels, fp32_logits), tested=True)
            with storage_errors(path):
                _remove(path)
                os.replace(tmp, path)
            rec["size_bytes"] = path.stat().st_size
            write_variant_sidecar(fp32_path, path, precision,
                                  {"calibration": rec.get("calibration"), "float_ops": rec.get("float_ops"),
                                   "tested": rec["tested"]})
            log.info("export %s: %s, test top-1 %s, agreement with fp32 %s, %.1f MB", path.name, precision,
                     _pct(rec.get("test_top1")), _pct(rec.get("top1_agreement")), rec["size_bytes"] / 1e6)
        except (ValueError, RuntimeError, OSError) as exc:
            from ..errors import StorageError

            if isinstance(exc, StorageError):
                raise
            rec["error"] = f"{precision}: {' '.join(str(exc).split())[:300]}"
            log.warning("export %s: %s failed: %s", fp32_path.name, precision, rec["error"])
            _remove(path)
        finally:
            tmp.unlink(missing_ok=True)
            sidecar_path(tmp).unlink(missing_ok=True)
        out.append(rec)
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"
