"""A small typed name -> object registry, used for architectures, stages and formats."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moecompress.errors import MoecompressError

__all__ = ["Registry"]

V = TypeVar("V")


class Registry(Generic[V]):
    """Explicit registration; lookups of unknown names raise a `MoecompressError` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, V] = {}

    def add(self, name: str, item: V) -> V:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[V], V]:
        def deco(item: V) -> V:
            return self.add(name, item)

        return deco

    def get(self, name: str) -> V:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise MoecompressError(f"unknown {self.kind} {name!r}", f"use one of: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, V]]:
        return iter(sorted(self._items.items()))
