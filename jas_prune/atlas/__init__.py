"""The neuron atlas: what each path neuron sees (``jas-prune atlas RUN_DIR``, ``report.atlas``).

For each chosen class, its most frequent path neuron per block; for each such neuron, the probe
images that activate it most with a patch heatmap of its per-token activation, its activation
per class and its JAS share on the class's paths; one figure per class along the path and a
self-contained ``atlas.html``. Works from ``paths/probe`` chunk by chunk and one pass of the
probe images through the model, in memory bounded by the chosen neurons (not the images).

- :mod:`.settings` — ``report.atlas`` (:class:`AtlasSettings`, :class:`ReportSettings`);
- :mod:`.select` — the neurons: class path neurons and their per-class use, from ``paths/``;
- :mod:`.activations` — one streamed pass: running top-k images, per-token maps, per-class moments;
- :mod:`.figures` — per-class path figures and the image tiles; :mod:`.page` — ``atlas.html``;
- :mod:`.build` — the whole atlas of a run directory, its cost and the colour check.

This ``__init__`` imports nothing heavy: the recipe schema imports :mod:`.settings`.
"""

from __future__ import annotations

from .settings import AtlasSettings, ReportSettings

__all__ = ["AtlasSettings", "ReportSettings"]
