"""Tiny models and brute-force references for tests and benchmarks (captum keeps its test models in
``captum/testing/helpers/basic_models.py``).

- :func:`random_vit` — a random-init timm ViT whose predictions depend on the image (timm's own
  init gives every image the same class), at any size from a 16-px toy to ViT-B/16.
- :func:`released_loop_locate` — Alg. 1 written the way the paper's released code is structured,
  one image at a time: the reference the engine's picks are tested against.
- :func:`meta_prune` — one step of Torch-Pruning's ``MetaPruner`` with an importance, as a
  Torch-Pruning user writes it (the plugin's reference usage).

Nothing here is used by the package itself; importing it costs what ``torch`` costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .models import discover_ffn

__all__ = ["random_vit", "released_loop_locate", "meta_prune"]


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
    """Alg. 1 written the way the released code is structured (the tests' reference for the picks).

    Not a timing reference: the released code batches ten images of one label, this loop takes one
    image at a time (about 2× slower); time against the real code with ``--released``. One image at a time; for every layer a clean forward for that layer's class-token
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


def meta_prune(model: nn.Module, importance: Any, ratio: float, **kwargs: Any) -> None:
    """Prune ``model`` (32-px inputs) in place by one ``tp.pruner.MetaPruner`` step with
    ``importance`` at ``pruning_ratio=ratio`` (``kwargs``: more MetaPruner arguments)."""
    import warnings

    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=importance, pruning_ratio=ratio,
                                      **kwargs)
        pruner.step()
