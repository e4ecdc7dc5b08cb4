"""The recipe pipeline: :func:`run_recipe` runs the registered stages into a run directory.

- :mod:`.runner` — the orchestration (checks, ``--out``, stages in order, report);
- :mod:`.context` — :class:`RunContext`, what the stages share;
- :mod:`.checks` — the refusals that come before any work;
- :mod:`.stages` — one module per stage, registered in :data:`STAGES` in run order.
"""

from __future__ import annotations

from .checks import check_against_model, check_stages
from .context import RunContext, resolve_device
from .runner import locate_partition, run_recipe
from .stages import STAGES, Stage

__all__ = ["run_recipe", "locate_partition", "RunContext", "check_stages", "check_against_model", "resolve_device", "STAGES", "Stage"]
