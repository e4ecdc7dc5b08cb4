#!/usr/bin/env python3
"""Classify images with an ONNX model exported by jas-prune — onnxruntime, numpy and Pillow only.

Usage::

    python export/predict.py MODEL.onnx IMAGE [IMAGE ...] [--top 5] [--providers cuda cpu]

Preprocessing comes from the sidecar ``MODEL.json`` written beside the ONNX file (the same
steps as timm's eval transform): resize so the crop is ``crop_pct`` of the image (shorter side
to ``size / crop_pct`` for ``crop_mode: center``), center crop to the input size, scale to
[0, 1] and normalise with the sidecar mean/std. For a class-specialised model the printed label
is the original label (``label_mapping``).

Nothing runs on a model that does not match its sidecar: a sidecar that is not valid JSON or
lacks a field, an ONNX file whose size or SHA-256 differs from the one the sidecar records, a
file onnxruntime cannot load, or a model whose input/output does not fit the sidecar is refused
with one line on stderr and exit code 2; so is a model whose output is not finite (NaN or Inf).
INT8 and float16 copies (``MODEL.int8_static.onnx`` ...) run the same way with their own sidecar.

This file imports nothing from jas-prune or torch, so it can be copied next to a model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_session  # noqa: E402
from ort_session import DeployError  # noqa: E402

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_sidecar(model: Path, sidecar: Path | None = None) -> dict[str, Any]:
    """The sidecar JSON (``MODEL.json`` beside ``MODEL.onnx`` unless given), checked.

    Raises:
        DeployError: missing, not JSON, a field missing or malformed, or an interpolation or
            crop mode this script does not know.
    """
    side = ort_session.load_sidecar(model, sidecar)
    _check_preprocessing(side, sidecar or ort_session.sidecar_path(model))
    return side


def _check_preprocessing(side: dict[str, Any], path: Path) -> None:
    interp = side.get("interpolation", "bilinear")
    if interp not in _INTERPOLATION:
        raise DeployError(f"sidecar {path}: field 'interpolation' must be one of {', '.join(_INTERPOLATION)}, "
                          f"not {interp!r}; {ort_session.ADVICE}")
    mode = side.get("crop_mode") or "center"
    if mode not in ("center", "squash", "border"):
        raise DeployError(f"sidecar {path}: field 'crop_mode' must be center, squash or border, not {mode!r}; "
                          f"{ort_session.ADVICE}")


def _resize(img: Image.Image, size_hw: tuple[int, int], interp: int) -> Image.Image:
    h, w = size_hw
    return img if img.size == (w, h) else img.resize((w, h), interp)


def _center_crop_or_pad(img: Image.Image, h: int, w: int, fill: tuple[int, ...]) -> Image.Image:
    iw, ih = img.size
    if w > iw or h > ih:
        canvas = Image.new(img.mode, (max(w, iw), max(h, ih)), fill)
        canvas.paste(img, ((w - iw) // 2 if w > iw else 0, (h - ih) // 2 if h > ih else 0))
        img = canvas
        iw, ih = img.size
        if (iw, ih) == (w, h):
            return img
    top = int(round((ih - h) / 2.0))
    left = int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def _keep_ratio_size(img: Image.Image, target_hw: tuple[int, int], longest: float) -> tuple[int, int]:
    iw, ih = img.size
    ratio_h, ratio_w = ih / target_hw[0], iw / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(ih / ratio), round(iw / ratio)


def preprocess(image: Image.Image, sidecar: dict[str, Any]) -> np.ndarray:
    """One image -> float32 ``[C, H, W]``, as timm's eval transform does it."""
    _, h, w = (int(v) for v in sidecar["input_size"])
    crop_pct = float(sidecar.get("crop_pct") or 0.875)
    mode = sidecar.get("crop_mode") or "center"
    interp = _INTERPOLATION[str(sidecar.get("interpolation", "bilinear"))]
    mean = np.asarray(sidecar["mean"], dtype=np.float32)
    std = np.asarray(sidecar["std"], dtype=np.float32)
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    img = image.convert("RGB")
    if mode == "squash":
        img = _center_crop_or_pad(_resize(img, scale, interp), h, w, (0, 0, 0))
    elif mode == "border":
        img = _resize(img, _keep_ratio_size(img, scale, 1.0), interp)
        img = _center_crop_or_pad(img, h, w, tuple(round(255 * float(v)) for v in mean))
    else:
        if scale[0] == scale[1]:  # shorter side to scale, as torchvision's Resize(int)
            iw, ih = img.size
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_short, new_long = scale[0], int(scale[0] * long / short)
            new_w, new_h = (new_short, new_long) if iw <= ih else (new_long, new_short)
            img = _resize(img, (new_h, new_w), interp)
        else:
            img = _resize(img, _keep_ratio_size(img, scale, 0.0), interp)
        img = _center_crop_or_pad(img, h, w, (0, 0, 0))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(session: ort.InferenceSession, sidecar: dict[str, Any], images: Sequence[Path],
            top: int = 5, batch_size: int = 32) -> list[list[tuple[int, float]]]:
    """Top-``top`` (head index, probability) pairs for each image."""
    input_name = sidecar.get("input_name", "pixel_values")
    output_name = sidecar.get("output_name", "logits")
    results: list[list[tuple[int, float]]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays = []
        for path in chunk:
            try:
                with Image.open(path) as im:
                    arrays.append(preprocess(im, sidecar))
            except OSError as exc:  # not an image, truncated, unreadable
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise DeployError(f"cannot read image {path}: {reason[:300]}") from None
        logits = session.run([output_name], {input_name: np.stack(arrays)})[0]
        if not np.isfinite(logits).all():
            bad = [str(p) for p, row in zip(chunk, logits) if not np.isfinite(row).all()]
            raise DeployError(f"the model's output is not finite (NaN or Inf) for {len(bad)} image(s), e.g. "
                              f"{bad[0]}: the model's weights are damaged; re-export it")
        probs = softmax(logits)
        k = min(top, probs.shape[1])
        for row in probs:
            idx = np.argsort(-row, kind="stable")[:k]
            results.append([(int(i), float(row[i])) for i in idx])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the exported .onnx file")
    ap.add_argument("images", type=Path, nargs="+", help="image files")
    ap.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    ap.add_argument("--providers", nargs="+", default=["cuda", "cpu"],
                    help="onnxruntime providers in order of preference (default: cuda cpu)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sidecar", type=Path, default=None, help="sidecar JSON (default: MODEL.json)")
    args = ap.parse_args(argv)

    try:
        if not args.model.is_file():
            raise DeployError(f"model file not found: {args.model}")
        missing = [str(p) for p in args.images if not p.is_file()]
        if missing:
            raise DeployError("image not found: " + ", ".join(missing))
        session, sidecar = ort_session.open_model(args.model, args.sidecar, providers=args.providers,
                                                  threads=args.threads, validate=_check_preprocessing)
        results = predict(session, sidecar, args.images, top=args.top, batch_size=args.batch_size)
    except DeployError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    names = sidecar.get("class_names") or []
    mapping = sidecar.get("label_mapping")
    precision = f" ({sidecar['precision']})" if sidecar.get("precision") else ""  # INT8 / float16 copies
    print(f"# {args.model.name}{precision} on {session.get_providers()[0]}")
    for path, top in zip(args.images, results):
        print(path)
        for rank, (idx, p) in enumerate(top, 1):
            name = names[idx] if idx < len(names) else f"class_{idx}"
            label = mapping[idx] if mapping else idx
            print(f"  {rank}. {p:8.4f}  {name}  (label {label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
