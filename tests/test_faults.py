"""Outputs are sacred: real CLI runs killed at random (seeded) points, or given a full disk, leave the previous
output byte-for-byte intact or the new one complete, never neither; the next run into the same parent leaves
no temporary file or directory. And ``--force`` never replaces an input, the cwd, home, or a stranger's directory.

The runs are real ``moecompress`` processes forked from one server that imported the CLI once
(tests/_cli_forkserver.py), so a case costs ~1 s instead of a cold start's ~10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecompress.cli import app

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork, RLIMIT_FSIZE and renameat2 as on Linux")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "_smoke" / "tiny_keep.yaml"  # tiny:deepseek_v3, keep 6 of 8 experts: ~1 s a run


class ForkServer:
    def __init__(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_cli_forkserver.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        assert self.proc.stdout.readline().strip() == "ready"
        self.live: set[int] = set()

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def spawn(self, argv, stderr: Path, env: dict | None = None, fsize: int | None = None) -> int:
        pid = self._ask({"op": "spawn", "argv": [str(a) for a in argv], "cwd": str(REPO), "stderr": str(stderr),
                         "env": env or {}, "fsize": fsize})["pid"]
        self.live.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        rc = self._ask({"op": "wait", "pid": pid})["rc"]
        self.live.discard(pid)
        return rc

    def close(self) -> None:
        for pid in list(self.live):
            try:
                os.kill(pid, signal.SIGKILL)
                self.wait(pid)
            except (ProcessLookupError, ValueError, OSError):
                pass
        self.proc.kill()  # nothing to flush; its interpreter teardown would take seconds
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def complete(d: Path) -> bool:
    """A whole new output: its sidecar parses, its weights load, every file the run writes is there."""
    from safetensors.torch import load_file

    if not d.is_dir() or (d / ".moecompress-partial").exists():
        return False
    side = json.loads((d / "moecompress.json").read_text())
    json.loads((d / "config.json").read_text())
    load_file(str(d / "model.safetensors"))
    return side["model_written"] and {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(d))


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def wait_for_sigterm_handler(pid: int, timeout: float = 60.0) -> None:
    """Until process ``pid`` catches SIGTERM (its CLI took over the signals; /proc's SigCgt mask), so that a
    loaded machine's slow start does not turn the test into a kill before the handler exists."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("SigCgt:") and int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
                    return
        except FileNotFoundError:
            return
        time.sleep(0.001)


def wait_for_tmp(parent: Path, pid: int, timeout: float = 60.0) -> bool:
    """Poll until the run's temporary directory appears (True), or the run ends first (False)."""
    tmp = parent / f".out.tmp-{pid}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if tmp.exists():
            return True
        try:  # a zombie still answers kill(0); /proc says whether it has exited
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return False
        except (FileNotFoundError, IndexError):
            return False
        time.sleep(0.001)
    raise AssertionError("the run never started writing")


def one_line(stderr: Path) -> str:
    lines = [ln for ln in stderr.read_text().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr.read_text()
    return lines[0]


@pytest.fixture(scope="module")
def previous(server, tmp_path_factory):
    """One real output (the "previous" one); how long a run spends writing (its tmp appears -> renamed into
    place), and how long from its start until renamed."""
    parent = tmp_path_factory.mktemp("previous")
    t0 = time.time()
    pid = server.spawn(["run", RECIPE, "-o", parent / "out"], parent / "err")
    assert wait_for_tmp(parent, pid)
    t1 = time.time()
    while not (parent / "out").exists() and time.time() - t1 < 60:
        time.sleep(0.001)
    window = time.time() - t1
    assert server.wait(pid) == 0, (parent / "err").read_text()
    side = parent / "out" / "moecompress.json"  # a new run can write the very same bytes: tell them apart
    side.write_text(json.dumps({**json.loads(side.read_text()), "previous": True}))
    return parent / "out", snapshot(parent / "out"), max(window, 0.02), t1 + window - t0


RANDOM = ["sigterm-while-writing", "sigterm-anytime", "sigkill-while-writing-1", "sigkill-while-writing-2",
          "sigkill-while-writing-3", "full-disk-1", "full-disk-2"]
CASES = ([(c, False) for c in RANDOM] + [(c, True) for c in RANDOM] + [("failpoint:before-rename", False)]
         + [(f"failpoint:{p}", True) for p in ("before-rename", "after-exchange", "deleting-old")]
         + [("failpoint:after-layer-0", False), ("failpoint:after-layer-0", True)]  # killed mid-model
         + [(f"no-exchange,failpoint:{p}", True) for p in ("after-move-old", "deleting-old")])


@pytest.mark.parametrize("fault,with_previous", CASES, ids=[f"{c}-{'force' if p else 'new'}" for c, p in CASES])
def test_killed_or_full_disk_run_leaves_old_or_new_never_neither(server, previous, tmp_path, fault, with_previous):
    old_dir, old_snap, window, until_renamed = previous
    rng = random.Random(zlib.crc32(f"{fault}-{with_previous}".encode()))  # seeded per case: reproducible
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    if with_previous:
        shutil.copytree(old_dir, out)
    argv = ["run", RECIPE, "-o", out] + (["--force"] if with_previous else [])
    env, fsize = {}, None
    if "failpoint:" in fault:
        env["MOECOMPRESS_TEST_FAILPOINT"] = fault.split("failpoint:")[1]
    if "no-exchange" in fault:  # as on a filesystem without renameat2(RENAME_EXCHANGE): the two-step fallback
        env["MOECOMPRESS_TEST_NO_EXCHANGE"] = "1"
    if fault.startswith("full-disk"):
        fsize = int(2 ** rng.uniform(10, 19.3))  # 1 KB .. 640 KB: below the 660 KB weights file, above one line

    pid = server.spawn(argv, tmp_path / "err", env, fsize)
    if fault.startswith("sig"):
        sig = signal.SIGTERM if fault.startswith("sigterm") else signal.SIGKILL
        if fault == "sigterm-anytime":
            wait_for_sigterm_handler(pid)
            time.sleep(rng.uniform(0.2, max(until_renamed, 0.3)))  # after the CLI took over the signals
        elif wait_for_tmp(parent, pid):
            time.sleep(rng.uniform(0, 1.5 * window))  # somewhere in writing, renaming, deleting the old one
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    rc = server.wait(pid)

    # what the killed / failing run itself reports
    if fault.startswith("sigterm"):
        assert rc in (0, 143), (rc, (tmp_path / "err").read_text())
        if rc == 143:
            assert one_line(tmp_path / "err") == "error: interrupted (SIGTERM)"
            assert not [n for n in leftovers(parent) if ".tmp-" in n], leftovers(parent)  # it cleaned up itself
    elif fault.startswith("sigkill"):
        assert rc in (0, -signal.SIGKILL), (rc, (tmp_path / "err").read_text())
    elif "failpoint" in fault:
        assert rc == -signal.SIGKILL, (rc, (tmp_path / "err").read_text())
    else:
        assert rc == 2, (rc, (tmp_path / "err").read_text())
        line = one_line(tmp_path / "err")
        assert line.startswith("error: cannot write") and "file size limit (EFBIG)" in line, line
        assert "free some space" in line, line
        assert leftovers(parent) == [], leftovers(parent)

    # right away: the old output intact or the new one complete (the two-step fallback killed between its
    # renames is the one moment without NAME: the old output then sits whole at .out.old-PID)
    def old_or_new() -> str:
        if with_previous and snapshot(out) == old_snap:
            return "old"
        assert complete(out), sorted(os.listdir(out))
        return "new"

    state = None
    if fault == "no-exchange,failpoint:after-move-old":
        assert not out.exists() and snapshot(parent / f".out.old-{pid}") == old_snap
        state = "old"  # what the next run must put back
    elif out.exists():
        state = old_or_new()
        if fault.startswith("full-disk") or fault.endswith(("before-rename", "after-layer-0")):
            assert state == "old"
        if fault.endswith(("after-exchange", "deleting-old")):
            assert state == "new"
    else:
        assert not with_previous, "the previous output is gone"

    # the next run into the same parent removes every leftover (and puts a lone .out.old-PID back)
    pid2 = server.spawn(["run", RECIPE, "-o", parent / "next"], tmp_path / "err2")
    assert server.wait(pid2) == 0, (tmp_path / "err2").read_text()
    assert leftovers(parent) == [], leftovers(parent)
    assert sorted(os.listdir(parent)) == (["next", "out"] if state else ["next"])
    if state:
        assert old_or_new() == state


@pytest.mark.parametrize("with_previous", [False, True], ids=["new", "force"])
def test_eval_json_on_a_full_disk(server, tmp_path, with_previous):
    """The report file is written whole or not at all; the error is one line, not a traceback."""
    parent = tmp_path / "parent"
    parent.mkdir()
    report = parent / "e.json"
    old = b'{"previous": "report"}\n' * 10
    if with_previous:
        report.write_bytes(old)
    rng = random.Random(with_previous)
    argv = ["eval", "tiny:mixtral", "--no-baseline", "--tasks", "prose", "--samples", 2, "--seq-len", 32,
            "--json", report] + (["--force"] if with_previous else [])
    pid = server.spawn(argv, tmp_path / "err", fsize=rng.randint(200, 400))  # the report is ~450 bytes
    rc = server.wait(pid)
    assert rc == 2, (tmp_path / "err").read_text()
    line = one_line(tmp_path / "err")
    assert line.startswith("error: cannot write") and "EFBIG" in line and "free some space" in line, line
    assert os.listdir(parent) == (["e.json"] if with_previous else [])
    if with_previous:
        assert report.read_bytes() == old


# --- --force refusals through the CLI (no model is loaded: the output is checked first) -------------------

runner = CliRunner()


def refused(args, *needles):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    """DIR/model (an input model that moecompress wrote, so 'ours'), DIR/prof, DIR/other (not ours)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "moecompress.json").write_text('{"moecompress_version": "0"}')
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "moecompress.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    return tmp_path


def test_force_never_replaces_an_input_or_what_holds_it(workdir):
    d = workdir
    before = snapshot(d)
    prune = ["prune", d / "model", "-p", d / "prof", "--keep", 4, "--force", "-o"]
    refused([*prune, d], "contains the input", "choose another -o")  # the user's report: the input and its siblings
    refused([*prune, d / "model"], "is an input")
    refused([*prune, d / "prof"], "is an input")
    (d / "model" / "sub").mkdir()
    (d / "model" / "sub" / "moecompress.json").write_text("{}")
    refused([*prune, d / "model" / "sub"], "is inside the input")
    refused([*prune, d / "other"], "not written by moecompress", "--force replaces only moecompress outputs")
    (d / "afile").write_text("x")
    refused([*prune, d / "afile"], "is a file", "never replaced by a directory")
    refused(["eval", d / "model", "--no-baseline", "--json", d / "other", "--force"], "is a directory")
    refused(["eval", d / "model", "--no-baseline", "--json", d / "model" / "config.json", "--force"],
            "inside the input")
    refused(["eval", d / "model", "--no-baseline", "--json", d / "afile"], "already exists", "--force")
    after = snapshot(d)
    assert {k: v for k, v in after.items() if k in before} == before


def test_force_never_replaces_cwd_or_home(workdir, monkeypatch):
    d = workdir
    (d / "home").mkdir()
    (d / "home" / "moecompress.json").write_text("{}")
    monkeypatch.setenv("HOME", str(d / "home"))
    refused(["run", RECIPE, "-o", d / "home", "--force"], "is your home directory")
    monkeypatch.chdir(d / "prof")
    refused(["run", RECIPE, "-o", ".", "--force"], "is the current directory")
    refused(["run", RECIPE, "-o", "..", "--force"], "contains the current directory")
    assert (d / "home" / "moecompress.json").exists() and (d / "prof" / "moecompress.json").exists()
