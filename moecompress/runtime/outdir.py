"""Output directories: refuse to overwrite without ``force``; write to a temporary sibling and rename it into
place at the end, so a failed run leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moecompress.errors import MoecompressError

__all__ = ["atomic_output", "check_output", "finish"]


def check_output(output: str | Path | None, force: bool) -> Path:
    if not output:
        raise MoecompressError("no output directory given", "pass -o DIR (or set 'output:' in the recipe)")
    out = Path(output)
    if out.exists() and not force:
        raise MoecompressError(f"output {str(out)!r} already exists", "choose another -o, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoecompressError(f"output {str(out)!r} exists and is not a directory", "choose another -o")
    return out


def finish(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (only reached with --force) is removed after the move."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; rename it to ``out`` on success, delete it on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
