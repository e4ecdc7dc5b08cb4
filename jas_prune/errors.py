"""Exception types for user errors.

Every class here is a *user* error: the CLI turns it into exit code 2 and one line on stderr.
Anything else that escapes is an internal failure (exit code 1, traceback in the run log).
"""

from __future__ import annotations

__all__ = [
    "one_line",
    "JasPruneError",
    "RecipeError",
    "DataError",
    "UnsupportedModelError",
    "CheckpointError",
    "PretrainedUnavailableError",
    "StageNotAvailableError",
    "FingerprintMismatchError",
    "OutputDirError",
    "NonFiniteOutputError",
    "ExportVerificationError",
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


class RecipeError(JasPruneError):
    """Malformed recipe, unknown key, wrong type or out-of-range value (names the YAML path)."""


class DataError(JasPruneError):
    """Missing or empty data root, class folder without images, unknown class names."""


class UnsupportedModelError(JasPruneError):
    """A model that is not a timm ViT with ``blk.mlp.fc1 -> act -> fc2`` blocks."""


class CheckpointError(JasPruneError):
    """Missing, corrupt or mismatching checkpoint file."""


class PretrainedUnavailableError(JasPruneError):
    """``pretrained=True`` but the weights are not in the local cache (no downloads here)."""


class StageNotAvailableError(JasPruneError):
    """The recipe enables a stage or option this version cannot run."""


class FingerprintMismatchError(JasPruneError):
    """Resuming, or applying masks/scores, against a different model, data or settings."""


class OutputDirError(JasPruneError):
    """The output directory cannot be created or written."""


class NonFiniteOutputError(JasPruneError):
    """The model produced NaN/Inf logits (names the image)."""


class ExportVerificationError(JasPruneError):
    """An exported ONNX model disagrees with PyTorch beyond the tolerance."""
