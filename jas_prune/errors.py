"""Every user error of jas-prune, in one hierarchy.

Every class here subclasses :class:`JasPruneError`: the CLI catches it once, at its edge, and
turns it into exit code 2 (or the error's own ``exit_code``) and one line on stderr. Errors are
raised where they are detected; nothing translates one type into another by reading messages.
Classes that describe a bad argument also subclass ``ValueError``, so Python callers that catch
``ValueError`` (as they would for any library) keep working. Anything that escapes and is not a
:class:`JasPruneError` is an internal failure (exit code 1, traceback in the run log).
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = [
    "one_line",
    "JasPruneError",
    "InvalidArgumentError",
    "RecipeError",
    "AttributionSettingError",
    "DataError",
    "ClassSelectionError",
    "UnsupportedModelError",
    "CheckpointError",
    "PretrainedUnavailableError",
    "StageNotAvailableError",
    "FingerprintMismatchError",
    "OutputDirError",
    "StorageError",
    "RunDirLockedError",
    "TamperedFileError",
    "NonFiniteOutputError",
    "PruneSettingError",
    "BudgetError",
    "ExportVerificationError",
    "MetricsSchemaError",
    "PeerFailedError",
    "Interrupted",
]


class JasPruneError(Exception):
    """Base class of every user error (exit code 2).

    Raised inside a ``DataLoader`` worker, the error comes back to the main process rebuilt from
    PyTorch's "Caught ... in DataLoader worker process" text, traceback included; the original
    one-line message is recovered here so the CLI can still print one line.
    """

    exit_code = 2

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _worker_message(text: str, cls: type) -> str:
    """The original message of an error re-raised from a ``DataLoader`` worker (else ``text``)."""
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` on a single line (its lines joined by spaces)."""
    text = str(exc).strip()
    if "\n" not in text and "\r" not in text:
        return text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class InvalidArgumentError(JasPruneError, ValueError):
    """A bad argument to the Python API (scores, masks, ratios, ...); the message names it."""


class RecipeError(JasPruneError, ValueError):
    """Malformed recipe, unknown key, wrong type or out-of-range value (names the YAML path)."""


class AttributionSettingError(RecipeError):
    """An invalid ``attribution.*`` setting, from a recipe or from :func:`jas_prune.locate`."""


class DataError(JasPruneError):
    """Missing or empty data root, class folder without images, unknown class names."""


class ClassSelectionError(DataError, ValueError):
    """A class list naming a class the data set or head does not have (names the entry)."""


class UnsupportedModelError(JasPruneError):
    """A model that is not a supported ViT (names what was found)."""


class CheckpointError(JasPruneError):
    """Missing, corrupt or mismatching checkpoint file."""


class PretrainedUnavailableError(JasPruneError):
    """``pretrained=True`` but the weights are not in the local cache (no downloads here)."""


class StageNotAvailableError(JasPruneError):
    """The recipe enables a stage or option this version or machine cannot run."""


class FingerprintMismatchError(JasPruneError):
    """Resuming, or applying masks/scores, against a different model, data or settings."""


class OutputDirError(JasPruneError):
    """The output directory cannot be created or written."""


class StorageError(OutputDirError):
    """The operating system refused a write (no space, quota, read-only, permission denied).

    The message names the file, the reason and how to continue (free space, ``--resume``).
    """


class RunDirLockedError(OutputDirError):
    """Another process holds the run directory (names the directory and the process)."""


class TamperedFileError(JasPruneError):
    """A file recorded with its checksum changed since it was written (names the file)."""


class NonFiniteOutputError(JasPruneError):
    """The model produced NaN/Inf logits or scores (names the image)."""


class PruneSettingError(JasPruneError, ValueError):
    """Pruning settings this model or budget cannot meet (names the setting)."""


class BudgetError(PruneSettingError):
    """The neurons that must stay (protected masks, ``min_keep``) exceed what the ratio keeps.

    Attributes:
        protected: whether protected neurons (class TopK masks) take part in the excess.
    """

    def __init__(self, message: str, *, protected: bool = False) -> None:
        super().__init__(message)
        self.protected = protected


class ExportVerificationError(JasPruneError):
    """An exported ONNX model disagrees with PyTorch beyond the tolerance.

    Attributes:
        record: what was measured before the failure (parity, agreement, provider; the
            ``metrics.json`` export record when it was being built), so a caller can keep it.
    """

    def __init__(self, message: str, *, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record: dict[str, Any] = dict(record or {})


class MetricsSchemaError(JasPruneError):
    """A ``metrics.json`` written by another (older or newer) schema of jas-prune."""


class PeerFailedError(JasPruneError):
    """Another rank of a torchrun run failed; this rank stops with the same exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """The process received SIGTERM (exit code 143 = 128 + 15). A ``BaseException``, like
    ``KeyboardInterrupt``: no ``except Exception`` swallows it; the CLI turns it into the exit
    code, finished work being on disk."""

    exit_code = 143

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
