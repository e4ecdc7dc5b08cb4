"""The strict-schema base every settings class derives from, and the one place pydantic's
validation errors become one line naming the setting's YAML path.

A package that reads recipe settings owns a small class deriving from :class:`Strict` (unknown
keys refused, every field validated once where it is declared); the recipe
(:mod:`jas_prune.recipe`) only references it with one field line. :func:`first_error` turns a
``ValidationError`` of any such class into ``"prune.ratios: 1.5 is outside (0, 1)..."``, echoing
at most :data:`ECHO_LIMIT` characters of the offending value (a recipe value may be huge: never
format it whole).
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Strict", "ECHO_LIMIT", "STR_MAX", "short", "first_error", "finite", "each_once"]

#: the most characters of a user's value an error message echoes
ECHO_LIMIT = 80
#: the longest string setting (a path: Linux's PATH_MAX)
STR_MAX = 4096


class Strict(BaseModel):
    """A settings section: unknown keys are an error, aliases (``lambda``) and names both accepted,
    no string longer than :data:`STR_MAX`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_max_length=STR_MAX)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = ECHO_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` in at most ``limit`` characters, in time bounded by ``limit`` whatever the
    value's size (nested YAML aliases can stand for billions of items)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite(v: float, rule: str = "") -> float:
    """For a field validator: refuse NaN and ±inf, saying the field's ``rule`` (e.g. ``" ≥ 0"``)."""
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number{rule} (got {v!r})")
    return v


def each_once(v: Any, message: str) -> Any:
    """For a field validator: a list must be non-empty with each item once (else ``message``)."""
    if isinstance(v, list) and (not v or len(set(v)) != len(v)):
        raise ValueError(message)
    return v


def _fields_of(model_cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model_cls.model_fields.items()]


def _section_class(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the mapping at ``loc`` (for "did you mean" suggestions)."""
    cls: Any = root
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return cls


def _friendly(err: dict, root: type[BaseModel], prefix: tuple) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list", "literal"))))
    path = ".".join(str(p) for p in prefix + loc) or "recipe"
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = short(err.get("input"))
    if kind == "extra_forbidden":
        parent = _section_class(root, loc[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1])[:ECHO_LIMIT], _fields_of(parent), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(_fields_of(parent))})"
        return f"{'.'.join(str(p)[:ECHO_LIMIT] for p in prefix + loc)}: unknown key{hint}"
    bounds = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"), "less_than": ("<", "lt"),
              "less_than_equal": ("≤", "le")}
    if kind in bounds:
        sign, name = bounds[kind]
        return f"{path}: must be {sign} {ctx.get(name)} (got {got})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: must be a mapping of keys to values (got {got})"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')} (got {got})"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        key, sep, rest = msg.partition(": ")
        if sep and key.isidentifier():  # a section-level check that names its key
            return f"{path}.{key}: {rest}" if loc or prefix else f"{key}: {rest}"
        return f"{path}: {msg}"
    return f"{path}: {err['msg'][0].lower() + err['msg'][1:]} (got {got})"


def first_error(exc: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """The most specific error of ``exc`` as one line, its path prefixed by ``prefix`` (the section
    ``root`` sits at in the recipe, e.g. ``("attribution",)``)."""
    errors = exc.errors(include_url=False, include_context=True, include_input=True)
    # a union reports one error per alternative: keep the most specific one
    errors.sort(key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
    return _friendly(errors[0], root, prefix)
