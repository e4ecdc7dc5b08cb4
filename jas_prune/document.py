"""A recipe's YAML document: read within bounds, ``--set`` overrides applied.

Torch-free on purpose: the command line reads and bounds a recipe before it imports the rest of
the package (PyTorch alone is seconds and hundreds of MB), so a hostile file — a "billion laughs"
document whose aliases expand exponentially, a 50 MB list, ``[[[[…`` nested thousands deep — is
refused at once. A recipe is a few dozen settings: a file above :data:`RECIPE_MAX_BYTES`, or a
document holding more than :data:`VALUES_MAX` values once its aliases are expanded, or nested
deeper than :data:`DEPTH_MAX`, is refused in time and memory bounded by those limits. The schema
itself is :mod:`jas_prune.recipe`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

__all__ = ["RECIPE_MAX_BYTES", "VALUES_MAX", "DEPTH_MAX", "read_document", "apply_overrides", "check_size",
           "check_flow_depth"]

#: the largest recipe file read
RECIPE_MAX_BYTES = 1 << 20
#: the most values (mapping keys, list items and scalars) a recipe may hold, aliases expanded
VALUES_MAX = 100_000
#: the deepest nesting of mappings and lists a recipe may have
DEPTH_MAX = 32


def check_size(data: Any, source: str) -> None:
    """Refuse a document with more than :data:`VALUES_MAX` values or deeper than :data:`DEPTH_MAX`
    (counted as if every alias were expanded; the walk stops at the limit)."""
    count, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > DEPTH_MAX:
            raise RecipeError(f"{source}: nested deeper than {DEPTH_MAX} levels; a recipe is a few dozen settings")
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node \
            if isinstance(node, list) else ()
        count += 1 + len(items)
        if count > VALUES_MAX:
            raise RecipeError(f"{source}: more than {VALUES_MAX} values once its YAML aliases are expanded; "
                              "a recipe is a few dozen settings")
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))


_FLOW = re.compile(r"""'[^'\n]*'|"(?:[^"\\\n]|\\.)*"|#[^\n]*|[\[\]{}]""")


def check_flow_depth(text: str, source: str) -> None:
    """Refuse ``[[[[…`` nested deeper than :data:`DEPTH_MAX` before the YAML parser sees it (its
    time grows with the square of the depth). Quoted strings and comments are skipped."""
    depth = 0
    for m in _FLOW.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > DEPTH_MAX:
                raise RecipeError(f"{source}: nested deeper than {DEPTH_MAX} levels; a recipe is a few dozen settings")
        elif c in "]}":
            depth = max(depth - 1, 0)


def _parse_value(text: str) -> Any:
    try:
        check_flow_depth(text, "--set")
        return yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        return text


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``KEY=VALUE`` overrides with dotted keys; values are parsed as YAML scalars/lists.

    Raises:
        RecipeError: for a malformed override.
    """
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. attribution.steps=8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item}: empty key segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def read_document(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe file's mapping with ``overrides`` applied, within the document limits (not yet
    validated against the schema: :func:`jas_prune.recipe.parse_recipe` does that).

    Raises:
        RecipeError: missing file, malformed YAML, a document beyond the limits.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        size = path.stat().st_size
        if size > RECIPE_MAX_BYTES:
            raise RecipeError(f"{path}: {size} bytes; a recipe file is at most {RECIPE_MAX_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
        check_flow_depth(text, str(path))
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested deeper than {DEPTH_MAX} levels; a recipe is a few dozen settings") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data or {}, overrides)
    check_size(data, str(path))
    return data
