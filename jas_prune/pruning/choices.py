"""The names of the reconstruction choices and the bounds of prune settings, importable without torch (the recipe schema and the
CLI read them; :mod:`jas_prune.pruning.reconstruct` implements them)."""

from __future__ import annotations

__all__ = ["RECONSTRUCTIONS", "TARGETS", "LOGIT_COMPENSATIONS", "DEFAULT_DAMPING", "DEFAULT_TARGET", "RECONSTRUCTION_SUFFIX", "EPOCHS_MAX"]

#: none < bias < lsq: what is refit after pruning (nothing, fc2.bias, fc2 weight and bias).
RECONSTRUCTIONS = ("none", "bias", "lsq")
#: what the pruned FFN output is fit to (see :mod:`jas_prune.pruning.reconstruct`).
TARGETS = ("local", "global", "residual")
#: query/key logit compensation after head dimensions are removed (``prune.attention.logits``;
#: :mod:`jas_prune.pruning.logits`): nothing, or one of the two pre-declared candidates.
LOGIT_COMPENSATIONS = ("none", "affine", "centered")
#: relative ridge damping λ (times the mean diagonal of Cov(h)). Chosen on held-out probe images
#: (builtin:shapes-vit, seed 0): flat from 0 to 1e-2, worse above.
DEFAULT_DAMPING = 1e-3
#: ``residual`` beat ``global`` and ``local`` on the same held-out probe images, most at 90 % removed.
DEFAULT_TARGET = "residual"
#: checkpoint-name suffix of each reconstruction (``pruned-jas-r50-bc``: bias refit, the name bias
#: compensation always had)
RECONSTRUCTION_SUFFIX = {"none": None, "bias": "bc", "lsq": "lsq"}
#: the most training epochs a setting accepts (``prune.finetune.epochs``, ``prune.vit_slim.epochs``):
#: passes over the probe images, where more never ends
EPOCHS_MAX = 1000.0
