"""What every command shares: the Typer app and its ``main`` callback (logging, the console), ``handled()`` (each
failure as one line on stderr and an exit status), usage errors as one line, and the options and helpers that
several commands use."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Iterator
from typing import Annotated, NoReturn, Optional

import click
import typer
import typer.rich_utils

from moecompress.console import console, error, setup_console, warn
from moecompress.errors import MoecompressError, shorten
from moecompress.io.fsops import disk_full_error, interrupting_signal, signals_as_interrupts
from moecompress.version import __version__

app = typer.Typer(
    name="moecompress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Post-training compression for Hugging Face Mixture-of-Experts LLMs (profile, prune, quantize, pack). "
         "Every command defaults to the bundled demo MoE when no model is given.",
)

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Model: a local HF directory, tiny:<model_type> (a random test model), or omit for the bundled demo MoE.",
    show_default=False)]


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn every failure into one line on stderr + a non-zero exit status (2 for bad input or a full disk,
    128 + the signal when interrupted, 1 for a bug, with the traceback only under --verbose). SIGTERM and SIGHUP
    act as Ctrl-C does (the same cleanup runs)."""
    try:
        with signals_as_interrupts():
            yield
    except (typer.Exit, typer.Abort, click.exceptions.ClickException, SystemExit, GeneratorExit):
        raise
    except BaseException as e:
        # an interrupt, also one a library turned into its own error (transformers' lazy import answers it with
        # ModuleNotFoundError) or a native library's panic after the signal (pyo3's PanicException)
        if (signum := interrupting_signal(e)) is not None:
            _interrupted(signum)
        if not isinstance(e, Exception):
            raise
        _failed(e)


def _failed(e: Exception) -> NoReturn:
    """One line for a failure that no signal caused, and its exit status."""
    if isinstance(e, MoecompressError):
        error(str(e))
        raise typer.Exit(2) from None
    if isinstance(e, MemoryError):
        error("out of memory: use a machine with more memory, or lower --samples / --batch-size")
        raise typer.Exit(1) from None
    full = disk_full_error(e)  # ENOSPC / EFBIG / EDQUOT, however a library wrapped it
    if full is not None:
        error(str(full))
        raise typer.Exit(2) from None
    if isinstance(e, OSError):
        error(_os_error(e))
        raise typer.Exit(2) from None
    logging.getLogger("moecompress").debug("traceback", exc_info=e)  # a bug: still one line
    error(f"unexpected {e.__class__.__name__}: {shorten(str(e))} (a bug in moecompress: run again with "
          "--verbose for the traceback and report it)")
    raise typer.Exit(1) from None


def _interrupted(signum: int) -> NoReturn:
    error(f"interrupted ({signal.Signals(signum).name})")
    raise typer.Exit(128 + signum) from None


def _os_error(e: OSError) -> str:
    where = f" {str(e.filename)!r}" if e.filename else ""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where} ({e.strerror}): choose a directory you can write to"
    return f"cannot access{where} ({e.strerror or e.__class__.__name__}): check the path and the disk"


def _usage_error(e: click.ClickException) -> None:
    """Click/Typer's usage errors (a bad option type, an unknown option) as one line."""
    if e.__class__.__name__ == "NoArgsIsHelpError":  # the help was printed already
        return
    ctx = getattr(e, "ctx", None)
    where = f"`{ctx.command_path} --help`" if ctx is not None else "`moecompress --help`"
    error(f"{e.format_message()}: see {where}")


class _Warnings(logging.Handler):
    """The library's warnings (``logging.warning``) as one yellow line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


typer.rich_utils.rich_format_error = _usage_error  # typer looks it up at call time


def _rank0() -> bool:
    """Under torchrun every rank runs the command; rank 0 alone prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def _version(value: bool) -> None:
    if value:
        console.print(f"moecompress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_console(quiet=not _rank0())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lib = logging.getLogger("moecompress")
    if not any(isinstance(h, _Warnings) for h in lib.handlers):
        handler = _Warnings(logging.WARNING)
        lib.addHandler(handler)
    lib.propagate = verbose  # warnings print once, as our own line (all records also go to the log with -v)
    lib.setLevel(logging.DEBUG if verbose else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------ options shared by commands
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="Where to compute: auto (the first GPU when there is one), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Compute dtype: auto (float32 on the CPU, the stored dtype on a GPU), float32, bfloat16, float16.")]
OffloadOpt = Annotated[bool, typer.Option(
    "--offload-hidden", help="Keep the batches' hidden states in host memory between layers (when they do not fit "
                             "on the GPU).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _run(device: str | None, dtype: str | None, offload: bool) -> dict:
    return {"device": device, "dtype": dtype, "offload_hidden": offload or None}


TasksOpt = Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated bundled tasks "
                                                 "(default: all, or only the --data tasks).")]
DataOpt = Annotated[Optional[list[str]], typer.Option(
    "--data", help="TASK=PATH (.jsonl with a 'text' field per line, or plain text), repeatable.")]


def _calibration(tasks: str | None, data: list[str] | None, samples: int, seq_len: int, seed: int) -> dict:
    from moecompress.calib import parse_data_specs

    return {"tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
            "data": {k: str(v) for k, v in parse_data_specs(data).items()},
            "samples": samples, "seq_len": seq_len, "seed": seed}
