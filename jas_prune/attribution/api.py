"""The public entry points :func:`locate` and :func:`path_jas`.

Both take the settings as the recipe's ``attribution`` keywords (``steps=20, scope="all"``, …)
or as one :class:`~jas_prune.attribution.LocateSettings` built once and reused (the pipeline
does that), never both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .engine import JointAttribution, LocateResult
from ..errors import AttributionSettingError
from .settings import LocateSettings, ResolvedSettings

__all__ = ["locate", "path_jas"]


def _given_labels(target: str, labels: Any) -> Any:
    if target == "pred":
        return None
    if labels is None:
        raise AttributionSettingError("attribution.target: 'label' needs the images' labels (pass labels, or use target 'pred')")
    return labels


def locate(model: nn.Module, images: Tensor, labels: Tensor | Sequence[int] | None,
           settings: LocateSettings | ResolvedSettings | None = None, **kwargs: Any) -> LocateResult:
    """Find each image's neuron path (top-K FFN neurons per layer).

    Args:
        model: timm ViT with ``blk.mlp.fc1 -> act -> fc2`` blocks (left unchanged).
        images: ``[B, C, H, W]``, preprocessed; moved to the model's device and dtype.
        labels: ``[B]`` ground-truth classes (needed for ``target="label"``).
        settings: a :class:`LocateSettings`; or, as keywords, ``method`` (``jas`` |
            ``activation`` | ``influence_pattern`` | ``knowledge``), ``steps`` (quadrature nodes
            m, default 20), ``topk`` (K; all K neurons of every earlier layer enter both sums of
            JAS(P ∪ {j}) — the released TopK script used only the last of them, a bug that is not
            reproduced), ``scope`` (``cls`` | ``all``), ``formula`` (``paper`` | ``ig``),
            ``quadrature`` (``left`` | ``right`` | ``trapezoid`` | ``gauss``), ``candidates``
            (``layer_scaled`` | ``exact``), ``target`` (``label`` | ``pred``), ``layers``
            (``None``, a prefix depth or block indices), ``internal_batch_size`` (max (image,
            step) rows per forward: bounds peak memory), ``units`` (``["ffn"]`` default,
            ``["ffn", "heads"]`` or ``["heads"]``: attention heads as units too, see
            ``LocateResult.head_paths``).

    Returns:
        :class:`LocateResult` with ``paths`` ``[B, L, K]``, ``jas`` ``[B]``, ``scores``, ...

    Raises:
        AttributionSettingError: an invalid setting (a ``RecipeError`` and ``ValueError``).
    """
    if settings is None:
        settings = LocateSettings(**kwargs)
        kwargs = {}
    given = _given_labels(settings.target, labels)
    res = JointAttribution(model).attribute(images, given, settings=settings, **kwargs)
    res.settings["target"] = settings.target
    return res


def path_jas(model: nn.Module, images: Tensor, targets: Tensor | Sequence[int] | None, paths: Tensor,
             settings: LocateSettings | ResolvedSettings | None = None, **kwargs: Any) -> Tensor:
    """JAS ``[B]`` of given paths under the settings (e.g. baseline paths for Table 1).

    Args:
        targets: class per image whose probability is F (``None`` = clean prediction).
        paths: ``[B, L, K]`` (or ``[B, L]``) neuron indices for the blocks in ``layers``.
        settings: as for :func:`locate` (``steps``, ``scope``, ``formula``, ``quadrature``,
            ``layers``, ``internal_batch_size`` matter).
    """
    return JointAttribution(model).path_jas(images, targets, paths, settings=settings, **kwargs)
