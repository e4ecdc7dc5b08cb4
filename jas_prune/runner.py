"""``jas-prune recipe run``: recipe -> stages -> run directory.

The run directory holds ``recipe.yaml`` (resolved), ``run.log`` (``run.rank<N>.log`` for the
other ranks of a torchrun run), ``metrics.json`` (rewritten atomically after every stage),
``report.md`` and whatever the stages write (``paths/``, ``masks.*``, pruned checkpoints,
``*.onnx`` with sidecars).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import DataSource, build_source, make_loader, model_transform
from .distributed import Dist, Interrupted, init_from_env, sigterm_raises
from .errors import JasPruneError, OutputDirError, StageNotAvailableError
from .evaluate import accuracy, count_params_macs, predict_logits
from .io import atomic_write_json, atomic_write_text, read_json, writable_dir
from .models import input_size, load_model
from .recipe import Recipe, dump_recipe

__all__ = ["RunContext", "run_recipe", "check_stages", "resolve_device", "prepare_run_dir", "LOG_NAME"]

log = logging.getLogger("jas_prune")
LOG_NAME = "run.log"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when usable, else CPU; ``cuda`` without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageNotAvailableError("runtime.device: 'cuda' requested but CUDA is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_stages(recipe: Recipe) -> None:
    """Refuse, before any work, a recipe that enables a stage without the stages it needs.

    Raises:
        StageNotAvailableError: naming the recipe key.
    """
    if recipe.masks is not None and recipe.attribution is None:
        raise StageNotAvailableError("masks: needs the attribution section (the masks are built from its paths)")
    if recipe.prune is not None and "jas" in recipe.prune.methods and recipe.masks is None:
        raise StageNotAvailableError("prune.methods: 'jas' needs the attribution and masks sections "
                                     "(JAS importance comes from the class masks)")
    if recipe.evaluate.intervention and recipe.attribution is None:
        raise StageNotAvailableError("evaluate.intervention: needs the attribution section")
    if recipe.evaluate.cls_mask.ablation is not None and "paper_cls_mask" not in recipe.evaluate.protocols:
        raise StageNotAvailableError("evaluate.cls_mask.ablation: needs 'paper_cls_mask' in evaluate.protocols "
                                     "(it ablates that protocol)")
    if "paper_cls_mask" in recipe.evaluate.protocols and recipe.masks is None:
        raise StageNotAvailableError(
            "evaluate.protocols: 'paper_cls_mask' needs the attribution and masks sections (it keeps the class TopK)")


def check_against_model(recipe: Recipe, model: nn.Module, source: DataSource) -> None:
    """Refuse, once the model and data are known but before any work, settings that cannot fit them.

    Raises:
        RecipeError: ``attribution.layers`` out of range, ``attribution.topk`` or ``masks.topk``
            above an FFN width (naming the block and the width), ``evaluate.cls_mask.depth``
            above the model's depth.
        UnsupportedModelError: ``attribution.scope: cls`` for a model without a class token.
        DataError: a ``prune.classes`` entry that is not a class of the data set, or has no probe
            or no test images.
    """
    from .errors import RecipeError
    from .models import discover_ffn
    from .neurons import check_scope, resolve_layers

    info = discover_ffn(model)
    blocks = list(range(info.depth))
    a = recipe.attribution
    if a is not None:
        check_scope(info, a.scope, key="attribution.scope")
        blocks = resolve_layers(info, a.layers, key="attribution.layers")
    for key, k in (("attribution.topk", a.topk if a is not None else None),
                   ("masks.topk", recipe.masks.topk if recipe.masks is not None else None)):
        narrow = next((l for l in blocks if k is not None and k > info.layers[l].hidden), None)
        if narrow is not None:
            raise RecipeError(f"{key}: {k} exceeds the FFN width {info.layers[narrow].hidden} of block {narrow}")
    cm = recipe.evaluate.cls_mask
    if "paper_cls_mask" in recipe.evaluate.protocols:
        ablation = cm.ablation
        for key, depths in (("evaluate.cls_mask.depth", [cm.depth] if cm.depth is not None else []),
                            ("evaluate.cls_mask.ablation.depth", (ablation.depth or []) if ablation else [])):
            deep = next((d for d in depths if d > info.depth), None)
            if deep is not None:
                raise RecipeError(f"{key}: {deep} exceeds the {info.depth} blocks of model '{recipe.model.name}'")
        wide = next((k for k in (ablation.topk if ablation else []) if k > min(info.widths)), None)
        if wide is not None:
            raise RecipeError(f"evaluate.cls_mask.ablation.topk: {wide} exceeds the FFN width {min(info.widths)}")
    if recipe.prune is not None and recipe.prune.classes is not None:
        from .errors import DataError

        classes = resolve_classes(recipe.prune.classes, source.class_names)
        for part in ("probe", "test"):  # importance needs probe images, accuracy test images
            have = {s.label for s in source.subset(part, classes)}
            empty = next((c for c in classes if c not in have), None)
            if empty is not None:
                raise DataError(f"prune.classes: class {source.class_names[empty]!r} has no {part} images "
                                f"(data.probe_fraction {recipe.data.probe_fraction}, "
                                f"{sum(s.label == empty for s in source.samples)} image(s) in the data set)")


@dataclass
class RunContext:
    """What the stages share: the recipe, the run directory, the model, the data and the metrics."""

    recipe: Recipe
    out: Path
    device: torch.device
    model: nn.Module
    source: DataSource
    transform: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    #: per-neuron scores of data-driven criteria, by (method, classes): computed once per run
    scores: dict[tuple, Any] = field(default_factory=dict)
    #: this process's rank under torchrun (a one-process run by default)
    dist: Dist = field(default_factory=Dist)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the model's weights (``pathstore.weights_digest``), computed once per run."""
        from .pathstore import weights_digest

        return weights_digest(self.model)

    def criterion_scores(self, method: str, loader, classes: list[int] | None = None, **kwargs: Any):
        """``importance.criterion_scores`` on the probe data, computed once per (method, classes)."""
        from .importance import criterion_scores

        key = (method, None if classes is None else tuple(classes))
        if key not in self.scores:
            vit_slim = self.recipe.prune.vit_slim if self.recipe.prune is not None else None
            self.scores[key] = criterion_scores(
                method, self.model, loader, classes=classes, seed=self.recipe.runtime.seed, device=self.device,
                vit_slim=vit_slim.model_dump(by_alias=True) if vit_slim is not None else None, **kwargs)
        return self.scores[key]

    def loader(self, part: str, classes=None, batch_size: int | None = None):
        samples = self.source.subset(part, classes)
        return make_loader(samples, self.transform, batch_size=batch_size or self.recipe.data.batch_size,
                           workers=self.recipe.data.workers, seed=self.recipe.runtime.seed), samples

    def save_metrics(self) -> None:
        """Rewrite ``metrics.json`` (rank 0 only: the other ranks never write it)."""
        if self.dist.is_root:
            atomic_write_json(self.out / "metrics.json", self.metrics)


def prepare_run_dir(out: Path, *, resume: bool) -> None:
    """Create (or reuse, with ``--resume``) the run directory.

    Raises:
        OutputDirError: unwritable directory, or a previous run there without ``--resume``.
    """
    writable_dir(out, f"--out {out}")
    if not resume and ((out / "metrics.json").exists() or (out / "recipe.yaml").exists()):
        raise OutputDirError(
            f"--out {out}: already holds a run; pass --resume to continue it or choose another directory"
        )


def _attach_log(out: Path, rank: int = 0) -> logging.Handler:
    """Log to ``run.log`` (rank 0) or ``run.rank<N>.log`` (the other ranks of a torchrun run)."""
    name = LOG_NAME if rank == 0 else f"{Path(LOG_NAME).stem}.rank{rank}{Path(LOG_NAME).suffix}"
    handler = logging.FileHandler(out / name, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def stage_dense(ctx: RunContext) -> None:
    """Dense model: top-1/top-5 on the test partition, params and MACs."""
    loader, samples = ctx.loader("test")
    logits, labels = predict_logits(ctx.model, loader, device=ctx.device,
                                    sample_ids=[s.id for s in samples], desc="evaluate dense")
    acc = accuracy(logits, labels)
    size = count_params_macs(ctx.model, input_size(ctx.model))
    ctx.metrics.setdefault("fingerprint", {})["model"] = ctx.digest
    ctx.metrics["dense"] = {"top1": acc["top1"], "top5": acc["top5"], "params": size["params"],
                            "macs": size["macs"], "test_images": acc["n"]}
    log.info("dense: top1 %.4f top5 %.4f params %d macs %d on %d test images",
             acc["top1"], acc["top5"], size["params"], size["macs"], acc["n"])


#: Images per ``paths/`` chunk: fixed, so chunk i always holds the same images.
CHUNK_SIZE = 32
#: Methods compared in the paper's Table 1.
TABLE1_METHODS = ("jas", "activation", "influence_pattern")


def _images(ctx: RunContext, samples) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import ImageDataset

    ds = ImageDataset(samples, ctx.transform, shapes_seed=ctx.recipe.runtime.seed)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.long)


def _locate_settings(ctx: RunContext) -> dict[str, Any]:
    a = ctx.recipe.attribution
    assert a is not None
    return {k: getattr(a, k) for k in ("steps", "topk", "scope", "formula", "quadrature", "candidates", "target",
                                       "layers", "internal_batch_size")}


def _paths_fingerprint(ctx: RunContext, part: str, methods: list[str], digest: str) -> dict[str, Any]:
    """What ``paths/<part>/`` results depend on: model weights, image selection, settings."""
    settings = _locate_settings(ctx)
    return {
        "model": digest,
        "data": {**ctx.source.selection_fingerprint(), "partition": part},
        "attribution": {**{k: v for k, v in settings.items() if k != "internal_batch_size"},
                        "methods": methods, "chunk_size": CHUNK_SIZE, "dtype": ctx.recipe.runtime.dtype},
    }


def check_resumable(ctx: RunContext) -> None:
    """On ``--resume``, compare the stored ``paths/`` fingerprints before anything is rewritten.

    Raises:
        FingerprintMismatchError: naming the part (model, data, attribution) that differs.
    """
    from .errors import FingerprintMismatchError
    from .pathstore import PathStore

    stored = ctx.metrics.get("fingerprint", {}).get("model")
    if stored is not None and stored != ctx.digest:  # also guards runs without paths/ (pruned entries)
        raise FingerprintMismatchError(
            f"--resume {ctx.out}: the stored results were computed with a different model (weights digest "
            f"{stored[:12]}… vs {ctx.digest[:12]}…); use a new --out directory or restore the original settings")
    if ctx.recipe.attribution is None:
        return
    parts = [("probe", ctx.recipe.attribution.methods)]
    if ctx.recipe.evaluate.intervention:
        parts.append(("test", list(TABLE1_METHODS)))
    for part, methods in parts:
        store = PathStore(ctx.out / "paths" / part, chunk_size=CHUNK_SIZE)
        if (store.root / "fingerprint.json").exists():
            store.check_or_write_fingerprint(_paths_fingerprint(ctx, part, methods, ctx.digest), resume=True)


def _check_finite(r: Any, chunk: list, where: str) -> None:
    """Refuse NaN/Inf model outputs or attribution scores, naming the image (and block).

    Raises:
        NonFiniteOutputError
    """
    from .errors import NonFiniteOutputError

    bad = (~torch.isfinite(r.probs)).nonzero()
    if len(bad):
        raise NonFiniteOutputError(f"{where}: model output is not finite for image {chunk[int(bad[0, 0])].id}")
    for block, sc in zip(r.layers, r.scores):
        bad = (~torch.isfinite(sc)).nonzero()
        if len(bad):
            raise NonFiniteOutputError(f"{where}: attribution scores are not finite for image "
                                       f"{chunk[int(bad[0, 0])].id} in block {block}")


def stage_locate(ctx: RunContext, part: str, *, methods: list[str] | None = None, resume: bool = False) -> None:
    """Locate every image of a partition, chunk by chunk, into ``paths/<part>/`` (resumable).

    Under torchrun every rank calls this: rank 0 checks the fingerprint and lists the chunks
    still to do, the ranks take every ``world``-th of them, and all chunks are on disk when it
    returns (on every rank). ``metrics.locate`` counts the images of all ranks; its ``seconds``
    is the wall time of the slowest rank.
    """
    from tqdm.auto import tqdm

    from .locate import locate
    from .pathstore import PathStore

    dist = ctx.dist
    methods = methods or ctx.recipe.attribution.methods  # type: ignore[union-attr]
    settings = _locate_settings(ctx)
    samples = ctx.source.subset(part)
    store = PathStore(ctx.out / "paths" / part, chunk_size=CHUNK_SIZE)
    with dist.stage(f"checking paths/{part}") as plan:
        if dist.is_root:  # one rank reads and writes the fingerprint: no race on it
            store.check_or_write_fingerprint(_paths_fingerprint(ctx, part, methods, ctx.digest), resume=resume)
            removed = store.remove_partial()
            if removed:
                log.info("locate %s: removed %d unfinished write(s) of an interrupted run", part, len(removed))
            plan.value = store.pending(len(samples))
    pending: list[int] = plan.values[0]
    mine = pending[dist.rank::dist.world]  # a fresh run: chunk i on rank i % world
    done_before = store.n_chunks(len(samples)) - len(pending)
    with dist.stage(f"locating {part}") as work:
        t0 = time.perf_counter()
        n_new = 0
        bar = tqdm(mine, desc=f"locate {part} ({'+'.join(methods)})", unit="chunk", mininterval=2,
                   disable=not dist.is_root)
        for i in bar:
            dist.check_peers(f"locating {part}")  # another rank failed: stop now, not after our share
            rng = store.chunk_range(i, len(samples))
            chunk = [samples[j] for j in rng]
            x, y = _images(ctx, chunk)
            x = x.to(ctx.device, dtype=getattr(torch, ctx.recipe.runtime.dtype))
            results = {}
            for method in methods:
                r = locate(ctx.model, x, y.to(ctx.device), method=method, **settings)
                _check_finite(r, chunk, f"locate {part} ({method})")
                results[method] = r
            layers = results[methods[0]].layers
            store.write_chunk(i, store.chunk_tensors(rng, y, results),
                              {"ids": [s.id for s in chunk], "layers": layers, "methods": methods})
            n_new += len(chunk)
        work.value = (n_new, time.perf_counter() - t0)
        if dist.enabled:
            log.info("locate %s: rank %d/%d located %d images in %.1f s", part, dist.rank, dist.world,
                     n_new, work.value[1])
    n_new = sum(v[0] for v in work.values)
    per_rank = [v[1] for v in work.values]
    seconds = max(per_rank)
    key = "locate" if part == "probe" else f"locate_{part}"
    ctx.metrics[key] = {
        "images": len(samples), "images_this_run": n_new, "chunks_resumed": done_before,
        "seconds": seconds, "images_per_second": (n_new / seconds) if n_new and seconds > 0 else None,
        "world_size": dist.world, "seconds_per_rank": per_rank,
        "methods": methods, **settings, "device": str(ctx.device),
    }
    log.info("locate %s: %d images (%d new) in %.1f s%s", part, len(samples), n_new, seconds,
             f" on {dist.world} ranks" if dist.enabled else "")


def _probe_chunks(ctx: RunContext):
    """The stored probe chunks, one at a time."""
    from .pathstore import PathStore

    return PathStore(ctx.out / "paths" / "probe", chunk_size=CHUNK_SIZE).iter_chunks(len(ctx.source.subset("probe")))


def stage_masks(ctx: RunContext) -> None:
    """Per-class utilisation, similarity, TopK masks and importance from the probe paths."""
    from .aggregate import aggregate_store, save_masks
    from .models import discover_ffn

    assert ctx.recipe.masks is not None and ctx.recipe.attribution is not None
    method = ctx.recipe.attribution.methods[0]
    topk = ctx.recipe.masks.topk  # checked against the FFN widths by check_against_model
    masks = aggregate_store(_probe_chunks(ctx), method, num_classes=ctx.source.num_classes,
                            widths=discover_ffn(ctx.model).widths[0], topk=topk, class_names=ctx.source.class_names,
                            fingerprint={"model": ctx.metrics.get("fingerprint", {}).get("model"), "method": method,
                                         "attribution": _locate_settings(ctx)})
    path = save_masks(masks, ctx.out)
    ctx.metrics["masks"] = {"file": path.name, "method": method, "topk": topk, "importance": ctx.recipe.masks.importance,
                            "classes": ctx.source.num_classes,
                            "layers": masks.layers, "probe_images": int(masks.counts.sum())}
    log.info("masks: top-%d per layer for %d classes -> %s", topk, ctx.source.num_classes, path.name)
    from .semantic import semantic_check  # paper Finding 4, where class names carry the truth (shapes)

    semantic = semantic_check(masks.similarity, masks.class_names, valid=masks.counts > 0)
    if semantic is not None:
        ctx.metrics.setdefault("paper", {})["semantic"] = semantic


def stage_intervention(ctx: RunContext) -> None:
    """Table 1 on the test partition: path JAS, removal/enhancement deviations per method.

    Reads ``paths/test/``, located beforehand (``stage_locate(ctx, "test",
    methods=TABLE1_METHODS)``: under torchrun by every rank, like the probe partition); runs on
    rank 0 alone."""
    from .evaluate import intervention_metrics
    from .pathstore import PathStore

    loader, samples = ctx.loader("test")
    located = PathStore(ctx.out / "paths" / "test", chunk_size=CHUNK_SIZE).read(len(samples), scores=False)
    scope = ctx.recipe.attribution.scope  # type: ignore[union-attr]
    table = {}
    for method in TABLE1_METHODS:
        batches = ((x, y, located.targets[method][pos], located.paths[method][pos]) for x, y, pos in loader)
        m = intervention_metrics(ctx.model, batches, located.layers, scope=scope)
        m["path_jas_mean"] = located.jas[method].mean().item()
        table[method] = m
    ctx.metrics.setdefault("paper", {})["intervention"] = table
    log.info("intervention (Table 1) on %d test images", len(samples))


def stage_cls_mask(ctx: RunContext) -> None:
    """The paper's CLS-token masking protocol on the test partition, for the class TopK masks of
    every located method, a ViT-Slim-style learned mask and a random mask of the same size (and
    the top-K × depth × fraction ablation when the recipe asks).

    Every mask is nested: a class's top-K are the first K of its neurons by path frequency, the
    random ones the first K of one seeded permutation per (class, block), so the ablation's cell
    at ``masks.topk`` is the main protocol's mask.
    """
    from .aggregate import aggregate_store
    from .evaluate import cls_mask_protocol
    from .models import discover_ffn

    a, mk, cm = ctx.recipe.attribution, ctx.recipe.masks, ctx.recipe.evaluate.cls_mask
    assert a is not None and mk is not None
    info = discover_ffn(ctx.model)
    C, n, K = ctx.source.num_classes, info.widths[0], mk.topk
    k_max = max([K, *(cm.ablation.topk if cm.ablation is not None else [])])
    ranked = {method: aggregate_store(_probe_chunks(ctx), method, num_classes=C, widths=n, topk=k_max,
                                      class_names=ctx.source.class_names) for method in a.methods}
    layers = ranked[a.methods[0]].layers
    L = len(layers)
    gen = torch.Generator().manual_seed(ctx.recipe.runtime.seed)
    shuffled = torch.stack([torch.stack([torch.randperm(n, generator=gen) for _ in range(L)]) for _ in range(C)])

    def class_keep(name: str, k: int) -> torch.Tensor:
        """[C, L, n] bool: the first k neurons of each class's order (none for a class without probe images)."""
        if name == "random":
            return _nested_keep(shuffled, k, n)
        keep = _nested_keep(ranked[name].topk_indices, k, n)
        keep[ranked[name].counts == 0] = False
        return keep

    keeps = {method: class_keep(method, K) for method in a.methods}
    probe_loader, _ = ctx.loader("probe")
    slim = ctx.criterion_scores("vit_slim", probe_loader)
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
    ctx.metrics.setdefault("paper", {})["cls_mask"] = entry


def _nested_keep(order: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """[C, L, n] bool: the first ``k`` neurons of each row ``order[c, l]``."""
    keep = torch.zeros(*order.shape[:2], n, dtype=torch.bool)
    keep.scatter_(2, order[:, :, :k], True)
    return keep


def resolve_classes(names_or_ids, class_names: list[str], key: str = "prune.classes") -> list[int]:
    """Class names or indices -> sorted indices.

    Raises:
        DataError: naming the entry that is not a class of the data set.
    """
    from .errors import DataError

    out = set()
    for c in names_or_ids:
        if isinstance(c, int) and 0 <= c < len(class_names):
            out.add(c)
        elif isinstance(c, str) and c in class_names:
            out.add(class_names.index(c))
        else:
            raise DataError(f"{key}: {c!r} is not a class of the data set "
                            f"({len(class_names)} classes, e.g. {class_names[0]!r})")
    return sorted(out)


def _pruned_name(method: str, ratio: float, comp: bool, classes: list[int] | None) -> str:
    tag = f"pruned-{method}-r{round(ratio * 100):02d}"
    if comp:
        tag += "-bc"
    if classes is not None:
        tag += "-c" + "_".join(map(str, classes)) if len(classes) <= 8 else f"-c{len(classes)}classes"
    return tag


def stage_prune(ctx: RunContext) -> None:
    """Every method x ratio x compensation through the same pipeline: scores -> Torch-Pruning
    dependency graph -> optional fine-tune -> test accuracy of the kept classes -> checkpoint.
    Finished entries (checkpoint on disk and in metrics) are skipped on resume."""
    import copy

    from .checkpoint import save_pruned
    from .importance import JASImportance, ffn_activation_stats
    from .prune import BudgetError, PruneSettingError, finetune, prune_ffn

    p = ctx.recipe.prune
    assert p is not None
    classes = resolve_classes(p.classes, ctx.source.class_names) if p.classes is not None else None
    head_classes = classes if (classes is not None and p.head == "cut") else None
    probe_loader, _ = ctx.loader("probe", classes)
    test_loader, test_samples = ctx.loader("test", classes)
    size_in = input_size(ctx.model)
    example = torch.zeros(1, *size_in, device=ctx.device, dtype=next(ctx.model.parameters()).dtype)
    dense_logits, test_labels = predict_logits(ctx.model, test_loader, device=ctx.device,
                                               sample_ids=[s.id for s in test_samples], desc="evaluate dense subset")
    dense_sub = accuracy(dense_logits, test_labels)
    stats = ffn_activation_stats(ctx.model, probe_loader, classes=classes, device=ctx.device)
    aggregation = ctx.recipe.masks.importance if ctx.recipe.masks is not None else None
    done = {(e["method"], e["ratio"], e["bias_compensation"]): e for e in ctx.metrics.get("pruned", [])
            if e.get("classes") == classes and (ctx.out / e["checkpoint"]).is_file()
            and (e["method"] != "jas" or e.get("importance", "mean") == aggregation)}
    entries = list(done.values())
    others = [e for e in ctx.metrics.get("pruned", []) if e.get("classes") != classes]
    for method in p.methods:
        todo = [(r, c) for r in p.ratios for c in p.compensation_options if (method, r, c) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        if method == "jas":
            imp = JASImportance.from_run(ctx.out, classes, aggregation=aggregation, digest=ctx.digest)
            scores, protect = imp.scores, imp.protect
        else:
            scores = ctx.criterion_scores(method, probe_loader, classes, example_inputs=example, stats=stats)
            protect = None
        score_seconds = time.perf_counter() - t0
        for ratio, comp in todo:
            model = copy.deepcopy(ctx.model)
            try:
                summary = prune_ffn(model, scores, ratio=ratio, mode=p.mode, protect=protect, example_inputs=example,
                                    bias_compensation=stats if comp else None, head_classes=head_classes,
                                    class_names=ctx.source.class_names)
            except BudgetError as exc:  # what must stay (class masks, min_keep) exceeds the keep budget
                from .errors import RecipeError

                hint = "lower prune.ratios or masks.topk" if exc.protected else "lower prune.ratios"
                raise RecipeError(f"prune.ratios: {ratio} with method '{method}': {exc}; {hint}") from None
            except PruneSettingError as exc:  # e.g. bias compensation into an fc2 without bias
                from .errors import RecipeError

                raise RecipeError(f"prune: {exc}") from None
            ft = None
            if p.finetune is not None and p.finetune.epochs > 0:
                ft = finetune(model, probe_loader, epochs=p.finetune.epochs, lr=p.finetune.lr,
                              head_classes=head_classes, device=ctx.device)
            logits, labels = predict_logits(model, test_loader, device=ctx.device,
                                            sample_ids=[s.id for s in test_samples], desc=f"evaluate {method}")
            label_map = {c: j for j, c in enumerate(head_classes)} if head_classes is not None else None
            acc = accuracy(logits, labels, label_map=label_map)
            name = _pruned_name(method, ratio, comp, classes)
            ckpt = save_pruned(model, ctx.out / f"{name}.safetensors",
                               extra={"method": method, "ratio": ratio, "bias_compensation": comp,
                                      "classes": classes, "class_names": ctx.source.class_names})
            size = count_params_macs(model, size_in)
            entry = {"method": method, "ratio": ratio, "classes": classes, "top1": acc["top1"], "top5": acc["top5"],
                     "params": size["params"], "macs": size["macs"], "bias_compensation": comp,
                     "checkpoint": ckpt.name, "mode": p.mode, "head": p.head,
                     "dense_top1": dense_sub["top1"], "dense_top5": dense_sub["top5"], "test_images": acc["n"],
                     "removed_fraction": summary.removed_fraction, "widths": summary.widths_after,
                     "finetune": ft, "score_seconds": score_seconds}
            if method == "jas":
                entry["importance"] = aggregation
            entries.append(entry)
            ctx.metrics["pruned"] = others + entries
            ctx.save_metrics()
            log.info("pruned %-10s ratio %.2f%s: top1 %.4f (dense %.4f) params %d", method, ratio,
                     " +bc" if comp else "", acc["top1"], dense_sub["top1"], size["params"])
    ctx.metrics["pruned"] = others + entries


def stage_export(ctx: RunContext) -> None:
    """ONNX export of the dense model and every pruned checkpoint: verified and timed."""
    from .checkpoint import load_pruned
    from .errors import ExportVerificationError
    from .export import export_and_verify

    o = ctx.recipe.export.onnx  # type: ignore[union-attr]
    assert o is not None
    test_loader, _ = ctx.loader("test", batch_size=32)
    batch = next(iter(test_loader))[0]
    sidecar = {"class_names": ctx.source.class_names}
    jobs = [("dense", None, ctx.model)]
    for e in ctx.metrics.get("pruned", []):
        jobs.append((e["checkpoint"].removesuffix(".safetensors"), e["checkpoint"], None))
    records, failed = [], []
    for label, ckpt, model in jobs:
        if model is None:
            model = load_pruned(ctx.out / ckpt)
        model = model.to("cpu").float().eval()
        try:
            rec = export_and_verify(model, ctx.out / f"{label}.onnx", batch, label=label, checkpoint=ckpt,
                                    opset=o.opset, sidecar=sidecar, verify=o.verify, benchmark=o.benchmark,
                                    providers=o.providers, fp16=o.fp16)
        except ExportVerificationError as exc:
            rec = exc.result.get("record", {"model": label, "checkpoint": ckpt}) if hasattr(exc, "result") else {}
            rec["error"] = str(exc)
            failed.append(label)
        records.append(rec)
        ctx.metrics["export"] = records
        ctx.save_metrics()
    ctx.model.to(ctx.device)
    if failed:
        raise ExportVerificationError(f"export: ONNX parity check failed for {', '.join(failed)} "
                                      "(figures in metrics.json)")


def run_recipe(recipe: Recipe, out: str | os.PathLike[str], *, resume: bool = False) -> dict[str, Any]:
    """Run every stage the recipe enables and return ``metrics.json``'s content.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: the ranks
    share the locating (the probe partition, and the test partition for
    ``evaluate.intervention``); rank 0 alone writes the run directory, runs every other stage and
    returns the metrics; the other ranks return ``{}`` once their locating is done. SIGTERM
    raises :class:`~jas_prune.distributed.Interrupted` (finished chunks and checkpoints are kept:
    continue with ``resume=True``).
    """
    check_stages(recipe)
    out = Path(out)
    device = resolve_device(recipe.runtime.device)
    with sigterm_raises():
        dist = init_from_env(device)  # on CUDA, "cuda" is now this rank's GPU (LOCAL_RANK)
        try:
            return _run_stages(recipe, out, device, dist, resume=resume)
        finally:
            dist.close()


def _run_stages(recipe: Recipe, out: Path, device: torch.device, dist: Dist, *, resume: bool) -> dict[str, Any]:
    from .report import write_report

    # rank 0 prepares --out; under torchrun every rank then checks that it sees that directory
    dist.shared_dir(out, lambda: prepare_run_dir(out, resume=resume))
    handler = _attach_log(out, dist.rank)
    try:
        t0 = time.perf_counter()
        rt = recipe.runtime
        seed_everything(rt.seed)
        log.info("run %s on %s (torch %s)%s", out, device, torch.__version__,
                 f", rank {dist.rank} of {dist.world}" if dist.enabled else "")
        if recipe.attribution is None:  # locating is the only work the ranks share
            if not dist.is_root:
                return {}
            dist.release()
        with dist.stage("loading the model and data"):
            m = recipe.model
            model = load_model(m.name, checkpoint=m.checkpoint, pretrained=m.pretrained, num_classes=m.num_classes)
            model = model.to(device=device, dtype=getattr(torch, rt.dtype))
            d = recipe.data
            source = build_source(d.kind, root=d.root, seed=rt.seed, probe_fraction=d.probe_fraction,
                                  images_per_class=d.images_per_class)
            n_out = int(getattr(model, "num_classes", 0))
            if n_out and n_out < source.num_classes:
                from .errors import DataError

                raise DataError(f"data: {source.num_classes} classes but model '{m.name}' has only {n_out} outputs")
            check_against_model(recipe, model, source)
            resumed = dist.is_root and resume and (out / "metrics.json").exists()
            metrics: dict[str, Any] = read_json(out / "metrics.json") if resumed else {}
            ctx = RunContext(recipe, out, device, model, source, model_transform(model), metrics, dist=dist)
            if dist.is_root:  # written once the recipe fits the model and data: a refused run leaves no trace
                if resume:  # refuse other settings before recipe.yaml or metrics change
                    check_resumable(ctx)
                atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
            ctx.metrics["data"] = {"kind": source.kind, "classes": source.num_classes, "images": len(source.samples),
                                   "probe": len(source.probe), "test": len(source.test)}
        # the work the ranks share comes first: all of the locating, with nothing of rank 0 alone
        # in between (the others would wait for it in a timed agreement, idle)
        if recipe.attribution is not None:
            stage_locate(ctx, "probe", resume=resume)
            ctx.save_metrics()
        if recipe.evaluate.intervention:  # Table 1's test partition
            stage_locate(ctx, "test", methods=list(TABLE1_METHODS), resume=resume)
            ctx.save_metrics()
        if not dist.is_root:
            log.info("rank %d: locating done; rank 0 runs the other stages", dist.rank)
            return {}
        dist.release()  # the other ranks are done: no more meetings
        stage_dense(ctx)
        ctx.save_metrics()
        if recipe.masks is not None:
            stage_masks(ctx)
            ctx.save_metrics()
        if recipe.evaluate.intervention:
            stage_intervention(ctx)
            ctx.save_metrics()
        if "paper_cls_mask" in recipe.evaluate.protocols:
            stage_cls_mask(ctx)
            ctx.save_metrics()
        if recipe.prune is not None:
            stage_prune(ctx)
        if recipe.export is not None and recipe.export.onnx is not None:
            stage_export(ctx)
            ctx.save_metrics()
        ctx.metrics["run"] = {"seconds": time.perf_counter() - t0, "device": str(device),
                              "torch": torch.__version__, "world_size": dist.world}
        ctx.save_metrics()
        write_report(out)
        log.info("done in %.1f s: %s", time.perf_counter() - t0, out)
        return ctx.metrics
    except JasPruneError as exc:
        log.error("run failed: %s", exc, extra={"file_only": True})
        raise
    except (Interrupted, KeyboardInterrupt) as exc:
        log.error("interrupted, resume with --resume (%s; finished chunks and checkpoints are kept)",
                  exc or "interrupted by SIGINT", extra={"file_only": True})
        raise
    except Exception:
        log.exception("run failed (internal error)", extra={"file_only": True})
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
