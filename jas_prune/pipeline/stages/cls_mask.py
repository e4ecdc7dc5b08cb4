"""The paper's CLS-token masking protocol (Tables 2/3, Fig. 6) on the test partition.

For the class TopK masks of every located method, a ViT-Slim-style learned mask and a random
mask of the same size (and the top-K × depth × fraction ablation when the recipe asks). Every
mask is nested: a class's top-K are the first K of its neurons by path frequency, the random ones
the first K of one seeded permutation per (class, block), so the ablation's cell at
``masks.topk`` is the main protocol's mask.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...aggregate import aggregate_store
from ...errors import StageNotAvailableError
from ...evaluate import cls_mask_protocol
from ...metrics import ClsMaskMetrics
from ...models import discover_ffn
from .base import STAGES, Stage
from .masks import probe_chunks

log = logging.getLogger("jas_prune")


def nested_keep(order: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """[C, L, n] bool: the first ``k`` neurons of each row ``order[c, l]``."""
    keep = torch.zeros(*order.shape[:2], n, dtype=torch.bool)
    keep.scatter_(2, order[:, :, :k], True)
    return keep


def run_cls_mask(ctx) -> None:
    a, mk, cm = ctx.recipe.attribution, ctx.recipe.masks, ctx.recipe.evaluate.cls_mask
    info = discover_ffn(ctx.model)
    C, n, K = ctx.source.num_classes, info.widths[0], mk.topk
    k_max = max([K, *(cm.ablation.topk if cm.ablation is not None else [])])
    ranked = {method: aggregate_store(probe_chunks(ctx), method, num_classes=C, widths=n, topk=k_max,
                                      class_names=ctx.source.class_names) for method in a.methods}
    layers = ranked[a.methods[0]].layers
    L = len(layers)
    gen = torch.Generator().manual_seed(ctx.recipe.runtime.seed)
    shuffled = torch.stack([torch.stack([torch.randperm(n, generator=gen) for _ in range(L)]) for _ in range(C)])

    def class_keep(name: str, k: int) -> torch.Tensor:
        """[C, L, n] bool: the first k neurons of each class's order (none for a class without probe images)."""
        if name == "random":
            return nested_keep(shuffled, k, n)
        keep = nested_keep(ranked[name].topk_indices, k, n)
        keep[ranked[name].counts == 0] = False
        return keep

    keeps = {method: class_keep(method, K) for method in a.methods}
    slim = ctx.criterion("vit_slim").scores
    slim_keep = torch.zeros(L, n, dtype=torch.bool)
    for j, block in enumerate(layers):
        slim_keep[j, slim[block].topk(K).indices] = True
    keeps["vit_slim"] = slim_keep.expand(C, L, n).clone()
    keeps["random"] = class_keep("random", K)
    test_loader, samples = ctx.loader("test")
    depth = cm.depth or info.depth
    results: dict[str, list[dict[str, float]]] = {}
    for name, keep in keeps.items():
        results[name] = []
        for fraction in cm.fractions:
            acc = cls_mask_protocol(ctx.model, test_loader, keep, layers, depth=depth, fraction=fraction,
                                    seed=ctx.recipe.runtime.seed)
            results[name].append({"fraction": fraction, "top1": acc["top1"], "top5": acc["top5"]})
    entry: dict[str, Any] = {"topk": K, "depth": depth, "fractions": cm.fractions, "test_images": len(samples),
                             "results": results}
    log.info("paper CLS-mask protocol: %s", {k: [round(r["top5"], 4) for r in v] for k, v in results.items()})
    if cm.ablation is not None:  # paper Table 3: every top-K x depth x fraction, first located method vs random
        ab = cm.ablation
        depths = ab.depth or sorted({max(1, round(info.depth / 3)), max(1, round(2 * info.depth / 3)), info.depth})
        rows = []
        for k in ab.topk:
            for name in (a.methods[0], "random"):
                keep = class_keep(name, k)
                for d in depths:
                    for fraction in cm.fractions:
                        acc = cls_mask_protocol(ctx.model, test_loader, keep, layers, depth=d, fraction=fraction,
                                                seed=ctx.recipe.runtime.seed)
                        rows.append({"mask": name, "topk": k, "depth": d, "fraction": fraction,
                                     "top1": acc["top1"], "top5": acc["top5"]})
        entry["ablation"] = rows
        log.info("paper CLS-mask ablation: %d settings (top-K %s × depth %s × fractions)", len(rows), ab.topk, depths)
    ctx.paper.cls_mask = ClsMaskMetrics.from_dict(entry)


def _check(recipe) -> None:
    protocols = recipe.evaluate.protocols
    if recipe.evaluate.cls_mask.ablation is not None and "paper_cls_mask" not in protocols:
        raise StageNotAvailableError("evaluate.cls_mask.ablation: needs 'paper_cls_mask' in evaluate.protocols "
                                     "(it ablates that protocol)")
    if "paper_cls_mask" in protocols and recipe.masks is None:
        raise StageNotAvailableError(
            "evaluate.protocols: 'paper_cls_mask' needs the attribution and masks sections (it keeps the class TopK)")


@STAGES.register
def _cls_mask_stage() -> Stage:
    return Stage("cls_mask", "the paper's CLS-token masking protocol (+ ablation) -> metrics.paper.cls_mask",
                 enabled=lambda r: "paper_cls_mask" in r.evaluate.protocols, run=run_cls_mask, check=_check, order=60)
