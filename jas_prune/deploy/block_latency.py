"""A measured latency table of a ViT's blocks: ONNX Runtime p50 of one block at a grid of widths,
as ZipLM measures its per-layer tables, for a latency budget split (:mod:`jas_prune.pruning.allocate`).

A block's time is modelled as ``attention(heads, head_dim) + ffn(width)``: its two residual
branches (``attn(norm1(x))`` and ``mlp(norm2(x))`` on ``[batch, tokens, embed]``) are exported
separately at every grid point and timed (p50 of ``iters`` runs after ``warmup``); between grid
points the time is interpolated linearly (FFN width) and bilinearly (heads × head dim), and made
non-decreasing in every width (a wider layer is never cheaper). What is outside the blocks
(patch embedding, final norm, head) is the whole dense model's p50 minus its blocks' table
values. Blocks of the same shape share one table.

The table is cached as JSON (``cache_dir/latency-<key>.json``), keyed by the block shape, tokens,
batch size, threads and provider: a resumed run reads it instead of measuring again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import warnings
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..io import atomic_write_json, read_json
from ..pruning.costs import BlockShape, CostTable, Geometry
from ..pruning.graph import find_vit
from .latency import benchmark_onnx, onnx_latency
from .sidecar import INPUT_NAME, OUTPUT_NAME

__all__ = ["LatencyTable", "grid", "resized_block"]

FORMAT = "jas-prune-block-latency/1"


def grid(n: int, points: int) -> list[int]:
    """``points`` widths from 1 to ``n`` (both included, about evenly spaced, distinct)."""
    if n <= points:
        return list(range(1, n + 1))
    return sorted({max(1, round(1 + i * (n - 1) / (points - 1))) for i in range(points)})


def resized_block(block: nn.Module, ffn: int, heads: int, head_dim: int) -> nn.Module:
    """A copy of a timm ViT block with ``ffn`` FFN neurons, ``heads`` heads of ``head_dim``
    (fresh random weights: only its time matters)."""
    b = copy.deepcopy(block)
    E = b.mlp.fc1.in_features
    b.mlp.fc1 = nn.Linear(E, ffn, bias=b.mlp.fc1.bias is not None)
    b.mlp.fc2 = nn.Linear(ffn, E, bias=b.mlp.fc2.bias is not None)
    a = b.attn
    A = heads * head_dim
    a.qkv = nn.Linear(E, 3 * A, bias=a.qkv.bias is not None)
    a.proj = nn.Linear(A, E, bias=a.proj.bias is not None)
    a.num_heads, a.head_dim = heads, head_dim
    if hasattr(a, "attn_dim"):
        a.attn_dim = A
    a.scale = head_dim ** -0.5
    return b.eval()


class _Branch(nn.Module):
    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm, self.body = norm, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


def _time(module: nn.Module, tokens: int, embed: int, batch: int, threads: int, providers: Sequence[str],
          warmup: int, iters: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="jas-prune-block-") as tmp:
        path = Path(tmp) / "branch.onnx"
        x = torch.randn(1, tokens, embed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                        OUTPUT_NAME: {0: "batch"}},
                              opset_version=17, do_constant_folding=True)
        rec = benchmark_onnx(path, batch_sizes=[batch], warmup=warmup, iters=iters, providers=providers,
                             threads=threads)[0]
    return float(rec["latency_ms_p50"]), str(rec["provider"])


def _monotone(xs: list[int], ys: list[float]) -> list[float]:
    """Non-decreasing in the width: each value at most every wider one's."""
    out = list(ys)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0] if len(xs) == 1 else ys[0] + (ys[1] - ys[0]) * (x - xs[0]) / (xs[1] - xs[0])
    i = min(bisect_left(xs, x), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass
class _ShapeTable:
    ffn_x: list[int]
    ffn_ms: list[float]
    heads_x: list[int]
    dims_x: list[int]
    attn_ms: list[list[float]]  # [heads][dims]

    def ffn(self, f: int) -> float:
        return _interp(self.ffn_x, self.ffn_ms, f)

    def attn(self, h: int, d: int) -> float:
        rows = [_interp(self.dims_x, row, d) for row in self.attn_ms]
        return _interp(self.heads_x, rows, h)


class LatencyTable:
    """ONNX Runtime p50 (ms) of the model as a function of its blocks' geometries
    (:class:`~jas_prune.pruning.costs.BlockCosts`): ``total(geometry)`` predicts the model's p50."""

    target = "latency_ms"

    def __init__(self, shapes: Mapping[int, BlockShape], tables: Mapping[str, _ShapeTable], rest: float,
                 dense: float, record: dict[str, Any]) -> None:
        self.shapes, self.tables, self.rest, self.dense, self.record = dict(shapes), dict(tables), rest, dense, record

    def block(self, index: int, geometry: Geometry) -> float:
        t = self.tables[_shape_key(self.shapes[index])]
        f, h, d = geometry
        return t.ffn(f) + t.attn(h, d)

    def total(self, geometry: Mapping[int, Geometry]) -> float:
        return self.rest + sum(self.block(b, geometry.get(b, s.geometry)) for b, s in self.shapes.items())

    @classmethod
    def measure(cls, model: nn.Module, *, batch_size: int = 1, threads: int | None = None,
                providers: Sequence[str] = ("cpu",), points: int = 5, warmup: int = 3, iters: int = 20,
                cache_dir: str | Path | None = None) -> "LatencyTable":
        """Measure (or read from ``cache_dir``) the table of ``model``'s blocks.

        Args:
            points: grid points per width axis (FFN width, heads, head dim).
            cache_dir: where the table is cached (e.g. the run directory's ``budget/``); None: not cached.
        """
        threads = int(threads) if threads is not None else torch.get_num_threads()
        vit, info = find_vit(model)
        shapes = CostTable.block_shapes(model)
        blocks = {l.index: l.block for l in info.layers}
        key = _cache_key(shapes, batch_size, threads, providers, points, iters)
        path = Path(cache_dir) / f"latency-{key}.json" if cache_dir is not None else None
        if path is not None and path.is_file():
            rec = read_json(path)
            if rec.get("format") == FORMAT:
                tables = {k: _ShapeTable(**v) for k, v in rec["tables"].items()}
                return cls(shapes, tables, rec["rest_ms"], rec["dense_ms"], {**rec["spec"], "cached": True})
        tables: dict[str, _ShapeTable] = {}
        provider = None
        for b, s in shapes.items():
            k = _shape_key(s)
            if k in tables:
                continue
            blk = blocks[b]
            ffn_x, heads_x, dims_x = grid(s.ffn, points), grid(s.heads, points), grid(s.head_dim, points)
            ffn_ms = []
            for f in ffn_x:
                r = resized_block(blk, f, s.heads, s.head_dim)
                ms, provider = _time(_Branch(r.norm2, r.mlp), s.tokens, s.embed, batch_size, threads, providers,
                                     warmup, iters)
                ffn_ms.append(ms)
            attn_ms = []
            for h in heads_x:
                row = []
                for d in dims_x:
                    r = resized_block(blk, s.ffn, h, d)
                    ms, provider = _time(_Branch(r.norm1, r.attn), s.tokens, s.embed, batch_size, threads,
                                         providers, warmup, iters)
                    row.append(ms)
                attn_ms.append(_monotone(dims_x, row))
            for j in range(len(dims_x)):  # non-decreasing in the heads too
                col = _monotone(heads_x, [attn_ms[i][j] for i in range(len(heads_x))])
                for i in range(len(heads_x)):
                    attn_ms[i][j] = col[i]
            tables[k] = _ShapeTable(ffn_x, _monotone(ffn_x, ffn_ms), heads_x, dims_x, attn_ms)
        whole = onnx_latency(model, batch_size, threads=threads, providers=providers, warmup=warmup, iters=iters)
        dense = float(whole["latency_ms_p50"])
        blocks_ms = sum(tables[_shape_key(s)].ffn(s.ffn) + tables[_shape_key(s)].attn(s.heads, s.head_dim)
                        for s in shapes.values())
        spec = {"batch_size": batch_size, "threads": threads, "provider": provider or whole.get("provider"),
                "points": points, "iters": iters, "key": key}
        table = cls(shapes, tables, dense - blocks_ms, dense, {**spec, "cached": False})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"format": FORMAT, "spec": spec, "dense_ms": dense, "rest_ms": dense - blocks_ms,
                                     "tables": {k: vars(t) for k, t in tables.items()}})
        return table


def _shape_key(s: BlockShape) -> str:
    return f"E{s.embed}-F{s.ffn}-H{s.heads}-d{s.head_dim}-T{s.tokens}"


def _cache_key(shapes: Mapping[int, BlockShape], batch: int, threads: int, providers: Sequence[str], points: int,
               iters: int) -> str:
    ident = json.dumps({"shapes": sorted(_shape_key(s) for s in shapes.values()), "blocks": len(shapes),
                        "batch": batch, "threads": threads, "providers": list(providers), "points": points,
                        "iters": iters, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]
