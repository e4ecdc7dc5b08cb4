"""Name -> definition registries (timm's ``@register_model`` pattern).

A pruning criterion, an attribution method or a pipeline stage is defined once, where it is
implemented, and registered under its name; everything that lists them (the recipe's allowed
names, the CLI help, the report's labels and colours) asks the registry instead of keeping a list
of its own.

Example::

    CRITERIA: Registry[Criterion] = Registry("pruning criterion")

    @CRITERIA.register
    def _magnitude() -> Criterion:
        return Criterion(name="magnitude", ...)
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from .errors import InvalidArgumentError

__all__ = ["Registry", "Named"]


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """An ordered mapping name -> entry; registration order is the order everything lists them in.

    Args:
        kind: what the entries are, for messages ("pruning criterion").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, entry: T) -> T:
        """Register ``entry`` under ``entry.name``; a second entry of the same name is refused."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def register(self, factory: Callable[[], T]) -> Callable[[], T]:
        """Decorator: call ``factory()`` once and register what it returns."""
        self.add(factory())
        return factory

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
