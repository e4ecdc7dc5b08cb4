"""``jas-prune recipe run``: recipe -> stages -> run directory.

The run directory holds ``recipe.yaml`` (resolved), ``run.log``, ``metrics.json`` (rewritten
atomically after every stage), ``report.md`` and whatever the stages write (``paths/``,
``masks.*``, pruned checkpoints, ``*.onnx`` with sidecars).
"""

from __future__ import annotations

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
from .errors import JasPruneError, OutputDirError, StageNotAvailableError
from .evaluate import accuracy, count_params_macs, predict_logits
from .io import atomic_write_json, atomic_write_text, read_json
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
    if "paper_cls_mask" in recipe.evaluate.protocols and recipe.masks is None:
        raise StageNotAvailableError(
            "evaluate.protocols: 'paper_cls_mask' needs the attribution and masks sections (it keeps the class TopK)")


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
        atomic_write_json(self.out / "metrics.json", self.metrics)


def prepare_run_dir(out: Path, *, resume: bool) -> None:
    """Create (or reuse, with ``--resume``) the run directory.

    Raises:
        OutputDirError: unwritable directory, or a previous run there without ``--resume``.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    if not resume and ((out / "metrics.json").exists() or (out / "recipe.yaml").exists()):
        raise OutputDirError(
            f"--out {out}: already holds a run; pass --resume to continue it or choose another directory"
        )


def _attach_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / LOG_NAME, encoding="utf-8")
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


def stage_locate(ctx: RunContext, part: str, *, methods: list[str] | None = None, resume: bool = False) -> None:
    """Locate every image of a partition, chunk by chunk, into ``paths/<part>/`` (resumable)."""
    from tqdm.auto import tqdm

    from .errors import NonFiniteOutputError
    from .locate import locate
    from .pathstore import PathStore, weights_digest

    methods = methods or ctx.recipe.attribution.methods  # type: ignore[union-attr]
    settings = _locate_settings(ctx)
    samples = ctx.source.subset(part)
    store = PathStore(ctx.out / "paths" / part, chunk_size=CHUNK_SIZE)
    digest = weights_digest(ctx.model)
    ctx.metrics.setdefault("fingerprint", {})["model"] = digest
    store.check_or_write_fingerprint({
        "model": digest,
        "data": {**ctx.source.selection_fingerprint(), "partition": part},
        "attribution": {**{k: v for k, v in settings.items() if k != "internal_batch_size"},
                        "methods": methods, "chunk_size": CHUNK_SIZE, "dtype": ctx.recipe.runtime.dtype},
    }, resume=resume)
    pending = store.pending(len(samples))
    done_before = store.n_chunks(len(samples)) - len(pending)
    t0 = time.perf_counter()
    n_new = 0
    bar = tqdm(pending, desc=f"locate {part} ({'+'.join(methods)})", unit="chunk", mininterval=2)
    for i in bar:
        rng = store.chunk_range(i, len(samples))
        chunk = [samples[j] for j in rng]
        x, y = _images(ctx, chunk)
        x = x.to(ctx.device, dtype=getattr(torch, ctx.recipe.runtime.dtype))
        results = {}
        for method in methods:
            r = locate(ctx.model, x, y.to(ctx.device), method=method, **settings)
            bad = (~torch.isfinite(r.probs)).nonzero()
            if len(bad):
                raise NonFiniteOutputError(f"model output is not finite for image {chunk[int(bad[0, 0])].id}")
            results[method] = r
        layers = results[methods[0]].layers
        store.write_chunk(i, store.chunk_tensors(rng, y, results),
                          {"ids": [s.id for s in chunk], "layers": layers, "methods": methods})
        n_new += len(chunk)
    seconds = time.perf_counter() - t0
    key = "locate" if part == "probe" else f"locate_{part}"
    ctx.metrics[key] = {
        "images": len(samples), "images_this_run": n_new, "chunks_resumed": done_before,
        "seconds": seconds, "images_per_second": (n_new / seconds) if n_new and seconds > 0 else None,
        "methods": methods, **settings, "device": str(ctx.device),
    }
    log.info("locate %s: %d images (%d new) in %.1f s", part, len(samples), n_new, seconds)


def stage_masks(ctx: RunContext) -> None:
    """Per-class utilisation, similarity, TopK masks and importance from the probe paths."""
    from .aggregate import aggregate, save_masks
    from .models import discover_ffn
    from .pathstore import PathStore

    assert ctx.recipe.masks is not None and ctx.recipe.attribution is not None
    method = ctx.recipe.attribution.methods[0]
    samples = ctx.source.subset("probe")
    located = PathStore(ctx.out / "paths" / "probe", chunk_size=CHUNK_SIZE).read(len(samples))
    widths = discover_ffn(ctx.model).widths
    topk = ctx.recipe.masks.topk
    if topk > min(widths):
        from .errors import RecipeError

        raise RecipeError(f"masks.topk: {topk} exceeds the FFN width {min(widths)}")
    masks = aggregate(located.paths[method], located.scores[method], located.labels,
                      num_classes=ctx.source.num_classes, widths=widths[0], topk=topk, layers=located.layers,
                      class_names=ctx.source.class_names,
                      fingerprint={"model": ctx.metrics.get("fingerprint", {}).get("model"), "method": method,
                                   "attribution": _locate_settings(ctx)})
    path = save_masks(masks, ctx.out)
    ctx.metrics["masks"] = {"file": path.name, "method": method, "topk": topk, "classes": ctx.source.num_classes,
                            "layers": located.layers, "probe_images": int(masks.counts.sum())}
    log.info("masks: top-%d per layer for %d classes -> %s", topk, ctx.source.num_classes, path.name)


def stage_intervention(ctx: RunContext, *, resume: bool = False) -> None:
    """Table 1 on the test partition: path JAS, removal/enhancement deviations per method."""
    from .evaluate import intervention_metrics
    from .pathstore import PathStore

    stage_locate(ctx, "test", methods=list(TABLE1_METHODS), resume=resume)
    loader, samples = ctx.loader("test")
    located = PathStore(ctx.out / "paths" / "test", chunk_size=CHUNK_SIZE).read(len(samples))
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
    every located method, a ViT-Slim-style learned mask and a random mask of the same size."""
    from .aggregate import aggregate
    from .evaluate import cls_mask_protocol
    from .models import discover_ffn
    from .pathstore import PathStore

    a, mk, cm = ctx.recipe.attribution, ctx.recipe.masks, ctx.recipe.evaluate.cls_mask
    assert a is not None and mk is not None
    widths = discover_ffn(ctx.model).widths
    located = PathStore(ctx.out / "paths" / "probe", chunk_size=CHUNK_SIZE).read(len(ctx.source.subset("probe")))
    C, L, n, K = ctx.source.num_classes, len(located.layers), widths[0], mk.topk
    keeps: dict[str, torch.Tensor] = {}
    for method in a.methods:
        keeps[method] = aggregate(located.paths[method], located.scores[method], located.labels, num_classes=C,
                                  widths=n, topk=K, layers=located.layers, class_names=ctx.source.class_names).topk
    probe_loader, _ = ctx.loader("probe")
    slim = ctx.criterion_scores("vit_slim", probe_loader)
    slim_keep = torch.zeros(L, n, dtype=torch.bool)
    for j, block in enumerate(located.layers):
        slim_keep[j, slim[block].topk(K).indices] = True
    keeps["vit_slim"] = slim_keep.expand(C, L, n).clone()
    gen = torch.Generator().manual_seed(ctx.recipe.runtime.seed)
    rand_keep = torch.zeros(C, L, n, dtype=torch.bool)
    for c in range(C):
        for j in range(L):
            rand_keep[c, j, torch.randperm(n, generator=gen)[:K]] = True
    keeps["random"] = rand_keep
    test_loader, samples = ctx.loader("test")
    depth = cm.depth or len(widths)
    results: dict[str, list[dict[str, float]]] = {}
    for name, keep in keeps.items():
        results[name] = []
        for fraction in cm.fractions:
            acc = cls_mask_protocol(ctx.model, test_loader, keep, located.layers, depth=depth, fraction=fraction,
                                    seed=ctx.recipe.runtime.seed)
            results[name].append({"fraction": fraction, "top1": acc["top1"], "top5": acc["top5"]})
    ctx.metrics.setdefault("paper", {})["cls_mask"] = {"topk": K, "depth": depth, "fractions": cm.fractions,
                                                       "test_images": len(samples), "results": results}
    log.info("paper CLS-mask protocol: %s", {k: [round(r["top5"], 4) for r in v] for k, v in results.items()})


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
    from .prune import finetune, prune_ffn

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
    done = {(e["method"], e["ratio"], e["bias_compensation"]): e for e in ctx.metrics.get("pruned", [])
            if e.get("classes") == classes and (ctx.out / e["checkpoint"]).is_file()}
    entries = list(done.values())
    others = [e for e in ctx.metrics.get("pruned", []) if e.get("classes") != classes]
    for method in p.methods:
        todo = [(r, c) for r in p.ratios for c in p.compensation_options if (method, r, c) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        if method == "jas":
            from .aggregate import load_masks
            from .pathstore import weights_digest

            load_masks(ctx.out).check_model(weights_digest(ctx.model), source=str(ctx.out / "masks.safetensors"))
            imp = JASImportance.from_run(ctx.out, classes)
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
            except ValueError as exc:  # settings that cannot be met together, e.g. protect > keep budget
                from .errors import RecipeError

                hint = "; lower prune.ratios or masks.topk" if "protected" in str(exc) else ""
                raise RecipeError(f"prune.ratios: {ratio} with method '{method}': {exc}{hint}") from None
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
    """Run every stage the recipe enables and return ``metrics.json``'s content."""
    from .report import write_report

    check_stages(recipe)
    out = Path(out)
    prepare_run_dir(out, resume=resume)
    handler = _attach_log(out)
    try:
        t0 = time.perf_counter()
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
        rt = recipe.runtime
        seed_everything(rt.seed)
        device = resolve_device(rt.device)
        log.info("run %s on %s (torch %s)", out, device, torch.__version__)
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
        metrics: dict[str, Any] = read_json(out / "metrics.json") if resume and (out / "metrics.json").exists() else {}
        ctx = RunContext(recipe, out, device, model, source, model_transform(model), metrics)
        ctx.metrics["data"] = {"kind": source.kind, "classes": source.num_classes, "images": len(source.samples),
                               "probe": len(source.probe), "test": len(source.test)}
        stage_dense(ctx)
        ctx.save_metrics()
        if recipe.attribution is not None:
            stage_locate(ctx, "probe", resume=resume)
            ctx.save_metrics()
        if recipe.masks is not None:
            stage_masks(ctx)
            ctx.save_metrics()
        if recipe.evaluate.intervention:
            stage_intervention(ctx, resume=resume)
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
                              "torch": torch.__version__}
        ctx.save_metrics()
        write_report(out)
        log.info("done in %.1f s: %s", time.perf_counter() - t0, out)
        return ctx.metrics
    except JasPruneError as exc:
        log.error("run failed: %s", exc, extra={"file_only": True})
        raise
    except Exception:
        log.exception("run failed (internal error)", extra={"file_only": True})
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
