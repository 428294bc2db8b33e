"""Outputs are sacred: what moecompress writes appears whole or not at all, and ``--force`` replaces only
what moecompress itself wrote, never an input.

Names in an output's parent directory::

    NAME                       the output
    .NAME.tmp-PID              a directory being written by process PID (holds MARKER until it is complete)
    .NAME.old-PID              a replaced output being deleted (two-step fallback: its only copy until NAME exists)
    .NAME.moecompress-tmp-PID  a single file being written (``os.replace``d onto NAME when complete)

Replacing a directory is one ``renameat2(RENAME_EXCHANGE)`` (Linux; ``renamex_np(RENAME_SWAP)`` on macOS):
there is no moment with neither the old nor the new output. Where the filesystem cannot exchange, two
renames (NAME -> .NAME.old-PID, .NAME.tmp-PID -> NAME) run with SIGINT/SIGTERM/SIGHUP deferred; after a
SIGKILL between them the next run into the same parent puts the old output back. Every run writing into a
parent first removes what dead processes left there (``clean_stale``). Files are fsynced before a rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.io.fsops import exchange, fsync_path, fsync_tree, rename2, signals_deferred

__all__ = ["MARKER", "atomic_file", "atomic_output", "atomic_write", "check_output", "check_output_file", "clean_stale",
           "discard", "failpoint", "finish", "is_moecompress_output", "new_temp_dir"]

log = logging.getLogger(__name__)

MARKER = ".moecompress-partial"  # in a directory that is not a complete output (being written or deleted)
_SIDECAR = "moecompress.json"  # = io.model.SIDECAR (not imported: this module stays light)
_OWN_FILES = {_SIDECAR: None, "profile.json": "moecompress-profile", "patterns.json": "moecompress-patterns"}
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|moecompress-tmp)-(?P<pid>\d+)$")
_FAILPOINT = "MOECOMPRESS_TEST_FAILPOINT"  # tests: SIGKILL this process at a named point of finish()


# -- checks -------------------------------------------------------------------------------------------------


def is_moecompress_output(path: str | Path) -> bool:
    """Whether ``path`` is a directory moecompress wrote: a ``moecompress.json`` sidecar (every model, profile
    and export directory), or a profile's ``profile.json`` / a pattern store's ``patterns.json``."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    for name, fmt in _OWN_FILES.items():
        try:
            obj = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict) and (fmt is None or obj.get("format") == fmt):
            return True
    return False


def _input_paths(inputs: Iterable[object]) -> list[Path]:
    """Existing local paths among model specs and file arguments ('demo' is the bundled model)."""
    out = []
    for v in inputs:
        if v is None or str(v) == "" or str(v).startswith("tiny:"):
            continue
        if str(v) == "demo":
            from moecompress.io.model import DEMO_MODEL

            v = DEMO_MODEL
        p = Path(str(v)).expanduser()
        if os.path.lexists(p):
            out.append(Path(os.path.realpath(p)))
    return out


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _protect(out: Path, inputs: Iterable[object], option: str) -> None:
    """Refuse an output that is, holds or lies inside an input, or that holds the cwd, the home directory or /."""
    real = Path(os.path.realpath(out))
    fix = f"choose another {option}"
    for p in _input_paths(inputs):
        if real == p:
            raise MoecompressError(f"{option} {str(out)!r} is an input of this command", fix)
        if _is_within(p, real):
            raise MoecompressError(f"{option} {str(out)!r} contains the input {str(p)!r}", fix)
        if _is_within(real, p):
            raise MoecompressError(f"{option} {str(out)!r} is inside the input {str(p)!r}", fix)
    places = []
    for what, where in [("the current directory", Path.cwd), ("your home directory", Path.home),
                        ("the root directory", lambda: Path("/"))]:
        try:
            places.append((what, Path(os.path.realpath(where()))))
        except (OSError, RuntimeError, KeyError):  # no cwd / no HOME
            continue
    for what, p in places:
        if real == p:
            raise MoecompressError(f"{option} {str(out)!r} is {what}", fix)
    for what, p in places:
        if _is_within(p, real):
            raise MoecompressError(f"{option} {str(out)!r} contains {what}", fix)


def _check_parent(path: Path, option: str) -> None:
    for a in path.parents:
        if os.path.lexists(a):
            if not a.is_dir():
                raise MoecompressError(f"{option} {str(path)!r} lies under the file {str(a)!r}",
                                       f"choose another {option}")
            return


def check_output(output: str | Path | None, force: bool, inputs: Iterable[object] = (), option: str = "-o") -> Path:
    """The output directory to write, checked before any work starts.

    ``inputs``: every path the command reads (model, profile, baseline, pattern store, data files); the
    output may not be one, hold one or lie inside one. An existing output is replaced only with ``force``
    and only when moecompress wrote it (``is_moecompress_output``); a file is never replaced by a directory.
    Leftovers of dead runs in the parent are removed first (a lone ``.NAME.old-PID`` becomes NAME again).
    """
    if not output:
        raise MoecompressError("no output directory given", "pass -o DIR (or set 'output:' in the recipe)")
    out = Path(output).expanduser()
    _check_parent(out, option)
    clean_stale(Path(os.path.abspath(out)).parent)
    if not os.path.lexists(out):
        return out
    if out.is_symlink():
        raise MoecompressError(f"output {str(out)!r} is a symbolic link",
                               f"choose another {option}, or remove the link")
    if not out.is_dir():
        raise MoecompressError(f"output {str(out)!r} exists and is a file, not a directory",
                               f"choose another {option} (a file is never replaced by a directory)")
    _protect(out, inputs, option)
    if not force:
        raise MoecompressError(f"output {str(out)!r} already exists",
                               f"choose another {option}, or pass --force to replace it")
    if not is_moecompress_output(out):
        raise MoecompressError(f"output {str(out)!r} was not written by moecompress (it has no moecompress.json)",
                               f"--force replaces only moecompress outputs: choose another {option}, "
                               "or remove it yourself")
    return out


def check_output_file(path: str | Path, force: bool, inputs: Iterable[object] = (), option: str = "--json") -> Path:
    """A single output file (``eval --json``): never a directory, never an input or a file inside an input."""
    out = Path(path).expanduser()
    _check_parent(out, option)
    if os.path.lexists(out) and out.is_dir():
        raise MoecompressError(f"{option} {str(out)!r} is a directory", f"give a file path to {option}")
    _protect(out, inputs, option)
    if os.path.lexists(out) and not force:
        raise MoecompressError(f"{str(out)!r} already exists", f"choose another {option}, or pass --force")
    clean_stale(Path(os.path.abspath(out)).parent)
    return out


# -- stale leftovers ------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process (or an impossible pid): leave it
        return True
    return True


def clean_stale(parent: str | Path) -> list[str]:
    """Remove what killed runs left in ``parent`` (only names of ours, only of dead processes, only
    directories that look like ours); put a lone ``.NAME.old-PID`` back as NAME. Returns what it did."""
    parent = Path(parent)
    done: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return done
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or _alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        try:
            if m["kind"] == "moecompress-tmp":
                if entry.is_file(follow_symlinks=False):
                    path.unlink()
                    done.append(f"removed {path}")
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            partial = (path / MARKER).is_file()
            empty = not any(os.scandir(path))
            if not (partial or empty or is_moecompress_output(path)):
                continue  # not recognisably ours
            target = parent / m["name"]
            if m["kind"] == "old" and not partial and not empty and not os.path.lexists(target):
                os.rename(path, target)  # the two-step replace was cut between its renames
                log.warning("restored %s from %s (a run was killed while replacing it)", target, path.name)
                done.append(f"restored {target}")
            else:
                _remove_tree(path)
                done.append(f"removed {path}")
        except FileNotFoundError:  # another run cleaned it first
            pass
        except OSError as e:  # not ours to remove: leave it
            log.warning("could not clean %s (%s)", path, e)
    return done


# -- directories ---------------------------------------------------------------------------------------------


def _write_marker(d: Path) -> None:
    with open(d / MARKER, "w") as f:
        f.write(f"moecompress {os.getpid()}: not a complete output; the next run removes it once this process is gone\n")


def _remove_tree(d: Path) -> None:
    """Delete ``d`` so that a kill at any moment leaves something ``clean_stale`` recognises: the marker
    first in, last out."""
    if not (d / MARKER).exists():
        with contextlib.suppress(OSError):
            _write_marker(d)
    for entry in os.scandir(d):
        if entry.name == MARKER:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d / MARKER)
    os.rmdir(d)


def discard(tmp: Path | None) -> None:
    """Remove a run's temporary directory (after a failure); never raises."""
    if tmp is None or not os.path.lexists(tmp):
        return
    try:
        _remove_tree(Path(tmp))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def new_temp_dir(out: Path) -> Path:
    """Create ``.NAME.tmp-PID`` beside ``out``, marked as ours before anything else goes in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):  # an earlier run in this same process (library use)
        if not tmp.is_dir() or tmp.is_symlink() or not ((tmp / MARKER).is_file() or is_moecompress_output(tmp)):
            raise MoecompressError(f"{str(tmp)!r} is in the way", "remove it")
        _remove_tree(tmp)
    tmp.mkdir()
    _write_marker(tmp)
    return tmp


def failpoint(name: str) -> None:
    """Tests: ``MOECOMPRESS_TEST_FAILPOINT=name`` SIGKILLs this process here (a crash at a known point)."""
    if os.environ.get(_FAILPOINT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def finish(tmp: Path, out: Path, replace: bool = False) -> None:
    """Put the complete directory ``tmp`` at ``out``.

    ``replace`` (``--force``, after ``check_output``): an existing ``out`` is swapped with ``tmp`` in one
    exchange rename, then deleted. Without it an ``out`` that appeared meanwhile is an error, never replaced.
    """
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    old = None  # the replaced output, once the new one stands at ``out``
    try:
        with signals_deferred():
            os.unlink(tmp / MARKER)  # complete: from here the sidecar says it is ours
            failpoint("before-rename")
            appeared = MoecompressError(f"output {str(out)!r} appeared while this run was writing it",
                                        "choose another -o, or pass --force to replace it")
            if not os.path.lexists(out):
                try:
                    if not rename2(tmp, out, exchange=False):  # no-replace rename where there is one
                        if os.path.lexists(out):
                            raise FileExistsError(errno.EEXIST, "exists", str(out))
                        os.rename(tmp, out)
                except FileExistsError:
                    raise appeared from None
                fsync_path(out.parent, directory=True)
                return
            if not replace:
                raise appeared
            if out.is_symlink() or not is_moecompress_output(out):  # changed since check_output
                raise MoecompressError(f"output {str(out)!r} was not written by moecompress", "choose another -o")
            if exchange(tmp, out):
                old = tmp  # now holds the previous output
                failpoint("after-exchange")
            else:  # two steps; a kill in between is undone by the next run (clean_stale)
                moved = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.rename(out, moved)
                failpoint("after-move-old")
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(moved, out)  # put the old one back
                    raise
                old = moved
            fsync_path(out.parent, directory=True)
    finally:  # also when a signal that waited for the renames is acted on now
        if old is not None:
            with contextlib.suppress(OSError):
                _write_marker(old)  # being deleted: clean_stale removes it, never restores it
            failpoint("deleting-old")
            discard(old)


@contextlib.contextmanager
def atomic_output(out: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; move it to ``out`` on success (replacing an
    existing one only with ``replace``), delete it on any error or interrupt."""
    tmp = new_temp_dir(out)
    try:
        yield tmp
        finish(tmp, out, replace)
    except BaseException:
        discard(tmp)
        raise


# -- single files --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends, fsync it and rename it onto
    ``path`` (without ``replace``, an existing ``path`` is an error). Removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = path.with_name(f".{path.name}.moecompress-tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                raise MoecompressError(f"{str(path)!r} appeared while this run was writing it",
                                       "choose another path, or pass --force") from None
            except OSError:  # no hard links here
                if os.path.lexists(path):
                    raise MoecompressError(f"{str(path)!r} appeared while this run was writing it",
                                           "choose another path, or pass --force") from None
                os.replace(tmp, path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_path(path.parent, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    with atomic_file(path, replace) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
