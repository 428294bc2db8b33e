"""Everything the terminal shows: errors as one line, rich tables, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["RichProgress", "console", "error", "print_table", "success"]

console = Console()
_err = Console(stderr=True)


def error(message: str) -> None:
    """One line on stderr, never wrapped."""
    _err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def success(message: str) -> None:
    console.print(f"[bold green]✓[/] {escape(message)}", soft_wrap=True, highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, header_style="bold cyan", title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, overflow="fold", no_wrap=i == 0)  # the key column stays whole (greppable)
    for r in rows:
        table.add_row(*[escape(_fmt(v)) for v in r])
    console.print(table)


class _Task:
    def __init__(self, bar: Progress, task_id: int) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        self.bar.update(self.task_id, advance=n, **fields)


class RichProgress:
    """`moecompress.progress.Progress` drawn with rich (one bar per task, removed when done)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Task]:
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=console, transient=True)
        with bar:
            tid = bar.add_task(description, total=total, rate="")
            yield _Task(bar, tid)
