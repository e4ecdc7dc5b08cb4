"""Exception types for user errors.

Every class here is a *user* error: the CLI turns it into exit code 2 and one line on stderr.
Anything else that escapes is an internal failure (exit code 1, traceback in the run log).
"""

from __future__ import annotations

__all__ = [
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
    """Base class of every user error (exit code 2)."""

    exit_code = 2


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
