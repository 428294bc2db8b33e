"""Filesystem primitives under `io.outdir`: fsync, the exchanging / no-replace rename, signals held across a
few renames; and what a full disk or a termination signal becomes (a one-line error, a KeyboardInterrupt).

``renameat2(RENAME_EXCHANGE | RENAME_NOREPLACE)`` on Linux, ``renamex_np(RENAME_SWAP | RENAME_EXCL)`` on macOS;
where neither works (old kernel, a filesystem without it) the caller falls back to plain renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from moecompress.errors import MoecompressError

__all__ = ["Interrupted", "disk_full_error", "exchange", "fsync_path", "fsync_tree", "interrupting_signal", "rename2",
           "signals_as_interrupts", "signals_deferred"]

_NO_EXCHANGE = "MOECOMPRESS_TEST_NO_EXCHANGE"  # tests: behave as on a filesystem without exchange rename


# -- durable renames -----------------------------------------------------------------------------------------


def fsync_path(p: str | Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot fsync a directory; files must reach the disk
            raise
    finally:
        os.close(fd)


def fsync_tree(d: Path) -> None:
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(root, directory=True)


_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_RENAME_SWAP, _RENAME_EXCL = 2, 4  # macOS renamex_np


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def rename2(src: Path, dst: Path, exchange: bool) -> bool:
    """An exchanging / no-replace rename; False where the platform or filesystem cannot do it."""
    if os.environ.get(_NO_EXCHANGE):
        return False
    libc = _libc()
    a, b = os.fsencode(src), os.fsencode(dst)
    if libc is not None and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE if exchange else _RENAME_NOREPLACE)
    elif libc is not None and sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(a, b, _RENAME_SWAP if exchange else _RENAME_EXCL)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here (old kernel, or a filesystem without it)
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False (nothing done) where that is not supported."""
    return rename2(a, b, exchange=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP for a few renames, then act on the first one that came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            with contextlib.suppress(ValueError, OSError):
                old[s] = signal.signal(s, lambda n, _f: caught.append(n))
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:  # None: a handler not set from Python; leave ours rather than fail
                signal.signal(s, h)
        if caught:
            h = old.get(caught[0])
            if callable(h):
                h(caught[0], None)
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


# -- errors and signals --------------------------------------------------------------------------------------

_EDQUOT = getattr(errno, "EDQUOT", 122)
_DISK_WHY = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file reached the file size limit",
             _EDQUOT: "the disk quota is used up"}
_DISK_TEXT = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG, "Disk quota exceeded": _EDQUOT,
              "os error 28)": errno.ENOSPC, "os error 27)": errno.EFBIG, f"os error {_EDQUOT})": _EDQUOT}


def _disk_errno(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno in _DISK_WHY:
        return e.errno
    text = str(e)  # safetensors / tokenizers wrap the OS error in their own exception types
    return next((code for needle, code in _DISK_TEXT.items() if needle in text), None)


def disk_full_error(exc: BaseException) -> MoecompressError | None:
    """A one-line error for an exception caused by a full disk, the file size limit or a quota (ENOSPC,
    EFBIG, EDQUOT), however a library wrapped it; None for any other exception."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = _disk_errno(e)
        if code is not None:
            where = f" {e.filename!r}" if isinstance(e, OSError) and e.filename else ""
            return MoecompressError(f"cannot write{where}: {_DISK_WHY[code]} ({errno.errorcode.get(code, code)})",
                                    "free some space, or choose another -o (or --json) on a disk with room")
        e = e.__cause__ or e.__context__
    return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into what Ctrl-C raises, so the same cleanup runs; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # the termination signals `signals_as_interrupts` turned into Interrupted


def _raise_interrupted(signum: int, _frame: object) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def interrupting_signal(exc: BaseException) -> int | None:
    """The signal that caused ``exc``, or None. An interrupt can land inside library code that turns it into
    its own error (transformers' lazy import answers a KeyboardInterrupt mid-import with ModuleNotFoundError);
    so: a KeyboardInterrupt anywhere in the chain, or a SIGTERM / SIGHUP taken since `signals_as_interrupts`
    began, makes the failure an interrupt."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return getattr(e, "signum", signal.SIGINT)
        e = e.__cause__ or e.__context__
    return _received[0] if _received else None


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) like SIGINT does."""
    old = {}
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if s is not None:
                with contextlib.suppress(ValueError, OSError):
                    old[s] = signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
