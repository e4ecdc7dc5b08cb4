"""The ``jas-prune`` command line. User errors (``JasPruneError``) are caught here, once:
one line on stderr, exit code 2. Anything else is an internal failure: exit code 1."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import Interrupted, JasPruneError, one_line
from .shapes import BUILTIN_TRAINING

__all__ = ["cli", "main"]

log = logging.getLogger("jas_prune")

_SET_HELP = "Override a recipe value with a dotted key, e.g. --set attribution.steps=8 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jas-prune")
def cli() -> None:
    """Find influential neuron paths in ViTs (JAS), prune FFN neurons, export to ONNX."""


@cli.group()
def recipe() -> None:
    """Validate and run YAML recipes."""


def _read_recipe(path: Path, overrides: tuple[str, ...]):
    """The validated recipe. The YAML is read and bounded before the package's heavy modules (and
    PyTorch) are imported, so a hostile file is refused in a fraction of a second."""
    from .document import read_document

    data = read_document(path, overrides)
    from .recipe import parse_recipe

    return parse_recipe(data, source=str(path))


@recipe.command("validate")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
def recipe_validate(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe (schema, values, available stages) without running it."""
    r = _read_recipe(recipe_file, overrides)
    from .pipeline import check_stages
    from .pipeline.stages import STAGES

    check_stages(r)
    stages = [s.name for s in STAGES if s.enabled(r)]  # in run order, as recipe run would run them
    click.echo(f"{recipe_file}: valid (stages: {', '.join(stages)})")


@recipe.command("run")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--resume", is_flag=True, help="Continue a run in --out, skipping finished work.")
def recipe_run(recipe_file: Path, out: Path | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Run a recipe and write its run directory.

    Under ``torchrun --nproc_per_node=N -m jas_prune recipe run ...`` the N processes share the
    locating; rank 0 writes the run directory and prints the summary.
    """
    r = _read_recipe(recipe_file, overrides)
    from .distributed import env_rank
    from .pipeline import run_recipe

    out = out or Path("runs") / recipe_file.stem
    rank = env_rank()[0]
    if rank != 0:  # rank 0 speaks for the run; the others log to run.rank<N>.log
        for h in log.handlers:
            if isinstance(h, _ConsoleHandler):
                h.setLevel(logging.WARNING)
    metrics = run_recipe(r, out, resume=resume)
    if rank != 0 or metrics is None:
        return
    click.echo(f"run directory: {out}")
    dense = metrics.dense
    if dense is not None:
        click.echo(f"dense top-1 {100 * dense.top1:.2f} %  top-5 {100 * dense.top5:.2f} %  "
                   f"params {dense.params / 1e6:.3f} M  MACs {dense.macs / 1e6:.2f} M")


@cli.group()
def data() -> None:
    """The built-in data set."""


@data.command("shapes")
@click.option("--split", type=click.Choice(["train", "probe", "test"]), required=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--probe-fraction", type=float, default=0.8, show_default=True,
              help="As data.probe_fraction in a recipe.")
@click.option("--images-per-class", type=int, default=None,
              help="As data.images_per_class (probe/test); train: images per class (default 1000).")
def data_shapes(split: str, out: Path, seed: int, probe_fraction: float, images_per_class: int | None) -> None:
    """Write a split of the shapes data set as an ImageFolder of PNGs.

    probe/test are exactly the partitions a recipe with the same seed, probe_fraction and
    images_per_class uses.
    """
    from .data import write_shapes_split
    from .io import refuse_system_dir, writable_dir

    refuse_system_dir(out, f"--out {out}")
    writable_dir(out, f"--out {out}")
    n = write_shapes_split(split, out, seed=seed, probe_fraction=probe_fraction, images_per_class=images_per_class)
    click.echo(f"wrote {n} images to {out}")


@cli.command("train")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("jas_prune/weights/shapes-vit.safetensors"), show_default=True)
@click.option("--seed", type=int, default=BUILTIN_TRAINING["seed"], show_default=True)
@click.option("--epochs", type=float, default=BUILTIN_TRAINING["epochs"], show_default=True)
@click.option("--images-per-class", "per_class", type=int, default=BUILTIN_TRAINING["per_class"], show_default=True)
@click.option("--batch-size", type=int, default=BUILTIN_TRAINING["batch_size"], show_default=True)
@click.option("--lr", type=float, default=BUILTIN_TRAINING["lr"], show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def train(out: Path, seed: int, epochs: float, per_class: int, batch_size: int, lr: float, device: str) -> None:
    """Train builtin:shapes-vit from scratch on the shapes train split (deterministic per seed)."""
    from .train import train_builtin

    r = train_builtin(out, seed=seed, epochs=epochs, per_class=per_class, batch_size=batch_size, lr=lr,
                      device=device)
    click.echo(f"saved {r['path']} after {r['steps']} steps in {r['seconds'] + r['render_seconds']:.0f} s")


@cli.group("export")
def export_group() -> None:
    """Export checkpoints for deployment."""


@export_group.command("onnx")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write (a sidecar FILE.json is written next to it).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="ImageFolder to verify on (default: the shapes test partition).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the verification partition.")
@click.option("--precision", "precisions", multiple=True, metavar="NAME[,NAME]",
              help="Also write these precisions beside the float32 file: int8_static, int8_dynamic, fp16 "
                   "(repeatable or comma-separated; FILE.<precision>.onnx).")
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
              help="ImageFolder whose probe partition calibrates int8_static (default: --data-root, else the "
                   "built-in shapes data).")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--images-per-class", type=int, default=4, show_default=True,
              help="Calibration images per class (int8_static).")
@click.option("--benchmark/--no-benchmark", default=True, show_default=True)
@click.option("--max-seconds", type=float, default=60.0, show_default=True,
              help="Time budget of the ONNX Runtime timing, all batch sizes together (at least one round each).")
@click.option("--full-timing", is_flag=True,
              help="The full timing instead: 15 interleaved rounds per batch size, and PyTorch too.")
@click.option("--providers", default="cuda,cpu", show_default=True, help="ONNX Runtime providers, in order.")
def export_onnx_cmd(checkpoint: Path, out: Path, opset: int, data_root: Path | None, seed: int,
                    precisions: tuple[str, ...], calibration_data: Path | None, calibration_method: str,
                    images_per_class: int, benchmark: bool, max_seconds: float, full_timing: bool,
                    providers: str) -> None:
    """Export a (pruned) CHECKPOINT written by a recipe run or save_pruned, verify it against
    PyTorch on a real batch and time it in ONNX Runtime; with --precision, also its INT8 / float16
    copies, each checked on the same images and timed with it.

    Class names come from the checkpoint; without them, from --data-root when its classes fit the
    head; otherwise the sidecar numbers the classes (class_0, class_1, ...). Nothing is left at
    --out when the export fails verification.
    """
    import json

    from .checkpoint import load_pruned
    from .data import build_source, make_loader, model_transform
    from .deploy import export_and_verify
    from .deploy.quantize import CalibrationSettings, parse_precisions
    from .errors import DataError, InvalidArgumentError, OutputDirError
    from .io import storage_advice, writable_dir

    if out.suffix.lower() == ".json":
        raise OutputDirError(f"--out {out}: the ONNX file must not end in .json (that name is its sidecar's)")
    precs = parse_precisions([p.strip() for v in precisions for p in v.split(",") if p.strip()])
    if not max_seconds > 0:
        raise InvalidArgumentError(f"--max-seconds: must be > 0 (got {max_seconds})")
    if images_per_class < 1:
        raise InvalidArgumentError(f"--images-per-class: must be ≥ 1 (got {images_per_class})")
    if calibration_data is not None and "int8_static" not in precs:
        raise InvalidArgumentError("--calibration-data: only int8_static is calibrated; add --precision int8_static")
    if calibration_data is not None and not calibration_data.is_dir():
        raise DataError(f"--calibration-data: directory not found: {calibration_data}")
    model = load_pruned(checkpoint)  # a checkpoint it cannot read is refused before --out is created
    source = build_source("imagefolder" if data_root else "shapes", root=str(data_root) if data_root else None,
                          seed=seed)
    calib_source = None
    if "int8_static" in precs:  # read (and refused) before anything is written
        calib_source = build_source("imagefolder", root=str(calibration_data), seed=seed) \
            if calibration_data is not None else source
    writable_dir(out.parent, f"--out {out}")
    head = getattr(model, "jas_head_classes", None)
    # verification needs real images, not their labels: the head's classes when the source has them
    classes = head if head and max(head) < source.num_classes else None
    samples = source.subset("test", classes)[:32]
    batch = next(iter(make_loader(samples, model_transform(model), batch_size=32)))[0]
    names = _export_class_names(model, source, given=data_root is not None)
    settings = CalibrationSettings(images_per_class=images_per_class, method=calibration_method)
    bench = {"batch_sizes": (1, 32), "providers": [p.strip() for p in providers.split(",") if p.strip()]}
    with storage_advice("free space and export again"):
        log.info("exporting %s to %s", checkpoint, out)
        rec = export_and_verify(model, out, batch, label=checkpoint.stem, checkpoint=str(checkpoint), opset=opset,
                                sidecar={"class_names": names} if names is not None else {},
                                benchmark=benchmark and full_timing, torch_latency=full_timing, onnx_latency=False,
                                **bench)
        _export_copies(model, rec, precs, batch, samples, source, calib_source, names, settings, opset)
        if benchmark:
            from .deploy import benchmark_exports

            timing = {} if full_timing else {"max_seconds": max_seconds / 2, "min_rounds": 1, "warmup": 1,
                                             "iters": 1}
            if not full_timing:
                log.info("timing bounded to about %.0f s (--max-seconds); --full-timing for the full measurement",
                         max_seconds)
            benchmark_exports([rec], reference=rec["model"], **bench, **timing)
    failed = [p["error"] for p in rec.get("precisions") or [] if p.get("error")]
    keys = ("path", "parity_max_abs", "top1_agreement", "latency_ms_p50", "latency_ms_p90", "provider", "exporter")
    shown = {k: rec.get(k) for k in keys}
    pkeys = ("path", "test_top1", "top1_agreement", "size_bytes", "float_ops", "calibration", "note", "error")
    for p in rec.get("precisions") or []:
        lat = (p.get("latency") or [{}])[0]
        shown[p["precision"]] = {**{k: p.get(k) for k in pkeys if p.get(k) is not None},
                                 "latency_ms_p50": lat.get("latency_ms_p50"),
                                 "speedup": (lat.get("speedup") or {}).get("median")}
    click.echo(json.dumps(shown, indent=2))
    if failed:
        from .errors import ExportVerificationError

        raise ExportVerificationError("; ".join(failed))


def _export_copies(model, rec, precs, batch, samples, source, calib_source, names, settings, opset) -> None:
    """The --precision copies of the verified float32 file into ``rec["precisions"]``, checked on
    the verification images (top-1 when their labels are the model's, else agreement only)."""
    if len(precs) < 2:
        return
    import numpy as np
    import torch

    from .data import ImageDataset, model_transform
    from .deploy.quantize import onnx_logits, per_class
    from .deploy.variants import export_precisions, test_figures

    def arrays(items, seed: int):
        ds = ImageDataset(items, model_transform(model), shapes_seed=seed)
        got = [ds[i] for i in range(len(ds))]
        return torch.stack([x for x, _, _ in got]).numpy(), np.asarray([y for _, y, _ in got])

    own = names is not None and list(names) == list(source.class_names) and not getattr(model, "jas_head_classes", None)
    test = batch.numpy()
    labels = np.asarray([s.label for s in samples]) if own else None
    ref = onnx_logits(rec["path"], test)
    rec.update({k: v for k, v in test_figures(ref, labels).items() if k in ("test_top1", "test_images")})
    calib = probe = probe_labels = None
    if calib_source is not None:
        items = per_class(calib_source.subset("probe"), settings.images_per_class)
        if not items:
            from .errors import DataError

            raise DataError("--calibration-data: no calibration images (the probe partition is empty)")
        calib, probe_labels = arrays(items, calib_source.seed)
        probe = calib
        fits = own and calib_source is source
        if not fits:  # labels of other classes say nothing: judge the float groups on agreement with fp32
            probe_labels = onnx_logits(rec["path"], probe).argmax(1)
    rec["precisions"] = export_precisions(model, rec["path"], precs, test_images=test, test_labels=labels,
                                          fp32_logits=ref, calib=calib, probe=probe, probe_labels=probe_labels,
                                          settings=settings, opset=opset,
                                          sidecar={"class_names": names} if names is not None else {})


def _export_class_names(model, source, *, given: bool) -> list[str] | None:
    """Names of the original classifier outputs for the sidecar: the checkpoint's, else those of
    ``--data-root`` (``given``) when they fit the head, else the built-in data set's for a
    ``builtin:`` model, else None (the sidecar numbers the classes)."""
    head = getattr(model, "jas_head_classes", None)
    original = (max(head) + 1) if head else int(model.num_classes)

    def fits(names) -> bool:
        return names is not None and (len(names) > max(head) if head else len(names) == original)

    extra = getattr(model, "jas_checkpoint_extra", {}) or {}
    for names in (getattr(model, "jas_class_names", None), extra.get("class_names")):
        if fits(names):
            return [str(n) for n in names]
    builtin = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")).startswith("builtin:")
    if (given or builtin) and fits(source.class_names):
        return list(source.class_names)
    if given:
        log.warning("jas-prune: warning: --data-root has %d classes but the checkpoint's head has %d outputs; "
                    "the sidecar numbers the classes (class_0, ...)", source.num_classes, model.num_classes)
        return None
    log.warning("jas-prune: warning: the checkpoint holds no class names; the sidecar numbers the classes "
                "(class_0, ...); pass --data-root with the model's classes to name them")
    return None


@cli.command("report")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--combine", is_flag=True,
              help="One report over several runs of the same recipe that differ only in runtime.seed "
                   "(mean ± std); needs --out.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the combined report (with --combine).")
def report(run_dirs: tuple[Path, ...], combine: bool, out: Path | None) -> None:
    """Rebuild report.md and its figures of a run directory from its metrics, without recomputing.

    \b
    jas-prune report RUN_DIR
    jas-prune report --combine RUN_DIR1 RUN_DIR2 ... --out DIR
    """
    from .errors import OutputDirError
    from .io import refuse_system_dir, storage_advice
    from .lock import RunDirLock
    from .reporting import combine_reports, write_report
    from .rundir import RunDir

    if combine:
        if out is None:
            raise OutputDirError("--combine: give --out DIR for the combined report")
        refuse_system_dir(out, f"--out {out}")
        with storage_advice("choose a writable --out and combine again"):
            click.echo(f"wrote {combine_reports(run_dirs, out)}")
        return
    if len(run_dirs) != 1 or out is not None:
        raise OutputDirError("report: give one RUN_DIR (or --combine RUN_DIR... --out DIR to combine runs)")
    run = RunDir(run_dirs[0])
    if not run.metrics.is_file():  # before the lock: a directory that is no run gets no lock file
        raise OutputDirError(f"{run.root}: no metrics.json (not a jas-prune run directory)")
    had_lock = run.lock.exists()
    try:
        with RunDirLock(run).acquire("report"):  # a run still writing it, or another report: refused at once
            if not run.metrics.is_file():
                raise OutputDirError(f"{run.root}: no metrics.json (not a jas-prune run directory)")
            with storage_advice(f"make {run.root} writable and run jas-prune report again"):
                click.echo(f"wrote {write_report(run.root)}")
    except JasPruneError:
        if not had_lock:  # refused: leave the directory as it was
            run.lock.unlink(missing_ok=True)
        raise


@cli.command("atlas")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--classes", "classes", multiple=True, metavar="CLASS[,CLASS...]",
              help="Classes to show, by name or index (repeatable; default: every class, see report.atlas).")
@click.option("--neurons", "neurons", multiple=True, metavar="BLOCK:INDEX[,...]",
              help="Extra neurons to show, e.g. --neurons 0:17,3:5 (repeatable). Alone, only these are shown.")
@click.option("--images", type=click.IntRange(1, 64), default=None,
              help="Top-activating probe images per neuron (default: report.atlas.images, 6).")
def atlas(run_dir: Path, classes: tuple[str, ...], neurons: tuple[str, ...], images: int | None) -> None:
    """What each path neuron of a finished run sees: top probe images with patch heatmaps, its
    activation per class and its share of each class's paths -> RUN_DIR/atlas/atlas.html."""
    from .reporting.atlas_command import atlas_command, split_list

    info = atlas_command(run_dir, classes=split_list(classes), neurons=neurons, images=images)
    click.echo(f"wrote {Path(run_dir) / info.page} ({len(info.classes)} classes, {len(info.neurons)} neurons, "
               f"{info.seconds:.1f} s, peak RSS {info.peak_rss_mb:.0f} MB)")


class _ConsoleHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tqdm-friendly, capture-friendly)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _setup_console_logging() -> None:
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        handler = _ConsoleHandler(logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: not getattr(record, "file_only", False))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


#: click ≥ 8.2 raises this (a UsageError carrying the whole help text) for a group run bare
_NoArgsIsHelp: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns (and exits with) 0, 1 or 2."""
    _setup_console_logging()
    try:
        cli.main(args=argv, prog_name="jas-prune", standalone_mode=False)
        return 0
    except JasPruneError as exc:
        click.echo(f"jas-prune: error: {one_line(exc)}", err=True)
        code = exc.exit_code
    except Interrupted as exc:  # SIGTERM during a run: finished work is on disk
        click.echo(f"jas-prune: {exc}; finished work is kept, continue with --resume", err=True)
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("jas-prune: aborted", err=True)
        code = 130
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except _NoArgsIsHelp as exc:  # a bare group (`jas-prune`, `jas-prune recipe`): its help
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:  # bad argument or option: one line, like every user error
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"jas-prune: error: {one_line(exc.format_message())}{where}", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("jas-prune: interrupted", err=True)
        code = 130
    except Exception as exc:  # internal failure
        import traceback

        traceback.print_exc()
        click.echo(f"jas-prune: internal error: {type(exc).__name__}: {exc}", err=True)
        code = 1
    if argv is None:
        sys.exit(code)
    return code
