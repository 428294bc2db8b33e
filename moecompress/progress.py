"""Progress reporting without a UI dependency: library code calls `Progress`; the CLI plugs in rich."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["NullProgress", "Progress", "ProgressTask"]


class ProgressTask(Protocol):
    def advance(self, n: float = 1, **fields: object) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None) -> contextlib.AbstractContextManager[ProgressTask]: ...


class _NullTask:
    def __init__(self, on_advance: Callable[[float], None] | None = None) -> None:
        self.done = 0.0
        self._cb = on_advance

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        if self._cb:
            self._cb(self.done)


class NullProgress:
    """Shows nothing (library use, tests)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_NullTask]:
        yield _NullTask()
