"""Per-image locate results in a run's ``paths/`` folder: fixed chunks, written atomically,
guarded by a fingerprint of (model weights, data selection, attribution settings).

Chunk ``i`` always holds the same images (positions ``[i*size, (i+1)*size)`` of the partition),
so a resumed or sharded run skips finished chunks and never counts an image twice. A chunk file
appears only by an atomic rename of a finished write: a killed run leaves at most a ``.*.tmp``
file, which :meth:`PathStore.done` never takes for a chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import FingerprintMismatchError
from .io import atomic_write, atomic_write_json, read_json

__all__ = ["weights_digest", "PathStore", "LocatedImages"]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LocatedImages:
    """All stored chunks of a partition, concatenated in image order."""

    positions: torch.Tensor  # [N] position in the partition's sample list
    labels: torch.Tensor  # [N]
    targets: dict[str, torch.Tensor]  # method -> [N]
    probs: dict[str, torch.Tensor]  # method -> [N] clean F
    paths: dict[str, torch.Tensor]  # method -> [N, L, K]
    jas: dict[str, torch.Tensor]  # method -> [N]
    scores: dict[str, torch.Tensor]  # method -> [N, L, n] (stored as float16 x float32 scale)
    layers: list[int]
    ids: list[str]
    head_paths: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [N, L, Kh] (heads located)
    head_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [N, L, heads]


class PathStore:
    """A folder of chunks ``chunk-00000.safetensors`` plus ``fingerprint.json``."""

    def __init__(self, root: str | Path, *, chunk_size: int):
        self.root = Path(root)
        self.chunk_size = int(chunk_size)

    # -- fingerprint -----------------------------------------------------------------------
    def check_or_write_fingerprint(self, fingerprint: dict[str, Any], *, resume: bool) -> None:
        """Store the fingerprint, or on resume compare it part by part.

        Raises:
            FingerprintMismatchError: naming the part (model, data, attribution) that differs, or
                a damaged ``fingerprint.json`` (naming it and how to continue).
        """
        path = self.root / "fingerprint.json"
        fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples etc.
        if path.exists():
            old = self._read_fingerprint(path)
            differing = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
            if differing:
                if not resume:
                    raise FingerprintMismatchError(
                        f"{self.root}: holds results of a different run ({', '.join(differing)} differ)")
                detail = []
                for k in differing:
                    a, b = old.get(k), fingerprint.get(k)
                    if isinstance(a, dict) and isinstance(b, dict):
                        keys = [x for x in sorted(set(a) | set(b)) if a.get(x) != b.get(x)]
                        detail.append(f"{k} ({', '.join(f'{k}.{x}' for x in keys)})")
                    else:
                        detail.append(k)
                raise FingerprintMismatchError(
                    f"--resume {self.root.parent.parent}: the stored results were computed with a different "
                    f"{'; '.join(detail)}; use a new --out directory or restore the original settings")
            return
        atomic_write_json(path, fingerprint)

    def _read_fingerprint(self, path: Path) -> dict[str, Any]:
        """The stored fingerprint; a damaged one is refused: the finished chunks beside it can no
        longer be checked against the run, and only the user knows whether they still fit."""
        try:
            old = read_json(path)
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
            return old
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = " ".join(str(exc).split())[:120]
            n = len(list(self.root.glob("chunk-*.safetensors")))
            raise FingerprintMismatchError(
                f"{path}: damaged ({reason}), so the {n} finished chunk(s) beside it cannot be checked against "
                f"this run; if model, data and attribution settings are unchanged, delete that file and rerun "
                f"with --resume (the chunks are kept), else delete {self.root} to locate its images again") from None

    # -- chunks ----------------------------------------------------------------------------
    def chunk_path(self, i: int) -> Path:
        return self.root / f"chunk-{i:05d}.safetensors"

    def n_chunks(self, n_images: int) -> int:
        return (n_images + self.chunk_size - 1) // self.chunk_size

    def chunk_range(self, i: int, n_images: int) -> range:
        return range(i * self.chunk_size, min((i + 1) * self.chunk_size, n_images))

    def done(self, i: int) -> bool:
        return self.chunk_path(i).is_file()

    def pending(self, n_images: int) -> list[int]:
        """Chunks not written yet, in order (ranks under torchrun share them out)."""
        return [i for i in range(self.n_chunks(n_images)) if not self.done(i)]

    def damaged(self, i: int, ids: list[str]) -> str | None:
        """Why finished chunk ``i`` cannot be used (unreadable: truncated or overwritten; or it
        holds other images than ``ids``), or None when it can."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.chunk_path(i)), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["meta"])
                keys = set(f.keys())
        except Exception as exc:  # noqa: BLE001 - SafetensorError, KeyError, JSONDecodeError, OSError
            return " ".join(str(exc).split())[:160] or type(exc).__name__
        if not isinstance(meta, dict) or meta.get("ids") != list(ids):
            return "it holds other images than this chunk's"
        if not {"positions", "labels"} <= keys:
            return "tensors missing"
        return None

    def remove_damaged(self, ids_of: Callable[[int], list[str]], n_images: int) -> list[tuple[Path, str]]:
        """Delete finished chunks that cannot be used (see :meth:`damaged`), so that they are
        computed again; returns ``(path, reason)`` of each. The other chunks stay as they are.
        Call only while nothing writes here."""
        removed = []
        for i in range(self.n_chunks(n_images)):
            why = self.damaged(i, ids_of(i)) if self.done(i) else None
            if why is not None:
                self.chunk_path(i).unlink()
                removed.append((self.chunk_path(i), why))
        return removed

    def remove_partial(self) -> list[Path]:
        """Delete the temporary files of writes that never finished (a run killed mid-write).

        Finished chunks are only ever created by an atomic rename, so a ``.*.tmp`` file is never
        trusted; removing it just tidies the folder. Call only while nothing writes here.
        """
        removed = []
        for tmp in sorted(self.root.glob(".*.tmp")) if self.root.is_dir() else []:
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
        return removed

    def write_chunk(self, i: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        header = {"meta": json.dumps(meta)}
        return atomic_write(self.chunk_path(i), lambda tmp: save_file(data, tmp, metadata=header))

    def iter_chunks(self, n_images: int, *, scores: bool = True) -> Iterator[LocatedImages]:
        """Every chunk in image order, one at a time (memory bounded by one chunk); all of them
        must exist.

        Args:
            scores: also load the dense candidate scores (``[b, L, n]`` per method, by far the
                largest part); without them ``.scores`` is empty.

        Raises:
            FileNotFoundError: naming the first missing chunk.
        """
        from safetensors import safe_open

        missing = [i for i in range(self.n_chunks(n_images)) if not self.done(i)]
        if missing:
            raise FileNotFoundError(f"{self.root}: {len(missing)} chunk(s) missing, first {missing[0]}")
        for i in range(self.n_chunks(n_images)):
            with safe_open(str(self.chunk_path(i)), framework="pt") as f:
                meta = json.loads(f.metadata()["meta"])
                t = {k: f.get_tensor(k) for k in f.keys()
                     if scores or not k.startswith(("scores.", "scale.", "head_scores.", "head_scale."))}
            yield self._located(t, meta["ids"], meta["layers"])

    def read(self, n_images: int, *, scores: bool = True) -> LocatedImages:
        """All chunks concatenated (see :meth:`iter_chunks`; prefer it when the dense scores of
        a large partition need not be in memory at once)."""
        chunks = list(self.iter_chunks(n_images, scores=scores))
        cat = lambda get: {k: torch.cat([get(c)[k] for c in chunks]) for k in get(chunks[0])}  # noqa: E731
        return LocatedImages(
            positions=torch.cat([c.positions for c in chunks]), labels=torch.cat([c.labels for c in chunks]),
            targets=cat(lambda c: c.targets), probs=cat(lambda c: c.probs), paths=cat(lambda c: c.paths),
            jas=cat(lambda c: c.jas), scores=cat(lambda c: c.scores), layers=chunks[0].layers,
            ids=[i for c in chunks for i in c.ids], head_paths=cat(lambda c: c.head_paths),
            head_scores=cat(lambda c: c.head_scores))

    @staticmethod
    def _located(t: dict[str, torch.Tensor], ids: list[str], layers: list[int]) -> LocatedImages:
        def by_method(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}

        def dense(kind: str) -> dict[str, torch.Tensor]:
            scales = by_method(f"{kind}scale.")
            return {m: s.float() * scales[m][:, :, None] for m, s in by_method(f"{kind}scores.").items()}

        return LocatedImages(positions=t["positions"], labels=t["labels"], targets=by_method("targets."),
                             probs=by_method("probs."), paths=by_method("paths."), jas=by_method("jas."),
                             scores=dense(""), layers=list(layers), ids=list(ids),
                             head_paths=by_method("head_paths."), head_scores=dense("head_"))

    @staticmethod
    def chunk_tensors(positions: Iterable[int], labels: torch.Tensor, results: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Flatten per-method LocateResults into named chunk tensors."""
        out = {"positions": torch.as_tensor(list(positions), dtype=torch.long), "labels": labels.long().cpu()}
        for method, r in results.items():
            out[f"paths.{method}"] = r.paths.long().cpu()
            out[f"jas.{method}"] = r.jas.float().cpu()
            out[f"targets.{method}"] = r.targets.long().cpu()
            out[f"probs.{method}"] = r.probs.float().cpu()
            if r.scores:
                out.update(PathStore._scaled(r.scores, method, ""))
            if getattr(r, "head_paths", None) is not None:  # attribution.units with heads
                out[f"head_paths.{method}"] = r.head_paths.long().cpu()
                out.update(PathStore._scaled(r.head_scores, method, "head_"))
        return out

    @staticmethod
    def _scaled(scores: list[torch.Tensor], method: str, kind: str) -> dict[str, torch.Tensor]:
        dense = torch.stack([s.float().cpu() for s in scores], dim=1)  # [b, L, n]
        # float16 with a float32 scale per (image, layer): no underflow of tiny scores
        scale = dense.abs().amax(dim=2).clamp_min(torch.finfo(torch.float32).tiny)
        return {f"{kind}scores.{method}": (dense / scale[:, :, None]).to(torch.float16), f"{kind}scale.{method}": scale}
