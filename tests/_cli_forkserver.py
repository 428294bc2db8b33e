"""Fork server for tests/test_faults.py: import the CLI once (~8 s here), then fork one child per request.

Each child is a separate process running ``moecompress ARGS`` exactly as the console script does
(``moecompress.cli:app``), so the test can SIGTERM / SIGKILL it or give it a tiny file size limit, at a
fraction of a cold start's cost. Protocol: one JSON object per line on stdin, one answer per line on stdout::

    {"op": "spawn", "argv": [...], "cwd": DIR, "stderr": FILE, "env": {...}, "fsize": BYTES | null} -> {"pid": PID}
    {"op": "wait", "pid": PID}                                                                     -> {"rc": RC}

``rc`` is as subprocess reports it (negative: killed by that signal).
"""

import json
import os
import resource
import signal
import sys
import traceback


def _child(app, req: dict) -> None:
    code = 1
    try:
        os.chdir(req["cwd"])
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # stdout is not checked; a file there would count against the size limit
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 2)
        os.environ.update(req.get("env") or {})
        if req.get("fsize"):  # a full disk: writes past this size fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        app(args=req["argv"], prog_name="moecompress")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from moecompress.cli import app

    # what the commands import lazily, so that each child does not pay for it (imports only: no torch op
    # runs here, so no thread pool exists that a fork could break)
    import moecompress.context  # noqa: F401
    import moecompress.pipeline  # noqa: F401
    import moecompress.recipe  # noqa: F401
    import moecompress.testing  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(app, req)
            print(json.dumps({"pid": pid}), flush=True)
        elif req["op"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
