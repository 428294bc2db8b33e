"""The one exception type users see: a problem and its fix, printed by the CLI as a single line."""

from __future__ import annotations

import re

__all__ = ["MoecompressError", "one_line", "shorten"]


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return re.sub(r"\s+", " ", str(text)).strip()


def shorten(text: str, width: int = 160) -> str:
    """``text`` on one line, cut at a word boundary (never mid-word) with an ellipsis when longer than ``width``."""
    text = one_line(text)
    if len(text) <= width:
        return text
    cut = text[: width + 1].rsplit(" ", 1)[0].rstrip(" ,;:")
    return (cut if cut else text[:width]) + " …"


class MoecompressError(Exception):
    """A user-facing error. ``str(err)`` is one line: what is wrong, then what to do about it.

    The CLI prints it without a traceback and exits with status 2; library callers can catch it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = one_line(problem).rstrip(". ")
        self.fix = one_line(fix).rstrip(". ") if fix else None
        super().__init__(f"{self.problem}: {self.fix}" if self.fix else self.problem)
