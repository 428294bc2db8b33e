"""io/outdir and io/fsops: exchange-rename replacement, --force refusals, stale leftovers of dead runs, atomic files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from moecompress.errors import MoecompressError
from moecompress.io import fsops, outdir
from moecompress.io.fsops import Interrupted, disk_full_error, exchange, signals_as_interrupts
from moecompress.io.outdir import (MARKER, atomic_file, atomic_output, atomic_write, check_output, check_output_file,
                                   clean_stale, finish, is_moecompress_output, new_temp_dir)

PKG = Path(outdir.__file__).resolve().parents[1]
# A child Python that imports io/outdir without the package's heavy __init__ (transformers): ~50 ms.
STUB = (f"import sys, types; pkg = types.ModuleType('moecompress'); pkg.__path__ = [{str(PKG)!r}]; "
        "sys.modules['moecompress'] = pkg\n")


def python(code: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STUB + textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def output(d: Path, tag: str) -> Path:
    """A directory as moecompress writes it: a sidecar and some weights."""
    d.mkdir(parents=True)
    (d / "moecompress.json").write_text(json.dumps({"tag": tag}))
    (d / "weights.bin").write_bytes(tag.encode() * 1000)
    return d


def tag(d: Path) -> str:
    return json.loads((d / "moecompress.json").read_text())["tag"]


def one_line(err: MoecompressError, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text and err.fix, text
    for n in needles:
        assert n in text, text


# --- replacing a directory ----------------------------------------------------------------------------------


def test_exchange_swaps_two_directories(tmp_path):
    a, b = output(tmp_path / "a", "a"), output(tmp_path / "b", "b")
    if not exchange(a, b):
        pytest.skip("this filesystem has no exchange rename")
    assert tag(a) == "b" and tag(b) == "a"


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two-step"])
def test_replace_with_force(tmp_path, monkeypatch, no_exchange):
    if no_exchange:
        monkeypatch.setenv("MOECOMPRESS_TEST_NO_EXCHANGE", "1")
    out = output(tmp_path / "out", "old")
    with atomic_output(check_output(out, force=True), replace=True) as tmp:
        assert (tmp / MARKER).is_file() and tmp.name == f".out.tmp-{os.getpid()}"
        (tmp / "moecompress.json").write_text(json.dumps({"tag": "new"}))
    assert tag(out) == "new" and not (out / MARKER).exists() and os.listdir(tmp_path) == ["out"]


def test_exchange_replace_never_leaves_a_moment_without_the_output(tmp_path):
    """A reader polling the output while it is replaced 50 times always finds it. (The same reader sees it
    missing a few times in 200 replaces by the two-step fallback, MOECOMPRESS_TEST_NO_EXCHANGE=1.)"""
    if not exchange(output(tmp_path / "x", "x"), output(tmp_path / "y", "y")):
        pytest.skip("this filesystem has no exchange rename")
    shutil.rmtree(tmp_path / "x")
    shutil.rmtree(tmp_path / "y")
    out = output(tmp_path / "out", "v0")
    misses, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                os.stat(out / "moecompress.json")
                reads[0] += 1
            except OSError as e:
                misses.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 51):
            with atomic_output(out, replace=True) as tmp:
                (tmp / "moecompress.json").write_text(json.dumps({"tag": f"v{i}"}))
    finally:
        stop.set()
        t.join()
    assert tag(out) == "v50" and reads[0] > 0 and misses == []
    assert os.listdir(tmp_path) == ["out"]


def test_failed_run_leaves_the_old_output_and_no_temporary(tmp_path):
    out = output(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, replace=True) as tmp:
            (tmp / "moecompress.json").write_text("{}")
            raise KeyboardInterrupt
    assert tag(out) == "old" and os.listdir(tmp_path) == ["out"]


def test_a_signal_between_the_two_step_renames_waits_for_them(tmp_path, monkeypatch):
    """SIGTERM between NAME -> .NAME.old-PID and .NAME.tmp-PID -> NAME: acted on after both, and the old
    output is still deleted."""
    monkeypatch.setenv("MOECOMPRESS_TEST_NO_EXCHANGE", "1")
    out = output(tmp_path / "out", "old")
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if str(b).endswith(f".old-{os.getpid()}"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Interrupted), signals_as_interrupts(), atomic_output(out, replace=True) as tmp:
        (tmp / "moecompress.json").write_text(json.dumps({"tag": "new"}))
    assert tag(out) == "new" and os.listdir(tmp_path) == ["out"]


def test_two_step_puts_the_old_output_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_TEST_NO_EXCHANGE", "1")
    out = output(tmp_path / "out", "old")
    real_rename = os.rename

    def rename(a, b):
        if ".tmp-" in str(a):
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"), atomic_output(out, replace=True) as tmp:
        (tmp / "moecompress.json").write_text(json.dumps({"tag": "new"}))
    assert tag(out) == "old" and os.listdir(tmp_path) == ["out"]


def test_finish_never_replaces_an_output_that_appeared_without_force(tmp_path):
    out = tmp_path / "out"
    tmp = new_temp_dir(check_output(out, force=False))
    (tmp / "moecompress.json").write_text("{}")
    output(out, "someone else's")
    with pytest.raises(MoecompressError, match="appeared while this run was writing it"):
        finish(tmp, out, replace=False)
    assert tag(out) == "someone else's"


# A real SIGKILL at each point of a replace; then the next run's cleanup. Expected: which output stands.
KILLS = [("before-rename", False, "old"), ("after-exchange", False, "new"), ("deleting-old", False, "new"),
         ("before-rename", True, "old"), ("after-move-old", True, "old"), ("deleting-old", True, "new")]


@pytest.mark.parametrize("point,no_exchange,expect", KILLS, ids=[f"{p}-{'two-step' if n else 'exchange'}"
                                                                  for p, n, _ in KILLS])
def test_sigkill_during_replace_then_next_run_cleans(tmp_path, point, no_exchange, expect):
    out = output(tmp_path / "out", "old")
    env = {"MOECOMPRESS_TEST_FAILPOINT": point, **({"MOECOMPRESS_TEST_NO_EXCHANGE": "1"} if no_exchange else {})}
    r = python("""
        import json, sys
        from pathlib import Path
        from moecompress.io.outdir import atomic_output
        with atomic_output(Path(sys.argv[1]), replace=True) as tmp:
            (tmp / "moecompress.json").write_text(json.dumps({"tag": "new"}))
            (tmp / "weights.bin").write_bytes(b"new" * 1000)
    """, out, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if point == "after-move-old":  # the only moment of the two-step fallback without NAME
        assert not out.exists()
    else:
        assert tag(out) == expect
    assert len(os.listdir(tmp_path)) > 1  # something was left behind
    clean_stale(tmp_path)
    assert os.listdir(tmp_path) == ["out"] and tag(out) == expect
    assert (out / "weights.bin").read_bytes() == expect.encode() * 1000


# --- what --force may replace -------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """tmp/model (an input that moecompress wrote), tmp/model/sub (ours, inside it), tmp/data.jsonl."""
    output(tmp_path / "model", "model")
    output(tmp_path / "model" / "sub", "sub")
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    return tmp_path


@pytest.mark.parametrize("where,needle", [
    ("model", "is an input"), (".", "contains the input"), ("model/sub", "is inside the input")])
def test_force_refuses_an_input_its_ancestors_and_descendants(tree, where, needle):
    inputs = [tree / "model", "tiny:mixtral", None, "original"]
    with pytest.raises(MoecompressError) as e:
        check_output(tree / where, force=True, inputs=inputs)
    one_line(e.value, needle, "choose another -o")
    with pytest.raises(MoecompressError, match="contains the input"):  # a data file counts as an input
        check_output(tree, force=True, inputs=[tree / "data.jsonl"])


def test_force_refuses_cwd_home_and_root(tmp_path, monkeypatch):
    home, work = output(tmp_path / "home", "home"), output(tmp_path / "work", "work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for path, needle in [(home, "is your home directory"), (work, "is the current directory"),
                         (Path("."), "is the current directory"), (tmp_path, "contains the current directory"),
                         (Path("/"), "is the root directory")]:
        with pytest.raises(MoecompressError) as e:
            check_output(path, force=True)
        one_line(e.value, needle)


def test_force_replaces_only_what_moecompress_wrote(tmp_path):
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(MoecompressError) as e:
        check_output(stranger, force=True)
    one_line(e.value, "not written by moecompress", "--force replaces only moecompress outputs")
    (stranger / "moecompress.json").write_text("not json")  # a broken sidecar is no proof
    assert not is_moecompress_output(stranger)
    with pytest.raises(MoecompressError, match="already exists"):  # ours, but no --force
        check_output(output(tmp_path / "ours", "x"), force=False)
    assert check_output(tmp_path / "ours", force=True) == tmp_path / "ours"
    prof, store = tmp_path / "prof", tmp_path / "store"  # the markers of profiles and pattern stores
    prof.mkdir()
    store.mkdir()
    (prof / "profile.json").write_text(json.dumps({"format": "moecompress-profile"}))
    (store / "patterns.json").write_text(json.dumps({"format": "moecompress-patterns"}))
    assert is_moecompress_output(prof) and is_moecompress_output(store)
    (tmp_path / "file").write_text("x")  # a file is never replaced by a directory, even with --force
    with pytest.raises(MoecompressError) as e:
        check_output(tmp_path / "file", force=True)
    one_line(e.value, "is a file", "never replaced by a directory")
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    with pytest.raises(MoecompressError, match="symbolic link"):
        check_output(tmp_path / "link", force=True)
    with pytest.raises(MoecompressError, match="lies under the file"):
        check_output(tmp_path / "file" / "out", force=True)
    assert (stranger / "cat.jpg").read_bytes() == b"meow" and (tmp_path / "file").read_text() == "x"


def test_output_file_checks(tree):
    (tree / "old.json").write_text("{}")
    assert check_output_file(tree / "old.json", force=True, inputs=[tree / "model"]) == tree / "old.json"
    for path, force, needle in [(tree / "old.json", False, "already exists"), (tree / "model", True, "is a directory"),
                                (tree / "model" / "moecompress.json", True, "is inside the input"),
                                (tree / "data.jsonl", True, "is an input")]:
        with pytest.raises(MoecompressError) as e:
            check_output_file(path, force, inputs=[tree / "model", tree / "data.jsonl"])
        one_line(e.value, needle)


# --- leftovers of dead runs ---------------------------------------------------------------------------------


def test_clean_stale_removes_only_dead_runs_leftovers_that_look_ours(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    output(tmp_path / "a", "new a")
    for name in (f".a.tmp-{dead}", f".b.tmp-{dead}", f".c.tmp-{alive}", f".d.tmp-{dead}"):
        (tmp_path / name).mkdir()
    (tmp_path / f".a.tmp-{dead}" / MARKER).write_text("")  # a killed write: removed
    (tmp_path / f".a.tmp-{dead}" / "part.safetensors").write_bytes(b"x" * 100)
    output(tmp_path / f".b.tmp-{dead}" / "nested", "x")  # no marker, no sidecar of its own: not ours, kept
    (tmp_path / f".c.tmp-{alive}" / MARKER).write_text("")  # a live run: kept
    (tmp_path / f".d.tmp-{dead}" / "moecompress.json").write_text("{}")  # complete, never renamed: removed
    output(tmp_path / f".a.old-{dead}", "old a")  # NAME exists: the old one goes
    output(tmp_path / f".e.old-{dead}", "old e")  # NAME missing: put back
    output(tmp_path / f".f.old-{dead}", "half-deleted f")
    (tmp_path / f".f.old-{dead}" / MARKER).write_text("")  # was being deleted: removed, never restored
    (tmp_path / f".r.json.moecompress-tmp-{dead}").write_text("{")  # a killed file write
    (tmp_path / f".s.json.moecompress-tmp-{alive}").write_text("{")
    (tmp_path / f".notes.tmp-{dead}").write_text("a user's file that merely looks like ours")
    clean_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["a", "e", f".b.tmp-{dead}", f".c.tmp-{alive}", f".s.json.moecompress-tmp-{alive}", f".notes.tmp-{dead}"])
    assert tag(tmp_path / "a") == "new a" and tag(tmp_path / "e") == "old e"


def test_check_output_cleans_the_parent_first(tmp_path):
    dead = dead_pid()
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / MARKER).write_text("")
    output(tmp_path / f".out.old-{dead}", "old")  # restored, so without --force it is refused
    with pytest.raises(MoecompressError, match="already exists"):
        check_output(tmp_path / "out", force=False)
    assert os.listdir(tmp_path) == ["out"] and tag(tmp_path / "out") == "old"


# --- single files -------------------------------------------------------------------------------------------


def test_atomic_write(tmp_path):
    f = tmp_path / "sub" / "r.json"
    atomic_write(f, '{"a": 1}\n')
    atomic_write(f, b'{"a": 2}\n')
    assert f.read_text() == '{"a": 2}\n'
    with pytest.raises(MoecompressError, match="appeared while this run was writing it"):
        atomic_write(f, "{}", replace=False)
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            tmp.write_text('{"a": 3')  # half written, then the run fails
            raise RuntimeError
    assert f.read_text() == '{"a": 2}\n' and os.listdir(f.parent) == ["r.json"]


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    f = tmp_path / "r.json"
    f.write_text("old\n")
    r = python("""
        import resource, signal, sys
        from moecompress.io.fsops import disk_full_error
        from moecompress.io.outdir import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            atomic_write(sys.argv[1], "x" * 5000)
        except OSError as e:
            print(disk_full_error(e))
    """, f)
    assert r.returncode == 0, r.stderr
    assert "a file reached the file size limit (EFBIG)" in r.stdout and "free some space" in r.stdout
    assert f.read_text() == "old\n" and os.listdir(tmp_path) == ["r.json"]


def test_disk_full_error_sees_through_wrappers():
    assert "the disk is full (ENOSPC)" in str(disk_full_error(OSError(errno.ENOSPC, "No space left on device", "/x")))
    wrapped = Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert "ENOSPC" in str(disk_full_error(wrapped))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert "quota" in str(disk_full_error(e))
    assert disk_full_error(ValueError("x")) is None and disk_full_error(FileNotFoundError(2, "missing")) is None


# --- signals ------------------------------------------------------------------------------------------------


def test_sigterm_and_sighup_raise_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt) as e:
            with signals_as_interrupts():
                os.kill(os.getpid(), sig)
                time.sleep(5)
        assert isinstance(e.value, Interrupted) and e.value.signum == sig
    assert signal.getsignal(signal.SIGTERM) is before


def test_signals_wait_for_the_renames():
    done = []
    with pytest.raises(Interrupted):
        with signals_as_interrupts():
            with fsops.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append(True)  # not interrupted in here
    assert done == [True]
