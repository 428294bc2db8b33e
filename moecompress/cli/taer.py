"""Task-adaptive expert retrieval (TAER): ``patterns`` stores one routing pattern per profiled task, ``retrieve``
matches a prompt to them and builds that task's pruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moecompress.cli.core import ForceOpt, DeviceOpt, DtypeOpt, ModelArg, OffloadOpt, _calibration, _run, handled
from moecompress.console import RichProgress, show_patterns, show_retrieve, success
from moecompress.errors import MoecompressError


def patterns(
    model: ModelArg = None,
    profile_dir: Annotated[Path, typer.Option("--profile", "-p", help="Profile directory of this model.")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pattern store directory to write.")] = ...,
    score: Annotated[str, typer.Option(help="Score that ranks each task's experts.")] = "tcess",
    signature_layers: Annotated[int, typer.Option("--signature-layers", help="MoE layers in a routing signature.")] = 2,
    samples: Annotated[int, typer.Option(help="Calibration windows per task for the distance thresholds.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Store one routing pattern per profiled task for task-adaptive expert retrieval (TAER)."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        stage = {"stage": "patterns", "profile": str(profile_dir), "score": score, "signature_layers": signature_layers}
        recipe = validate_command("patterns", model, _calibration(None, None, samples, seq_len, 0), stage,
                                  {"profile": "--profile", "signature_layers": "--signature-layers"},
                                  _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        show_patterns(result.report["stages"][0]["result"])
        success(f"wrote {result.output}")


def retrieve(
    model: ModelArg = None,
    store: Annotated[Path, typer.Option("--store", "-s", help="Pattern store from `moecompress patterns`.")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned model directory to write.")] = ...,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The query text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the query from a file.")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Experts to keep per layer.")] = None,
    keep_ratio: Annotated[Optional[float], typer.Option("--keep-ratio", help="Share of experts to keep.")] = None,
    max_distance: Annotated[Optional[float], typer.Option(
        "--max-distance", help="Fall back to the generalist pattern beyond this distance (default: per task, "
                               "from the store).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
    force: ForceOpt = False,
) -> None:
    """Match a prompt to the nearest task pattern and build that task's pruned model, reading only kept experts."""
    with handled():
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command

        if (prompt is None) == (prompt_file is None):
            raise MoecompressError("give exactly one of --prompt or --prompt-file", "e.g. --prompt 'Solve x^2 = 4'")
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MoecompressError(f"cannot read {str(prompt_file)!r} ({e.__class__.__name__})",
                                       "give a UTF-8 text file") from None
        stage = {"stage": "retrieve", "store": str(store), "prompt": prompt, "keep": keep, "keep_ratio": keep_ratio,
                 "max_distance": max_distance}
        recipe = validate_command("retrieve", model, {}, stage, {"store": "--store", "prompt": "--prompt"},
                                  _run(device, dtype, offload_hidden))
        result = run_pipeline(recipe, output=output, force=force, progress=RichProgress())
        show_retrieve(result.report["stages"][0]["result"])
        success(f"wrote {result.output}")
