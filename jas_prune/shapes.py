"""The built-in ``shapes`` data set: procedural shape x colour images, rendered with numpy only.

48 classes (8 shapes x 6 colours) with nuisances: position, scale, rotation, colour jitter, a
noisy tinted background with a gradient, and clutter of small shapes. Pixels depend only on
(seed, split, index): every machine renders the same bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "EVAL_PER_CLASS",
    "TRAIN_PER_CLASS",
    "BUILTIN_TRAINING",
    "SPLIT_IDS",
    "class_folder_names",
    "label_of",
    "render",
    "render_batch",
]

SHAPES: tuple[str, ...] = ("circle", "ring", "square", "frame", "triangle", "star", "cross", "semicircle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.16, 0.32, 0.96),
    "yellow": (0.96, 0.86, 0.12),
    "magenta": (0.86, 0.16, 0.86),
    "cyan": (0.10, 0.82, 0.86),
}
#: label = colour_index * len(SHAPES) + shape_index, named "<colour>-<shape>".
CLASS_NAMES: tuple[str, ...] = tuple(f"{c}-{s}" for c in COLOURS for s in SHAPES)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32
SUPERSAMPLE = 3
#: Images per class in the evaluation split (partitioned into probe/test) and the train split.
EVAL_PER_CLASS = 100
TRAIN_PER_CLASS = 1000
#: The documented recipe of ``builtin:shapes-vit`` (``jas-prune train`` uses these defaults); here,
#: beside its data, so that the command line shows them without importing PyTorch.
BUILTIN_TRAINING = {"seed": 0, "epochs": 32.0, "per_class": TRAIN_PER_CLASS, "batch_size": 128, "lr": 1e-3}
SPLIT_IDS = {"train": 0, "eval": 1}


def class_folder_names() -> list[str]:
    """ImageFolder names whose sorted order is label order, e.g. ``07-red-semicircle``."""
    return [f"{i:02d}-{n}" for i, n in enumerate(CLASS_NAMES)]


def label_of(index: int) -> int:
    """Labels cycle through the classes, so any prefix of a split is (nearly) balanced."""
    return int(index) % NUM_CLASSES


def _polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(px.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        crosses = (y1 > py) != (y0 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x0 - x1) * (py - y1) / (y0 - y1) + x1
        inside ^= crosses & (px < xint)
        x0, y0 = x1, y1
    return inside


def _regular(n: int, radius: float, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


_TRIANGLE = _regular(3, 0.98)
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular(5, 0.98)
_STAR[1::2] = _regular(5, 0.40, np.pi / 2 + np.pi / 5)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test in the shape's unit frame (the shape fits the unit disk)."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 0.85**2
    if shape == "ring":
        return (r2 <= 0.92**2) & (r2 >= 0.52**2)
    if shape == "square":
        return (np.abs(x) <= 0.66) & (np.abs(y) <= 0.66)
    if shape == "frame":
        outer = (np.abs(x) <= 0.70) & (np.abs(y) <= 0.70)
        inner = (np.abs(x) <= 0.36) & (np.abs(y) <= 0.36)
        return outer & ~inner
    if shape == "triangle":
        return _polygon(x, y, _TRIANGLE)
    if shape == "star":
        return _polygon(x, y, _STAR)
    if shape == "cross":
        return ((np.abs(x) <= 0.28) & (np.abs(y) <= 0.92)) | ((np.abs(y) <= 0.28) & (np.abs(x) <= 0.92))
    if shape == "semicircle":
        yy = y + 0.38
        return (x * x + yy * yy <= 0.95**2) & (yy >= 0.0)
    raise ValueError(f"unknown shape {shape!r}")


_GRID = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / (IMAGE_SIZE * SUPERSAMPLE)
_GX, _GY = np.meshgrid(_GRID, _GRID)


def _coverage(shape: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape at (cx, cy) with radius ``size`` (image units)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = (_GX - cx) / size, (_GY - cy) / size
    x, y = c * dx + s * dy, -s * dx + c * dy
    mask = _shape_mask(shape, x, y).astype(np.float64)
    n = IMAGE_SIZE
    return mask.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float]) -> np.ndarray:
    col = np.asarray(rgb) + rng.uniform(-0.07, 0.07, size=3)
    return np.clip(col * rng.uniform(0.82, 1.08), 0.0, 1.0)


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, int]:
    """Render one image.

    Returns:
        (uint8 array [32, 32, 3], label)
    """
    label = label_of(index)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))
    n = IMAGE_SIZE
    # background: dark tinted base, a linear gradient, pixel noise
    base = rng.uniform(0.05, 0.42) + rng.uniform(-0.06, 0.06, size=3)
    gdir = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(gdir) * (_GRID[None, ::SUPERSAMPLE] - 0.5) + np.sin(gdir) * (_GRID[::SUPERSAMPLE, None] - 0.5))
    img = base[None, None, :] + rng.uniform(0.0, 0.25) * grad[:, :, None]
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.07), size=(n, n, 3))
    # clutter: small shapes of any shape and colour (or grey), under the main object
    palette = list(COLOURS.values())
    for _ in range(int(rng.integers(1, 5))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if rng.random() < 0.3:
            colour = np.full(3, rng.uniform(0.3, 0.8))
        else:
            colour = _jitter_colour(rng, palette[int(rng.integers(len(palette)))])
        cov = _coverage(shape, rng.uniform(0.08, 0.92), rng.uniform(0.08, 0.92), rng.uniform(0.05, 0.09),
                        rng.uniform(0, 2 * np.pi))[:, :, None]
        img = img * (1 - cov) + colour * cov
    # main object
    colour_name = list(COLOURS)[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    size = rng.uniform(0.20, 0.34)
    cx, cy = rng.uniform(size * 0.8, 1 - size * 0.8, size=2)
    cov = _coverage(shape, cx, cy, size, rng.uniform(0, 2 * np.pi))[:, :, None]
    img = img * (1 - cov) + _jitter_colour(rng, COLOURS[colour_name]) * cov
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, label


def render_batch(seed: int, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
    """Render many images: (uint8 [N, 32, 32, 3], int64 labels [N])."""
    idx = list(indices)
    images = np.empty((len(idx), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(idx), dtype=np.int64)
    for j, i in enumerate(idx):
        images[j], labels[j] = render(seed, split, i)
    return images, labels
