"""The atlas's pictures: model inputs re-read for the top images only, heatmap overlays, and one
figure per class laid out along its path (block 0 -> last).

Tiles show the model's own input (the eval transform's output, un-normalised), so the patch grid
of the heatmap lies exactly on the pixels the model saw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from ..data import ImageDataset, Sample

__all__ = ["input_images", "overlay", "png_bytes", "PathColumn", "class_path_figure"]

#: heatmap colour map and opacity over the image
CMAP, ALPHA = "inferno", 0.6
LEGEND = "heatmap: the neuron's activation per patch, dark = low, yellow = high (one scale per neuron)"


def _norm_stats(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return np.asarray(cfg["mean"], dtype=np.float32), np.asarray(cfg["std"], dtype=np.float32)


def input_images(model: nn.Module, samples: Sequence[Sample], positions: Sequence[int], transform: Any,
                 seed: int = 0) -> dict[int, np.ndarray]:
    """The model inputs of ``samples[p]`` for each of ``positions`` (only those are read), as RGB
    uint8 ``[H, W, 3]``."""
    mean, std = _norm_stats(model)
    ds = ImageDataset(samples, transform, shapes_seed=seed)
    out = {}
    for p in sorted(set(int(p) for p in positions if p >= 0)):
        x = ds[p][0].float().numpy().transpose(1, 2, 0)
        out[p] = (np.clip(x * std + mean, 0, 1) * 255).round().astype(np.uint8)
    return out


def overlay(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, size: int = 96) -> np.ndarray:
    """``image`` scaled to ``size`` with ``heat`` (``[rows, cols]`` patch activations, coloured on
    [vmin, vmax]) blended over it; patches stay visible as blocks."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    out_wh = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray(image).resize(out_wh, Image.NEAREST if scale >= 1 else Image.BILINEAR),
                      dtype=np.float32) / 255
    t = np.clip((np.asarray(heat, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgba = colormaps[CMAP](t)  # [rows, cols, 4]
    cell = np.asarray(Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).resize(out_wh, Image.NEAREST),
                      dtype=np.float32) / 255
    weight = np.asarray(Image.fromarray((t * 255).astype(np.uint8)).resize(out_wh, Image.NEAREST),
                        dtype=np.float32)[..., None] / 255
    a = ALPHA * (0.35 + 0.65 * weight)  # strong activations cover more of the image
    blend = (1 - a) * base + a * cell
    return (np.clip(blend, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class PathColumn:
    """One block of a class's path: its neuron, its top images and what to say about it."""

    label: str  # block:index
    tiles: list[np.ndarray] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib) at ``size`` pixels, else Pillow's default font."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def class_path_figure(path: str | Path, title: str, columns: Sequence[PathColumn], *, rows: int = 3,
                      tile: int = 128) -> Path | None:
    """A class's path neuron per block, left to right: label, its top ``rows`` images with the
    heatmap over them, then the lines (shares, the classes that use it most).

    Composed with Pillow, not matplotlib: one figure per class, so it has to be quick."""
    from PIL import Image, ImageDraw

    from ..io import atomic_write

    if not columns:
        return None
    cell, head, gap, line = tile + 28, 58, 8, 15
    text_h = line * (max(len(c.lines) for c in columns) + 1) + 14
    width, height = cell * len(columns) + 16, head + rows * (tile + gap) + text_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(11)
    draw.text((width // 2, 8), title, fill="black", font=big, anchor="ma")
    for j, col in enumerate(columns):
        x0 = 8 + j * cell
        draw.text((x0 + cell // 2, head - 8), ("→ " if j else "") + col.label, fill="black", font=big, anchor="ms")
        for r, t in enumerate(col.tiles[:rows]):
            im = Image.fromarray(t).resize((tile, tile), Image.NEAREST)
            y = head + r * (tile + gap)
            canvas.paste(im, (x0 + (cell - tile) // 2, y))
            draw.rectangle((x0 + (cell - tile) // 2 - 1, y - 1, x0 + (cell + tile) // 2, y + tile), outline="#444")
        for i, text in enumerate(col.lines):
            draw.text((x0 + cell // 2, head + rows * (tile + gap) + 4 + i * line), text, fill="#222", font=small,
                      anchor="ma")
    draw.text((width // 2, height - 6), LEGEND, fill="#555", font=small, anchor="md")
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
