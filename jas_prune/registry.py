"""Name -> definition registries (timm's ``@register_model`` pattern), one style for all four:
pruning criteria (``pruning.criteria.CRITERIA``), attribution methods
(``attribution.METHODS``), pipeline stages (``pipeline.stages.STAGES``) and model families
(``models.FAMILIES``).

An entry is defined once, in the module that implements it, by a decorated function that returns
it; everything that lists them (the recipe's allowed names, the CLI help, the report's labels and
colours, the tests that run every entry) asks the registry instead of keeping a list of its own.
A registry's package imports all its modules (:func:`import_submodules`), so **adding an entry
is adding one file** (or, for attribution methods, one function in ``attribution/methods.py``)::

    # jas_prune/pruning/criteria/mine.py
    @CRITERIA.register
    def _mine() -> Criterion:
        return Criterion(name="mine", ..., score=_score)
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterable, Iterator, Protocol, TypeVar

from .errors import InvalidArgumentError

__all__ = ["Registry", "Named", "import_submodules"]


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """An ordered mapping name -> entry; registration order is the order everything lists them in.

    Args:
        kind: what the entries are, for messages ("pruning criterion").
        order: entry -> sort key, when the order is part of the entry (a stage's place in the
            run) rather than the order the modules were imported in.
    """

    def __init__(self, kind: str, order: Callable[[T], Any] | None = None) -> None:
        self.kind = kind
        self._order = order
        self._entries: dict[str, T] = {}

    def register(self, factory: Callable[[], T]) -> Callable[[], T]:
        """Decorator: call ``factory()`` once and register what it returns under its ``name``
        (a second entry of the same name is refused)."""
        self.add(factory())
        return factory

    def add(self, entry: T) -> T:
        """Register ``entry`` itself (what :meth:`register` does with the factory's result)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        if self._order is not None:
            self._entries = dict(sorted(self._entries.items(), key=lambda kv: self._order(kv[1])))
        return entry

    def get(self, name: str, key: str | None = None) -> T:
        """The entry called ``name``.

        Raises:
            InvalidArgumentError: an unknown name, naming ``key`` (the setting) and the choices.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{key}: " if key else ""
            raise InvalidArgumentError(f"{where}unknown {self.kind} {name!r}{hint}; choose one of "
                                       f"{', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def import_submodules(package: str, path: Iterable[str], first: Iterable[str] = ()) -> None:
    """Import every public module of ``package`` (its ``__path__``): the ones in ``first`` in
    that order, then the others by name. A registry's package calls it once, so a module that
    registers an entry is found without being listed anywhere."""
    first = tuple(first)
    others = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in [*first, *(m for m in others if m not in first)]:
        importlib.import_module(f"{package}.{name}")
