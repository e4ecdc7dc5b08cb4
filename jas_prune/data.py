"""Data sets and the per-class probe/test partition.

Both kinds (``shapes`` and ``imagefolder``) expose the same thing: a list of samples with labels
and class names, partitioned per class into ``probe`` (attribution, masks, calibration) and
``test`` (every accuracy figure), seeded and stratified.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset

from . import shapes
from .errors import DataError
from .schema import Strict

__all__ = [
    "DataSettings",
    "IMAGES_PER_CLASS_MAX",
    "IMAGE_EXTENSIONS",
    "Sample",
    "DataSource",
    "ImageDataset",
    "partition",
    "build_source",
    "source_for",
    "model_transform",
    "make_loader",
    "check_image_header",
]

log = logging.getLogger("jas_prune")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".jpeg2000")


@dataclass(frozen=True)
class Sample:
    """One image: a stable id (``shapes:eval:17`` or a path relative to the root) and its label."""

    id: str
    label: int
    ref: Any  # shapes index (int) or file path (str)


@dataclass
class DataSource:
    """A labelled image collection with its class names and per-class probe/test partition."""

    kind: str
    class_names: list[str]
    samples: list[Sample]
    probe: list[int] = field(default_factory=list)  # indices into samples
    test: list[int] = field(default_factory=list)
    seed: int = 0
    root: str | None = None
    #: ``data.probe_images_per_class``: probe images kept per class (None: all of the partition)
    probe_cap: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, part: str, classes: Sequence[int] | None = None) -> list[Sample]:
        """Samples of the ``probe``, ``test`` or ``all`` partition, optionally of some classes."""
        idx = {"probe": self.probe, "test": self.test, "all": range(len(self.samples))}[part]
        keep = None if classes is None else set(int(c) for c in classes)
        return [self.samples[i] for i in idx if keep is None or self.samples[i].label in keep]

    def selection_fingerprint(self) -> dict[str, Any]:
        """What identifies the images a run uses (for resume checks)."""
        import hashlib

        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.id}\t{s.label}\n".encode())
        h.update(("probe:" + ",".join(map(str, self.probe))).encode())
        out = {"kind": self.kind, "root": self.root, "seed": self.seed, "n": len(self.samples),
               "sha256": h.hexdigest()}
        if self.probe_cap is not None:  # absent when uncapped: fingerprints of older runs stay valid
            out["probe_images_per_class"] = self.probe_cap
        return out


def partition(labels: Sequence[int], probe_fraction: float, seed: int,
              probe_cap: int | None = None) -> tuple[list[int], list[int]]:
    """Split indices per class into probe/test: stratified, seeded, disjoint, covering.

    Each class with n >= 2 images gets round(probe_fraction * n) probe images, clamped so that
    both sides keep at least one image. ``probe_cap`` keeps only the first ``probe_cap`` of a
    class's probe images (in the seeded order, so a random subset of them); the test side is the
    same with or without it (the images left out are in neither).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probe: list[int] = []
    test: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E3779B9, int(c)]))
        idx = idx[rng.permutation(len(idx))]
        n_probe = int(round(probe_fraction * len(idx)))
        if len(idx) >= 2:
            n_probe = min(max(n_probe, 1), len(idx) - 1)
        probe.extend(int(i) for i in idx[:n_probe if probe_cap is None else min(n_probe, int(probe_cap))])
        test.extend(int(i) for i in idx[n_probe:])
    return sorted(probe), sorted(test)


def _first_classes(count: int | None, available: int) -> int:
    """``data.classes``: how many classes (the first ones, in label order) the run uses."""
    if count is None:
        return available
    if isinstance(count, bool) or int(count) < 1:
        raise DataError(f"data.classes: must be ≥ 1 (got {count!r})")
    if int(count) > available:
        raise DataError(f"data.classes: {count} exceeds the data set's {available} classes")
    return int(count)


def _shapes_source(seed: int, probe_fraction: float, images_per_class: int | None,
                   probe_cap: int | None = None, classes: int | None = None) -> DataSource:
    per_class = shapes.EVAL_PER_CLASS if images_per_class is None else int(images_per_class)
    n = per_class * shapes.NUM_CLASSES
    keep = _first_classes(classes, shapes.NUM_CLASSES)
    samples = [Sample(id=f"shapes:eval:{i}", label=shapes.label_of(i), ref=i) for i in range(n)
               if shapes.label_of(i) < keep]
    probe, test = partition([s.label for s in samples], probe_fraction, seed, probe_cap)
    return DataSource("shapes", list(shapes.CLASS_NAMES[:keep]), samples, probe, test, seed=seed, probe_cap=probe_cap)


def _imagefolder_source(root: str | None, seed: int, probe_fraction: float,
                        images_per_class: int | None, probe_cap: int | None = None,
                        first: int | None = None) -> DataSource:
    if not root:
        raise DataError("data.root: required when data.kind is 'imagefolder'")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"data.root: not a directory: {path}")
    if not path.is_dir():
        raise DataError(f"data.root: directory not found: {path}")
    hidden = [e.name for e in path.iterdir() if _hidden(e.name)]
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not _hidden(d.name))
    if not classes:
        raise DataError(f"data.root: no class folders in {path}")
    classes = classes[:_first_classes(first, len(classes))]
    _refuse_looping_links(path, classes)
    samples: list[Sample] = []
    listed: list[tuple[int, str, list[Path]]] = []
    for label, name in enumerate(classes):
        files, skipped = _class_images(path / name)
        hidden.extend(f"{name}/{s}" for s in skipped)
        listed.append((label, name, files))
    if hidden:
        log.info("data.root: skipped %d hidden entr%s (names starting with '.', e.g. %s) in %s",
                 len(hidden), "y" if len(hidden) == 1 else "ies", hidden[0], path)
    for label, name, files in listed:
        if not files:
            raise DataError(f"data.root: class folder '{name}' in {path} has no images")
        if images_per_class is not None:
            files = files[: int(images_per_class)]
        for f in files:
            check_image_header(f)
        samples.extend(Sample(id=str(f.relative_to(path)), label=label, ref=str(f)) for f in files)
    probe, test = partition([s.label for s in samples], probe_fraction, seed, probe_cap)
    names = [n.split("-", 1)[1] if n[:2].isdigit() and "-" in n else n for n in classes]
    return DataSource("imagefolder", names, samples, probe, test, seed=seed, root=str(path), probe_cap=probe_cap)


def _refuse_looping_links(root: Path, classes: Sequence[str]) -> None:
    """Refuse a class folder that is a link to the data root or a folder above it (``x -> .``):
    it would become a class holding every image of the data set."""
    top = root.resolve()
    for name in classes:
        folder = root / name
        if folder.is_symlink():
            target = folder.resolve()
            if target == top or target in top.parents:
                raise DataError(f"data.root: class folder '{name}' in {root} is a link to {target}, which holds the "
                                "data root itself (every image would be in that class); remove the link")


def _notice_single_images(source: DataSource) -> None:
    """Say which classes have a single image: it cannot be in both partitions, so the class gets
    no test image (or, with a small probe_fraction, no probe image)."""
    counts = np.bincount([s.label for s in source.samples], minlength=source.num_classes)
    single = [c for c in range(source.num_classes) if counts[c] == 1]
    if not single:
        return
    in_probe = {source.samples[i].label for i in source.probe}
    for side, what in (("probe", "no test image: its accuracy is not measured"),
                       ("test", "no probe image: it has no paths, masks or class-specific scores")):
        these = [c for c in single if (c in in_probe) == (side == "probe")]
        if these:
            log.warning("jas-prune: notice: %d class%s with a single image (e.g. '%s') %s only: %s",
                        len(these), "" if len(these) == 1 else "es", source.class_names[these[0]],
                        f"in the {side} partition", what)


def _hidden(name: str) -> bool:
    """Names starting with ``.`` are metadata, not data (``.DS_Store``, macOS ``._x.png``, ``.git``)."""
    return name.startswith(".")


def _class_images(folder: Path) -> tuple[list[Path], list[str]]:
    """The image files under a class folder (sorted) and the hidden entries skipped there.

    Hidden folders are not entered; a hidden entry is reported once, by its path relative to
    ``folder``. Like ``Path.rglob``, symlinked folders are not followed; symlinked files are.
    """
    files: list[Path] = []
    skipped: list[str] = []
    for top, dirs, names in os.walk(folder):
        rel = Path(top).relative_to(folder)
        skipped.extend((rel / d).as_posix() for d in dirs if _hidden(d))
        skipped.extend((rel / n).as_posix() for n in names if _hidden(n))
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        candidates = (Path(top) / n for n in names if not _hidden(n))
        files.extend(f for f in candidates if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    return sorted(files), sorted(skipped)


def build_source(kind: str, *, root: str | None = None, seed: int = 0, probe_fraction: float = 0.8,
                 images_per_class: int | None = None, probe_images_per_class: int | None = None,
                 classes: int | None = None) -> DataSource:
    """Build the evaluation collection of a recipe's ``data`` section.

    ``probe_images_per_class`` caps the probe partition (attribution, masks, criteria,
    calibration) without changing the test partition (see :func:`partition`). ``classes`` keeps
    the first N classes in label order (a model with an N-class head on the built-in data).
    """
    if probe_images_per_class is not None and (isinstance(probe_images_per_class, bool)
                                               or int(probe_images_per_class) < 1):
        raise DataError(f"data.probe_images_per_class: must be ≥ 1 (got {probe_images_per_class!r})")
    cap = None if probe_images_per_class is None else int(probe_images_per_class)
    if kind == "shapes":
        return _shapes_source(seed, probe_fraction, images_per_class, cap, classes)
    if kind == "imagefolder":
        source = _imagefolder_source(root, seed, probe_fraction, images_per_class, cap, classes)
        _notice_single_images(source)
        return source
    raise DataError(f"data.kind: unknown kind {kind!r} (expected 'shapes' or 'imagefolder')")


def source_for(data: Any, seed: int, *, cap_probe: bool = True) -> DataSource:
    """The data source a recipe's ``data`` section names, for ``runtime.seed`` = ``seed``: the one
    place the section's keys become :func:`build_source` arguments. ``cap_probe=False`` ignores
    ``data.probe_images_per_class`` (the whole probe partition, as ``bench_select`` needs)."""
    return build_source(data.kind, root=data.root, seed=seed, probe_fraction=data.probe_fraction,
                        images_per_class=data.images_per_class, classes=getattr(data, "classes", None),
                        probe_images_per_class=data.probe_images_per_class if cap_probe else None)


def model_transform(model: torch.nn.Module) -> Callable:
    """timm's eval preprocessing for ``model`` (``resolve_data_config`` + ``create_transform``)."""
    from timm.data import create_transform, resolve_data_config

    from .models import input_size

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = input_size(model)
    return create_transform(**cfg, is_training=False)


def check_image_header(path: str | os.PathLike[str]) -> None:
    """Refuse a file that Pillow cannot identify as an image (reads only its header).

    Raises:
        DataError: naming the file, e.g. an HTML error page or an empty file saved as ``.jpg``.
    """
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, DecompressionBombError
        raise DataError(f"data.root: cannot read image {path}: {_image_error(exc)}") from None


def _image_error(exc: BaseException) -> str:
    """Pillow's reason, on one line, without repeating the path."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify its format)"
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


class ImageDataset(Dataset):
    """Samples -> (image tensor, label, position in the list)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, shapes_seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.shapes_seed = shapes_seed

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, sample: Sample):
        from PIL import Image

        if isinstance(sample.ref, int):
            arr, _ = shapes.render(self.shapes_seed, "eval", sample.ref)
            return Image.fromarray(arr)
        try:
            with Image.open(sample.ref) as im:
                return im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt past its header
            raise DataError(f"data.root: cannot read image {sample.ref}: {_image_error(exc)}") from None

    def __getitem__(self, i: int):
        sample = self.samples[i]
        return self.transform(self.load_image(sample)), sample.label, i


def make_loader(samples: Sequence[Sample], transform: Callable, *, batch_size: int, workers: int = 0,
                seed: int = 0) -> DataLoader:
    """A deterministic (unshuffled) loader over samples."""
    ds = ImageDataset(samples, transform, shapes_seed=seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def default_workers() -> int:
    return 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) - 1)


def write_shapes_split(split: str, out: str | os.PathLike[str], *, seed: int = 0, probe_fraction: float = 0.8,
                       images_per_class: int | None = None, probe_images_per_class: int | None = None) -> int:
    """Write ``train``, ``probe`` or ``test`` of the shapes set as an ImageFolder of PNGs.

    Folder names sort in label order (``07-red-semicircle``); file names carry the image index.
    ``probe``/``test`` are exactly the partitions of a recipe with the same seed,
    ``probe_fraction``, ``images_per_class`` and ``probe_images_per_class``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .io import atomic_write

    out = Path(out)
    folders = shapes.class_folder_names()
    if split == "train":
        per_class = shapes.TRAIN_PER_CLASS if images_per_class is None else int(images_per_class)
        items = [(i, shapes.label_of(i)) for i in range(per_class * shapes.NUM_CLASSES)]
        render_split = "train"
    elif split in ("probe", "test"):
        source = _shapes_source(seed, probe_fraction, images_per_class, probe_images_per_class)
        items = [(s.ref, s.label) for s in source.subset(split)]
        render_split = "eval"
    else:
        raise DataError(f"--split: unknown split {split!r} (train, probe or test)")
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    for index, label in tqdm(items, desc=f"write shapes/{split}", mininterval=2):
        arr, _ = shapes.render(seed, render_split, index)
        atomic_write(out / folders[label] / f"{index:06d}.png",
                     lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
    return len(items)


#: ``data.images_per_class`` at most: the built-in data renders every image of the partition
#: (48 classes × 10 000 images is already a long run on a GPU)
IMAGES_PER_CLASS_MAX = 10_000


class DataSettings(Strict):
    """``data``: the built-in shapes or an ImageFolder, split into probe and test partitions
    (:func:`build_source`), and the loaders' batch size and workers."""

    kind: Literal["shapes", "imagefolder"] = "shapes"
    root: str | None = None
    probe_fraction: float = Field(default=0.8, gt=0.0, lt=1.0)
    images_per_class: int | None = Field(default=None, ge=2, le=IMAGES_PER_CLASS_MAX)
    #: probe images kept per class for attribution, masks, criteria and calibration; the test
    #: partition is the same with or without it (the images left out are used nowhere)
    probe_images_per_class: int | None = Field(default=None, ge=1, le=IMAGES_PER_CLASS_MAX)
    classes: int | None = Field(default=None, ge=1)  # the data set's first N classes (label order)
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DataSettings":
        if self.kind == "imagefolder" and not self.root:
            raise ValueError("root: required when kind is 'imagefolder'")
        return self
