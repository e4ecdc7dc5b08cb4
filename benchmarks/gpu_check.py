"""The GPU check of jas-prune: what one CUDA GPU gives, measured in one run into one folder.

Run it through ``benchmarks/gpu_check.sh`` (which also installs the project without network and
runs the CUDA tests and the quickstart); alone::

    python benchmarks/gpu_check.py --device cuda --out gpu-check
    python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/gpu-check   # CI-sized rehearsal

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``:

1. ``builtin``: the paths of ``builtin:shapes-vit`` located on the device and on the CPU, fp32,
   same probe images: share of identical picks (ties broken differently by float rounding are
   the only expected difference) and max |ΔJAS|.
2. ``vit_b``: exact JAS (m = 20, all 12 blocks, paper settings) on a ViT-B/16 at 224 px in
   fp32, TF32 and bf16 (autocast, and bf16 weights = ``runtime.dtype: bfloat16``): images/s,
   the ``internal_batch_size`` chosen (the largest of a ladder that fits and runs fastest), peak
   GPU memory and the share of picks that agree with fp32. Random-init weights: a measure of
   cost, not of accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing (the GPU machine)
    sys.path.insert(0, str(REPO))

from jas_prune import LocateSettings, load_model, locate  # noqa: E402
from jas_prune.data import build_source, make_loader, model_transform  # noqa: E402

#: internal_batch_size ladder tried for ViT-B (rows of (image, step) per forward)
LADDER = (20, 40, 80, 160, 320, 640)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _precision(mode: str, device: torch.device) -> Iterator[None]:
    """fp32 (TF32 off), tf32 (TF32 matmuls), bf16 (autocast) for the block."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        if mode == "bf16-autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def builtin_agreement(device: torch.device, images: int, steps: int) -> dict[str, Any]:
    """Paths of the built-in model on ``device`` vs CPU (fp32, same images and settings)."""
    model = load_model("builtin:shapes-vit")
    source = build_source("shapes", seed=0, images_per_class=10)
    loader = make_loader(source.subset("probe")[:images], model_transform(model), batch_size=images)
    x, y, _ = next(iter(loader))
    s = LocateSettings(steps=steps)
    t0 = time.perf_counter()
    cpu = locate(model, x, y, s)
    t_cpu = time.perf_counter() - t0
    model.to(device)
    locate(model, x[:1], y[:1], s.replace(steps=2))  # warm-up (CUDA context, kernels)
    _sync(device)
    t0 = time.perf_counter()
    dev = locate(model, x, y, s)
    _sync(device)
    t_dev = time.perf_counter() - t0
    same = (cpu.paths == dev.paths).float().mean().item()
    return {"images": len(x), "steps": steps, "identical_picks": same,
            "identical_paths": float((cpu.paths == dev.paths).all(dim=(1, 2)).float().mean()),
            "max_abs_jas_diff": float((cpu.jas - dev.jas).abs().max()),
            "seconds_cpu": t_cpu, "seconds_device": t_dev}


def _vit_b(dry_run: bool) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    if dry_run:  # the same code path on a model a CPU runs in seconds
        return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=16,
                                 embed_dim=64, depth=2, num_heads=2).eval()
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def _time_locate(model, x, y, s: LocateSettings, mode: str, device: torch.device) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes) of one locate call under ``mode``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    with _precision(mode, device):
        t0 = time.perf_counter()
        res = locate(model, x, y, s)
        _sync(device)
        sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return res, sec, peak


def vit_b_exact_jas(device: torch.device, images: int, steps: int, dry_run: bool) -> dict[str, Any]:
    """Exact JAS images/s on ViT-B/16 at 224 px per precision, with the best internal batch size."""
    model = _vit_b(dry_run).to(device)
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, *size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (images,), generator=g).to(device)
    base = LocateSettings(steps=steps)
    ladder = LADDER[:2] if dry_run else LADDER
    out: dict[str, Any] = {"model": "vit_base_patch16_224" + (" (dry run: tiny)" if dry_run else ""),
                           "img_size": list(size), "images": images, "steps": steps, "precisions": {}}
    reference = None
    for mode in ("fp32", "tf32", "bf16-autocast", "bf16-weights"):
        m = model if mode != "bf16-weights" else _vit_b(dry_run).to(device, torch.bfloat16)
        xm = x.to(torch.bfloat16) if mode == "bf16-weights" else x
        run_mode = "fp32" if mode == "bf16-weights" else mode
        best: dict[str, Any] | None = None
        for ibs in ladder:  # the rows per forward that run fastest (larger ones stop at out-of-memory)
            s = base.replace(internal_batch_size=ibs)
            try:
                locate(m, xm[:1], y[:1], s.replace(steps=2, layers=1))  # warm-up
                res, sec, peak = _time_locate(m, xm, y, s, run_mode, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            cand = {"internal_batch_size": ibs, "seconds": sec, "images_per_second": images / sec,
                    "peak_gpu_mib": peak / 2**20, "paths": res.paths}
            if best is None or sec < best["seconds"]:
                best = cand
        if best is None:
            out["precisions"][mode] = {"error": "out of memory at the smallest internal_batch_size"}
            continue
        paths = best.pop("paths")
        if reference is None:
            reference = paths
        best["picks_agree_with_fp32"] = float((paths == reference).float().mean())
        out["precisions"][mode] = best
    return out


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# jas-prune GPU check ({result['device_name']})", "",
             f"torch {result['torch']}, CUDA {result['cuda']}, {result['python']}; "
             f"{'DRY RUN on a tiny model' if result['dry_run'] else 'ViT-B/16 at 224 px, random-init'}.", ""]
    b = result["builtin"]
    lines += ["## builtin:shapes-vit: device vs CPU (fp32)", "",
              f"{b['images']} probe images, {b['steps']} steps: identical picks {100 * b['identical_picks']:.2f} %, "
              f"identical whole paths {100 * b['identical_paths']:.2f} %, max |ΔJAS| {b['max_abs_jas_diff']:.2e}; "
              f"{b['seconds_cpu']:.2f} s on the CPU, {b['seconds_device']:.2f} s on the device.", ""]
    v = result["vit_b"]
    lines += [f"## Exact JAS on {v['model']} (m = {v['steps']}, {v['images']} images)", "",
              "| precision | images/s | internal_batch_size | peak GPU MiB | picks = fp32 |",
              "|---|---:|---:|---:|---:|"]
    for mode, r in v["precisions"].items():
        if "error" in r:
            lines.append(f"| {mode} | {r['error']} | | | |")
        else:
            lines.append(f"| {mode} | {r['images_per_second']:.2f} | {r['internal_batch_size']} | "
                         f"{r['peak_gpu_mib']:.0f} | {100 * r['picks_agree_with_fp32']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes: rehearse every step in seconds")
    ap.add_argument("--images", type=int, default=None, help="ViT-B images (default 32; dry run 2)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --device cpu --dry-run to rehearse)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "device": str(device), "dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    result["builtin"] = builtin_agreement(device, images=4 if args.dry_run else 64, steps=2 if args.dry_run else 20)
    result["vit_b"] = vit_b_exact_jas(device, images=args.images or (2 if args.dry_run else 32),
                                      steps=2 if args.dry_run else 20, dry_run=args.dry_run)
    result["seconds"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
