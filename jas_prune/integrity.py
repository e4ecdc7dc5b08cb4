"""Tamper evidence and leftovers of a run directory.

Every pruned checkpoint, ONNX file and sidecar is listed in ``metrics.json`` with its size and
SHA-256 when it is written (``io.file_record``). Here:

- :func:`recorded_files` lists those records;
- :func:`check_recorded_files` tells which files changed, or went missing, since;
- :func:`refuse_changed_files` is ``--resume``'s check, before anything is written: a changed file
  is never reused (nor silently overwritten): the run is refused, naming it; a missing one is
  recomputed by its stage;
- :func:`remove_stale_temporaries` deletes what a killed run left half-written (only ever under
  the run directory's lock, so no other writer can own those files).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from .errors import TamperedFileError
from .io import check_file_record
from .metrics import Metrics
from .rundir import RunDir

__all__ = ["RecordedFile", "FileProblem", "recorded_files", "check_recorded_files", "refuse_changed_files",
           "remove_stale_temporaries"]

log = logging.getLogger("jas_prune")

#: Temporary names of the run's writers: ``io.atomic_write`` (``.NAME.XXXX.tmp``) and the ONNX
#: exporter (``.STEM.tmp-PID.onnx``). Both start with a dot, so no result file has such a name.
_TEMPORARY = re.compile(r"^\..+(\.tmp|\.tmp-\d+\.onnx)$")


@dataclass(frozen=True)
class RecordedFile:
    """One file record of ``metrics.json`` and what it is (``pruned[2] checkpoint``)."""

    what: str
    record: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.record.get("file"))


@dataclass(frozen=True)
class FileProblem:
    """A recorded file that is missing or changed; ``message`` names it (one line)."""

    file: RecordedFile
    missing: bool
    message: str


def recorded_files(metrics: Metrics) -> list[RecordedFile]:
    """Every file record of ``metrics``: pruned checkpoints, ONNX files and their sidecars."""
    out: list[RecordedFile] = []
    for i, e in enumerate(metrics.pruned or []):
        if e.checkpoint_file:
            out.append(RecordedFile(f"pruned[{i}] checkpoint", e.checkpoint_file))
    for i, r in enumerate(metrics.export or []):
        for what, rec in _export_files(r):
            out.append(RecordedFile(f"export[{i}] {what}", rec))
    return out


def _export_files(r: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if r.onnx_file:
        yield "onnx", r.onnx_file
    if r.sidecar_file:
        yield "sidecar", r.sidecar_file
    if r.fp16 is not None:
        if r.fp16.onnx_file:
            yield "fp16 onnx", r.fp16.onnx_file
        if r.fp16.sidecar_file:
            yield "fp16 sidecar", r.fp16.sidecar_file


def check_recorded_files(run: RunDir, metrics: Metrics) -> list[FileProblem]:
    """The recorded files that are missing or differ from their record (size, then SHA-256).

    Raises:
        MetricsSchemaError: a record that is not a file record.
    """
    problems = []
    for f in recorded_files(metrics):
        try:
            check_file_record(run.root, f.record)
        except TamperedFileError as exc:
            rel = PurePosixPath(f.name)
            missing = not Path(run.root, *rel.parts).is_file()
            problems.append(FileProblem(f, missing, str(exc)))
    return problems


def refuse_changed_files(run: RunDir, metrics: Metrics) -> list[FileProblem]:
    """``--resume``'s check: refuse a recorded file that changed; return the missing ones (their
    stages recompute them), each logged.

    Raises:
        TamperedFileError: the first changed file, naming it and what to do.
    """
    problems = check_recorded_files(run, metrics)
    changed = next((p for p in problems if not p.missing), None)
    if changed is not None:
        raise TamperedFileError(f"--resume {run.root}: {changed.message}; it is not reused: restore it, or "
                                "delete it to have --resume recompute it")
    missing = [p for p in problems if p.missing]
    for p in missing:
        log.info("resume: %s is missing (recorded in metrics.json as %s): recomputed", run.file(p.file.name),
                 p.file.what)
    return missing


def remove_stale_temporaries(run: RunDir) -> list[Path]:
    """Delete the temporary files a killed run left in the run directory and ``figures/``.

    Call only while holding the run directory's lock (no other process writes there then).
    ``paths/`` is cleaned by the locate stage itself.
    """
    removed = []
    for folder in (run.root, run.figures):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = Path(folder, name)
            if _TEMPORARY.match(name) and name != RunDir.LOCK and path.is_file():
                try:
                    path.unlink()
                except OSError:
                    continue
                removed.append(path)
    if removed:
        log.info("resume: removed %d unfinished write(s) of an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed
