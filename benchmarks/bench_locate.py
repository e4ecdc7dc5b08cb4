"""Benchmark of the JAS locating engine.

In one run, on the same random-init ViT and the same random images, with interleaved repeats:

1. images/s of :func:`jas_prune.locate` (default settings: ``scope=cls``, ``formula=paper``,
   ``quadrature=left``, ``layer_scaled``, ``topk=1``) against the paper's released code
   (``--released PATH``: your own checkout of github.com/foundation-model-research/NeuronPath with
   its requirements importable — its ``VisionTransformer`` gets this model's weights, and its
   per-batch locating is driven exactly as its ``path/joint_attr.py`` does, ten images of one label
   per batch, the baseline path scored too), and/or a loop that follows the released code's
   structure one image at a time (``--loop``); a check that the paths are identical; and the
   engine's own variants (``path_mode=reverse`` — the engine before the kept-stream route —, the
   kept stream without the one-matmul tangent rule of ``nn.Linear``) for a per-optimisation
   breakdown;
2. ``gauss`` with few steps against ``left`` with 20: agreement of the picks and speed-up;
3. peak RSS of locating one 224-px image on a ViT-B/16-sized random-init model (in a subprocess,
   ``resource.getrusage``).

Run: ``python -m benchmarks.bench_locate [--released ~/src/NeuronPath] [--depth 12 --steps 20
--images 10]``. No pretrained weights are used anywhere; nothing of the released code is shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from jas_prune.attribution import engine as _engine
from jas_prune.attribution import JointAttribution, locate
from jas_prune.models import discover_ffn
from jas_prune.testing import random_vit, released_loop_locate

__all__ = ["load_released", "released_vit", "released_locate", "main"]


def load_released(path: str) -> tuple[ModuleType, ModuleType]:
    """Import a checkout of the released code: ``models.modeling`` and ``path/joint_attr.py``.

    Needs the checkout's own requirements (scipy, ml_collections, jsonlines, torchvision).
    """
    root = os.path.abspath(os.path.expanduser(path))
    for sub in (root, os.path.join(root, "path")):
        if sub not in sys.path:
            sys.path.insert(0, sub)
    import importlib

    return importlib.import_module("models.modeling"), importlib.import_module("joint_attr")


def released_vit(modeling: ModuleType, model: nn.Module) -> nn.Module:
    """The released code's ``VisionTransformer`` carrying the weights of a timm ViT (class token,
    ``fc1 -> GELU -> fc2`` blocks, LayerNorm ε 1e-6, fused ``qkv`` split into query/key/value)."""
    D, blocks = model.embed_dim, model.blocks
    patch = model.patch_embed.patch_size
    cfg = SimpleNamespace(
        hidden_size=D, classifier="token", patches={"size": tuple(patch)},
        transformer={"mlp_dim": blocks[0].mlp.fc1.out_features, "num_heads": blocks[0].attn.num_heads,
                     "num_layers": len(blocks), "attention_dropout_rate": 0.0, "dropout_rate": 0.0})
    img = model.patch_embed.img_size
    rm = modeling.VisionTransformer(cfg, img[0], num_classes=model.head.out_features)
    with torch.no_grad():
        emb = rm.transformer.embeddings
        emb.patch_embeddings.load_state_dict(model.patch_embed.proj.state_dict())
        emb.cls_token.copy_(model.cls_token)
        emb.position_embeddings.copy_(model.pos_embed)
        for rb, tb in zip(rm.transformer.encoder.layer, blocks):
            rb.attention_norm.load_state_dict(tb.norm1.state_dict())
            rb.ffn_norm.load_state_dict(tb.norm2.state_dict())
            for i, lin in enumerate((rb.attn.query, rb.attn.key, rb.attn.value)):
                lin.weight.copy_(tb.attn.qkv.weight[i * D:(i + 1) * D])
                lin.bias.copy_(tb.attn.qkv.bias[i * D:(i + 1) * D])
            rb.attn.out.load_state_dict(tb.attn.proj.state_dict())
            rb.ffn.fc1.load_state_dict(tb.mlp.fc1.state_dict())
            rb.ffn.fc2.load_state_dict(tb.mlp.fc2.state_dict())
        rm.transformer.encoder.encoder_norm.load_state_dict(model.norm.state_dict())
        rm.head.load_state_dict(model.head.state_dict())
    return rm.to(next(model.parameters()).device).eval()


def released_locate(rm: nn.Module, joint_attr: ModuleType, images: Tensor, label: int,
                    steps: int = 20) -> tuple[Tensor, Tensor]:
    """One batch through the released code's locating, driven as its ``joint_attr.py`` main loop
    drives it: per layer its clean forward, its ``scaled_input`` / ``path_scaled_input``, its
    forward with ``tmp_score`` (which takes one ``autograd.grad`` per edited layer), argmax of
    (Σ_k grads) × step; then its ``j_a_score`` of the path and of the baseline (argmax activation)
    path. The whole batch uses one label (the released code takes ``y[0]``).

    Returns:
        ``(paths [B, L], jas [B])``.
    """
    L, B, m = len(rm.transformer.encoder.layer), images.shape[0], steps
    path_ffn: list[Tensor] = []
    path: list[list[int]] = []
    base_path: list[list[int]] = []
    for t in range(L):
        _, _, ffn = rm(images, tgt_layer=t)
        base_path.append(torch.argmax(ffn, dim=-1).tolist())
        scaled, step = joint_attr.scaled_input(ffn, m)
        tmp, tmp_steps = joint_attr.path_scaled_input(path_ffn, path, m)
        for w in [*tmp, scaled]:
            w.requires_grad_(True)
        tmp.append(scaled)
        tmp_steps.append(step)
        _, grads = rm(images, tgt_layer=t, tmp_score=tmp, tgt_label=label)
        g = [gr.reshape(m, B, -1) for gr in grads]
        ja, v = g[-1], tmp_steps[-1]
        for l, p in enumerate(path):
            idx = torch.tensor(p, device=images.device)[:, None]
            ja = ja + g[l].gather(2, idx[None].expand(m, -1, -1))
            v = v + tmp_steps[l].gather(1, idx)
        path.append(torch.argmax(ja.sum(0) * v, dim=-1).tolist())
        path_ffn.append(ffn)
    args = SimpleNamespace(ig_total_step=m, batch_size=B)
    scores = []
    for p in (path, base_path):
        tmp, tmp_steps = joint_attr.path_scaled_input(path_ffn, p, m)
        for w in tmp:
            w.requires_grad_(True)
        _, grads = rm(images, tgt_layer=L - 1, tmp_score=tmp, tgt_label=label)
        scores.append(joint_attr.j_a_score(args, p, grads, tmp_steps).detach()[:, 0])
    return torch.tensor(path).T, scores[0]


@contextlib.contextmanager
def _plain_linear_tangents() -> Iterator[None]:
    """The engine without its one-matmul ``nn.Linear`` tangent rule (for the breakdown)."""
    saved = _engine._linear_tangents
    _engine._linear_tangents = lambda modules: contextlib.nullcontext()
    try:
        yield
    finally:
        _engine._linear_tangents = saved


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Each run's result and wall times, the runs taking turns ``repeats`` times."""
    out: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(max(1, repeats)):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return out, times


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
    cmd = [sys.executable, "-m", "benchmarks.bench_locate", "--rss-child", "--steps", str(args.steps)]
    if args.rss_layers is not None:
        cmd += ["--rss-layers", str(args.rss_layers)]
    if args.rss_ibs is not None:
        cmd += ["--rss-ibs", str(args.rss_ibs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_locate", description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--released", metavar="PATH", default=None,
                    help="a checkout of github.com/foundation-model-research/NeuronPath to time side by side")
    ap.add_argument("--released-batch", type=int, default=10,
                    help="images per batch of the released code (its default 10; one label per batch)")
    ap.add_argument("--loop", action="store_true", help="also time the released-structure loop (one image at a time)")
    ap.add_argument("--gauss-steps", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--converged-steps", type=int, default=32,
                    help="gauss steps of the near-exact reference the picks are also compared with")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median time is reported")
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
        p.requires_grad_(True)  # as the released code leaves them; the engine freezes them per call
    B, rb, m = args.images, min(args.released_batch, args.images), args.steps
    x = torch.randn(B, 3, args.img_size, args.img_size, device=args.device)
    # one label per released batch: the released code scores a whole batch against its first label
    batch_labels = torch.randint(0, args.classes, ((B + rb - 1) // rb,))
    y = batch_labels.repeat_interleave(rb)[:B].to(args.device)

    runs: dict[str, Callable[[], Any]] = {}
    if args.released:
        modeling, joint_attr = load_released(args.released)
        rm = released_vit(modeling, model)

        def run_released() -> tuple[Tensor, Tensor]:
            parts = [released_locate(rm, joint_attr, x[i:i + rb], int(y[i]), m) for i in range(0, B, rb)]
            return torch.cat([p for p, _ in parts]), torch.cat([j for _, j in parts])

        runs["released"] = run_released
    if args.loop:
        runs["loop"] = lambda: released_loop_locate(model, x, y, steps=m)
    runs["reverse"] = lambda: JointAttribution(model, path_mode="reverse").attribute(x, y, steps=m)

    def run_plain() -> Any:
        with _plain_linear_tangents():
            return JointAttribution(model).attribute(x, y, steps=m)

    runs["plain"] = run_plain
    runs["engine"] = lambda: locate(model, x, y, steps=m)

    locate(model, x[:1], y[:1], steps=2, layers=2)  # warm-up
    load0 = os.getloadavg()
    out, times = _interleaved(runs, args.repeats)
    load1 = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = "released" if args.released else ("loop" if args.loop else "reverse")

    def ratio(name: str) -> str:
        per = [a / b for a, b in zip(times[ref], times[name])]
        return f"{statistics.median(per):.2f}× ({min(per):.2f}–{max(per):.2f})"

    res = out["engine"]
    eng_paths = res.paths[:, :, 0]

    def same(paths: Tensor) -> int:
        return int((paths == eng_paths).all(1).sum())

    conv = locate(model, x, y, steps=args.converged_steps, quadrature="gauss")

    def agree(r: Any, other: Any) -> float:
        return float((r.paths == other.paths).float().mean()) * 100

    names = {
        "released": f"released code (its model and loop, batches of {rb}, one label each)",
        "loop": "released-structure loop (one image at a time)",
        "reverse": "engine, path_mode=reverse (the engine before this change)",
        "plain": "engine, kept stream + forward-mode, stock nn.Linear tangent",
        "engine": "engine `locate` (kept stream + forward-mode, one-matmul nn.Linear tangent)",
    }
    rows = []
    for name in runs:
        r = out[name]
        paths = r[0] if isinstance(r, tuple) else r.paths[:, :, 0]
        check = f"{same(paths)}/{B} paths identical to the engine's"
        if name == "engine":
            check += f"; {agree(res, conv):.1f}% picks agree with gauss {args.converged_steps}"
        rows.append((names[name], f"left, {m}", med[name], ratio(name) if name != ref else "1.00×", check))
    for gs in args.gauss_steps:
        rg, t_g = _timed(lambda gs=gs: locate(model, x, y, steps=gs, quadrature="gauss"), args.repeats)
        rows.append((f"engine `locate`, gauss {gs}", f"gauss, {gs}", t_g, f"{med['engine'] / t_g:.2f}× vs left {m}",
                     f"{agree(rg, res):.1f}% picks agree with left {m}; {agree(rg, conv):.1f}% with gauss "
                     f"{args.converged_steps}"))

    n_param = sum(p.numel() for p in model.parameters())
    print(f"\nModel: random-init timm ViT, depth {args.depth}, dim {args.embed_dim}, heads {args.heads}, "
          f"{args.img_size}px/{args.patch_size} ({(args.img_size // args.patch_size) ** 2 + 1} tokens), "
          f"FFN width {discover_ffn(model).widths[0]}, {n_param / 1e6:.2f} M params; {B} images; "
          f"device {args.device}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after; median of {args.repeats} interleaved runs, "
          f"speed-up vs {ref}: median (min–max) of the per-repeat ratios\n")
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
    ok = all(same(r[0] if isinstance(r, tuple) else r.paths[:, :, 0]) == B for r in out.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
