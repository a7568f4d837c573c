"""One registry shape for detectors, scorers, shells and fingerprints (STYLE.md rule 4).

Duplicate names raise; an unknown name raises listing the known ones; a registered name is also a
Prometheus label value, so ``other`` (the exporter's overflow label) and any caller-reserved names are
refused, and callers may demand a label-safe pattern. Pure: ``service`` and ``shells`` both build on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from residue_monitor.detectors.exceptions import InvalidInput, NotFound

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → item, with the checks above. ``kind`` names the items in error messages."""

    def __init__(
        self,
        kind: str,
        items: Mapping[str, T] | None = None,
        *,
        reserved: Iterable[str] = ("other",),
        pattern: re.Pattern[str] | None = None,
    ) -> None:
        self._kind = kind
        self._reserved = tuple(reserved)
        self._pattern = pattern
        self._items: dict[str, T] = {}
        for name, item in (items or {}).items():
            self.register(name, item)

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; an empty, reserved, pattern-breaking or duplicate name raises."""
        if not name or name in self._reserved:
            raise InvalidInput(
                f"{self._kind} name must be non-empty and not one of {self._reserved}, got {name!r}"
            )
        if self._pattern is not None and not self._pattern.fullmatch(name):
            raise InvalidInput(f"{self._kind} name must match {self._pattern.pattern}, got {name!r}")
        if name in self._items:
            raise InvalidInput(f"{self._kind} {name!r} is already registered; names must be unique")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item under ``name``; ``NotFound`` listing the known names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"unknown {self._kind} {name!r}; known: {known}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._items))

    def __iter__(self) -> Iterator[T]:
        return iter([self._items[n] for n in self.names()])

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
