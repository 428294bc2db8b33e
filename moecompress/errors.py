"""The one exception type users see: a problem and its fix, printed by the CLI as a single line."""

from __future__ import annotations

__all__ = ["MoecompressError"]


class MoecompressError(Exception):
    """A user-facing error. ``str(err)`` is one line: what is wrong, then what to do about it.

    The CLI prints it without a traceback and exits with status 2; library callers can catch it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(f"{self.problem}: {self.fix}" if self.fix else self.problem)
