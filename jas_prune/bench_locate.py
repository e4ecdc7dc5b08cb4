"""Benchmark of the JAS locating engine.

In one run, on the same random-init ViT and the same random images:

1. images/s of :func:`jas_prune.locate` (default settings: ``scope=cls``, ``formula=paper``,
   ``quadrature=left``, ``layer_scaled``, ``topk=1``) against a straightforward loop that follows the
   released code's structure — one image at a time, per layer a clean forward plus a forward over
   the m scaled rows, and a separate ``autograd.grad`` per path layer — and a check that both find
   identical paths;
2. ``gauss`` with few steps against ``left`` with 20: agreement of the picks and speed-up;
3. peak RSS of locating one 224-px image on a ViT-B/16-sized random-init model (in a subprocess,
   ``resource.getrusage``).

Run: ``OMP_NUM_THREADS=1 python -m jas_prune.bench_locate [--depth 12 --steps 20 --images 8]``.
No pretrained weights are used anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

from .locate import locate
from .models import discover_ffn

__all__ = ["random_vit", "released_loop_locate", "main"]


def random_vit(
    *,
    depth: int = 12,
    embed_dim: int = 64,
    num_heads: int = 2,
    img_size: int = 32,
    patch_size: int = 8,
    mlp_ratio: float = 4.0,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    timm_name: str = "vit_tiny_patch16_224",
) -> nn.Module:
    """A random-init timm ViT (no pretrained weights) whose output depends on the image.

    timm's default init (std 0.02) makes every logit ≈ 0 and the class token's output nearly
    image-independent, so gradients vanish and every image gets the same class. Here weights are
    ``N(0, gain²/fan_in)`` with a strong patch embedding (gain 3), peaky attention (q/k/v gain 3),
    small class/position tokens (std 0.1) and a sharp head (gain 3): predictions spread over the
    classes with max probabilities around 0.5–0.8, like a trained model's.
    """
    import timm

    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(
        timm_name, pretrained=False, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head."):
                if p.ndim < 2:
                    p.zero_()
                    continue
                scale = 3.0 / p.shape[-1] ** 0.5
            elif name in ("cls_token", "pos_embed", "reg_token"):
                scale = 0.1
            elif p.ndim >= 2:
                gain = 3.0 if name.startswith("patch_embed") or "qkv" in name else 1.0
                scale = gain / p[0].numel() ** 0.5
            elif "norm" in name and name.endswith("weight"):
                continue
            else:
                scale = 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.to(dtype).eval()


def released_loop_locate(model: nn.Module, images: Tensor, labels: Tensor, steps: int = 20) -> tuple[Tensor, Tensor]:
    """Alg. 1 written the way the released code is structured (the benchmark's baseline).

    One image at a time; for every layer a clean forward for that layer's class-token
    activation, the scaled inputs built as ``baseline + step·i`` (path neurons of earlier layers
    scaled, the rest clamped, the whole current layer scaled), one forward over the m rows, and
    a separate ``torch.autograd.grad(..., retain_graph=True)`` per path layer. Then the final
    path score. Parameters keep their ``requires_grad`` flags, as in the released code.

    Returns:
        ``(paths [B, L], jas [B])``.
    """
    info = discover_ffn(model)
    L, m = info.depth, steps
    all_paths, all_scores = [], []
    for b in range(images.shape[0]):
        x, label = images[b:b + 1], int(labels[b])
        path: list[int] = []
        path_ffn: list[Tensor] = []

        def clean_act(layer: int) -> Tensor:
            store: dict[str, Tensor] = {}
            h = info.layers[layer].act.register_forward_hook(
                lambda _m, _i, o: store.__setitem__("v", o[:, 0].detach().clone()))
            try:
                with torch.no_grad():
                    model(x)
            finally:
                h.remove()
            return store["v"]

        def scaled_forward(tmp: list[Tensor], upto: int) -> list[Tensor]:
            handles = []

            def make(t: Tensor) -> Any:
                def hook(_m: nn.Module, _i: Any, o: Tensor) -> Tensor:
                    o = o.clone()
                    o[:, 0] = t
                    return o

                return hook

            try:
                for l in range(upto + 1):
                    handles.append(info.layers[l].act.register_forward_hook(make(tmp[l])))
                logits = model(x.repeat(m, 1, 1, 1))
                prob = torch.softmax(logits, dim=1)[:, label]
                return [torch.autograd.grad(torch.unbind(prob), t, retain_graph=True)[0] for t in tmp]
            finally:
                for h in handles:
                    h.remove()

        def path_scaled(upto: int) -> tuple[list[Tensor], list[Tensor]]:
            ress, stps = [], []
            for l in range(upto):
                emb = path_ffn[l]
                base = emb.clone()
                base[0, path[l]] = 0
                step = (emb - base) / m
                ress.append(torch.cat([base + step * i for i in range(m)], 0).requires_grad_(True))
                stps.append(step)
            return ress, stps

        for tgt in range(L):
            emb = clean_act(tgt)
            step = emb / m
            scaled = torch.cat([step * i for i in range(m)], 0).requires_grad_(True)
            tmp, stps = path_scaled(tgt)
            grads = scaled_forward(tmp + [scaled], tgt)
            ja = grads[-1].sum(0)
            s = step[0]
            for l, p in enumerate(path):
                ja = ja + grads[l][:, p].sum()
                s = s + stps[l][0, p]
            ja = ja * s
            path.append(int(ja.argmax()))
            path_ffn.append(emb)
        tmp, stps = path_scaled(L)
        grads = scaled_forward(tmp, L - 1)
        g = sum(grads[l][:, path[l]].sum() for l in range(L))
        v = sum(stps[l][0, path[l]] for l in range(L))
        all_paths.append(path)
        all_scores.append(float(g * v))
    return torch.tensor(all_paths), torch.tensor(all_scores)


def _timed(fn: Any, repeats: int = 1) -> tuple[Any, float]:
    """Result of ``fn()`` and its best wall time over ``repeats`` runs."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _rss_child(args: argparse.Namespace) -> None:
    """Subprocess body: locate one 224-px image on a ViT-B/16-sized random-init model."""
    torch.manual_seed(0)
    model = random_vit(depth=12, embed_dim=768, num_heads=12, img_size=224, patch_size=16,
                       num_classes=1000, timm_name="vit_base_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res, sec = _timed(lambda: locate(model, x, torch.tensor([0]), steps=args.steps,
                                     layers=args.rss_layers, internal_batch_size=args.rss_ibs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "model_rss_mib": rss_model / 1024, "seconds": sec,
                      "layers": len(res.layers)}))


def _rss(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jas_prune.bench_locate", "--rss-child", "--steps", str(args.steps)]
    if args.rss_layers is not None:
        cmd += ["--rss-layers", str(args.rss_layers)]
    if args.rss_ibs is not None:
        cmd += ["--rss-ibs", str(args.rss_ibs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jas_prune.bench_locate", description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--gauss-steps", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--converged-steps", type=int, default=32,
                    help="gauss steps of the near-exact reference the picks are also compared with")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-rss", action="store_true", help="skip the ViT-B/16 peak-RSS measurement")
    ap.add_argument("--rss-layers", type=int, default=None, help="prefix depth located in the RSS run")
    ap.add_argument("--rss-ibs", type=int, default=None, help="internal_batch_size of the RSS run")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(args)
        return 0

    torch.manual_seed(args.seed)
    model = random_vit(depth=args.depth, embed_dim=args.embed_dim, num_heads=args.heads, img_size=args.img_size,
                       patch_size=args.patch_size, num_classes=args.classes, seed=args.seed).to(args.device)
    for p in model.parameters():
        p.requires_grad_(True)
    x = torch.randn(args.images, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, args.classes, (args.images,), device=args.device)
    B = args.images

    locate(model, x[:1], y[:1], steps=2, layers=2)  # warm-up
    rep = args.repeats
    (ref_paths, ref_jas), t_ref = _timed(lambda: released_loop_locate(model, x, y, steps=args.steps), rep)
    res, t_eng = _timed(lambda: locate(model, x, y, steps=args.steps), rep)
    eng_paths = res.paths[:, :, 0]
    same = int((eng_paths == ref_paths).all(1).sum())
    jas_rel = float(((res.jas - ref_jas).abs() / ref_jas.abs().clamp_min(1e-12)).max())

    conv, _ = _timed(lambda: locate(model, x, y, steps=args.converged_steps, quadrature="gauss"))

    def agree(r: Any, ref: Any) -> float:
        return float((r.paths == ref.paths).float().mean()) * 100

    rows = [
        ("released-structure loop (per image, backward per path layer)", f"left, {args.steps}", t_ref, "1.00×",
         "reference"),
        ("engine `locate` (batched, one grad per layer)", f"left, {args.steps}", t_eng, f"{t_ref / t_eng:.2f}×",
         f"{same}/{B} paths identical to the loop, max rel. ΔJAS {jas_rel:.1e}; "
         f"{agree(res, conv):.1f}% picks agree with gauss {args.converged_steps}"),
    ]
    for gs in args.gauss_steps:
        rg, t_g = _timed(lambda gs=gs: locate(model, x, y, steps=gs, quadrature="gauss"), rep)
        rows.append((f"engine `locate`, gauss {gs}", f"gauss, {gs}", t_g, f"{t_eng / t_g:.2f}× vs left {args.steps}",
                     f"{agree(rg, res):.1f}% picks agree with left {args.steps}; "
                     f"{agree(rg, conv):.1f}% with gauss {args.converged_steps}"))

    n_param = sum(p.numel() for p in model.parameters())
    print(f"\nModel: random-init timm ViT, depth {args.depth}, dim {args.embed_dim}, heads {args.heads}, "
          f"{args.img_size}px/{args.patch_size} ({(args.img_size // args.patch_size) ** 2 + 1} tokens), "
          f"FFN width {discover_ffn(model).widths[0]}, {n_param / 1e6:.2f} M params; {B} images; "
          f"device {args.device}; torch threads {torch.get_num_threads()}; best of {rep} runs\n")
    print(f"Picks compared over {B} images × {args.depth} layers; "
          f"gauss {args.converged_steps} is the near-exact quadrature of the same integral.\n")
    print("| run | quadrature, steps | seconds | images/s | speed-up | check |")
    print("|---|---|---:|---:|---:|---|")
    for name, q, t, sp, chk in rows:
        print(f"| {name} | {q} | {t:.2f} | {B / t:.3f} | {sp} | {chk} |")
    if not args.no_rss:
        r = _rss(args)
        print(f"\nPeak RSS, ViT-B/16-sized random-init model, 224 px, batch 1, steps {args.steps}, "
              f"{r['layers']} layers located"
              + (f", internal_batch_size {args.rss_ibs}" if args.rss_ibs else "") + ":\n")
        print("| peak RSS (MiB) | RSS after building the model (MiB) | locate seconds |")
        print("|---:|---:|---:|")
        print(f"| {r['peak_rss_mib']:.0f} | {r['model_rss_mib']:.0f} | {r['seconds']:.1f} |")
    return 0 if same == B else 1


if __name__ == "__main__":
    raise SystemExit(main())
