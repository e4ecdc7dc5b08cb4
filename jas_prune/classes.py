"""The one class resolver: class names or indices -> sorted class indices, the names a model's
outputs carry, and the deterministic choice of a few classes to show (report figures, atlas).

Used for ``prune.classes``, ``JASImportance.from_run(classes=...)`` and a cut classifier head, so
that a class list means the same everywhere.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ClassSelectionError

__all__ = ["resolve_classes", "output_class_names", "choose_classes"]


def output_class_names(model, data_names: Sequence[str] | None = None) -> list[str] | None:
    """The one rule naming a model's outputs (checkpoints, ONNX sidecars, ``jas-prune export
    onnx``): the model's own names when it has them and they fit its head (a Hugging Face
    ``id2label``, the names a checkpoint carries: ``model.jas_class_names``), else the data set's
    (``data_names``: folder names without their ``NN-`` prefix, or the built-in class names).
    Recipe keys that name classes (``prune.classes``) and the report use the data set's names."""
    head = getattr(model, "jas_head_classes", None)
    count = int(getattr(model, "num_classes", 0) or 0)
    for names in (getattr(model, "jas_class_names", None), data_names):
        if names is not None and (len(names) > max(head) if head else len(names) == count):
            return [str(n) for n in names]
    return None


def resolve_classes(classes: Sequence[int | str] | int | str, class_names: Sequence[str] | int, *,
                    key: str = "classes") -> list[int]:
    """Sorted unique class indices.

    Args:
        classes: class names or indices (one, or a sequence). A string that is a class name is
            that class; any other string of digits is an index (so ``"3"`` from a command line
            works); integers are indices.
        class_names: the names of the classes in label order, or just their number when there
            are no names (then only indices are accepted).
        key: the setting the classes came from, for the message (``prune.classes``).

    Raises:
        ClassSelectionError: an empty list, or an entry that is not a class (naming it, the number
            of classes and an example name).
    """
    names = None if isinstance(class_names, int) else list(class_names)
    count = class_names if isinstance(class_names, int) else len(class_names)
    if isinstance(classes, (str, int)):
        classes = [classes]
    out: set[int] = set()
    for c in classes:
        idx: int | None = None
        if isinstance(c, str):
            if names is not None and c in names:
                idx = names.index(c)
            elif c.strip().isdigit():
                idx = int(c)
        elif not isinstance(c, bool):
            try:
                idx = operator.index(c)
            except TypeError:
                idx = None
        if idx is None or not 0 <= idx < count:
            example = f", e.g. {names[0]!r}" if names else ""
            raise ClassSelectionError(f"{key}: {c!r} is not a class of the data set ({count} classes{example})")
        out.add(idx)
    if not out:
        raise ClassSelectionError(f"{key}: must list at least one class (or be null for every class)")
    return sorted(out)


def choose_classes(counts: Sequence[int], similarity: Any = None, k: int = 4) -> list[int]:
    """A deterministic choice of ``k`` well-populated, mutually dissimilar classes.

    Candidates are the classes with at least the median number of probe images (of classes that
    have any). Start from the class with the most probe images (lowest index on ties), then add,
    one at a time, the candidate whose highest similarity to the chosen ones is lowest (ties: more
    images, then lower index). Without a similarity matrix: the ``k`` best-populated classes.
    """
    counts = np.asarray(counts, dtype=np.int64)
    have = np.flatnonzero(counts > 0)
    if have.size == 0:
        return []
    cand = [int(c) for c in have if counts[c] >= np.median(counts[have])]
    cand.sort(key=lambda c: (-counts[c], c))
    if similarity is None:
        return cand[:k]
    sim = np.asarray(similarity, dtype=np.float64)
    chosen = [cand[0]]
    while len(chosen) < min(k, len(cand)):
        rest = [c for c in cand if c not in chosen]
        chosen.append(min(rest, key=lambda c: (sim[c, chosen].max(), -counts[c], c)))
    return chosen
