"""Commands that run a whole recipe or a model: ``run`` (a recipe's stages end to end), ``generate`` (text from a
model) and ``eval`` (held-out metrics side by side with a baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moecompress.cli.core import (DataOpt, DeviceOpt, DtypeOpt, ModelArg, OffloadOpt, TasksOpt, _calibration, _rank0,
                                  _run, handled)
from moecompress.console import SHOW, RichProgress, console, print_eval, show_generic, success


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output directory.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated calibration tasks (override).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="TASK=PATH (.jsonl or .txt), repeatable: "
                                                      "your own text for a task (override).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
) -> None:
    """Run a recipe: its stages in order on one loaded model, then save and report."""
    with handled():
        from moecompress.calib import parse_data_specs
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import load_recipe

        r = load_recipe(recipe)
        run_keys = {k: v for k, v in _run(device, dtype, offload_hidden).items() if v is not None}
        if run_keys:
            from moecompress.recipe import validate_command

            validate_command("run", None, {}, r.stages[0].model_dump(), run=run_keys)  # flags named in errors
            r = r.model_copy(update=run_keys)
        if tasks or data:
            files = {k: str(v) for k, v in parse_data_specs(data).items()}
            calib = r.calibration.model_copy(update={
                "tasks": tasks.split(",") if tasks else r.calibration.tasks,
                "data": {**r.calibration.data, **files}})
            r = r.model_copy(update={"calibration": calib})
        result = run_pipeline(r, model=model, output=output, force=force, progress=RichProgress())
        if not _rank0():
            return
        for s in result.report["stages"]:
            console.print(f"[bold]{s['stage']}[/] ({s['seconds']:.1f} s)")
            SHOW.get(s["stage"], show_generic)(s["result"])
        if result.output is not None:
            success(f"wrote {result.output} (report: {result.output / 'moecompress.json'})")


def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = ...,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 40,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
) -> None:
    """Generate text from any model directory moecompress writes (or the demo model).

    A demonstration: the whole model is loaded onto the device (float32 on the CPU, its stored dtype on a GPU),
    so it must fit there; the other commands stream large models one decoder layer at a time."""
    with handled():
        from moecompress.runtime.source import generate_text

        console.print(generate_text(model, prompt, max_new_tokens, temperature, seed, device), soft_wrap=True,
                      markup=False, highlight=False)


def eval_cmd(
    model: ModelArg = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", "-b", help="Model to compare with (default: the original recorded in the model's "
                                 "moecompress.json, if any).")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Evaluate the model alone.")] = False,
    tasks: TasksOpt = None,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Held-out windows per task (0 = all).")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --json file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offload_hidden: OffloadOpt = False,
) -> None:
    """Evaluate on held-out text, side by side with a baseline: perplexity, KL, agreement, size, speed.

    Both models are streamed from disk one decoder layer at a time (tokens/s includes the reads)."""
    with handled():
        import json

        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import validate_command
        from moecompress.io.model import read_sidecar
        from moecompress.io.outdir import atomic_write, check_output_file

        base = None if no_baseline else baseline
        if base is None and not no_baseline and model not in (None, "demo") and not str(model).startswith("tiny:"):
            side = read_sidecar(Path(model)) if Path(model).is_dir() else None
            base = "original" if side and side.get("source_model") else None
        # the calibration settings give the tasks and window length; only the evaluate stage reads `samples`
        # (0 = every held-out window), which calibration itself would refuse
        recipe = validate_command("eval", model, _calibration(tasks, data, max(samples, 1), seq_len, 0),
                                  {"stage": "evaluate", "baseline": base, "samples": samples, "batch_size": batch_size},
                                  run=_run(device, dtype, offload_hidden))
        if json_path is not None:  # never a directory, an input, or a file inside an input
            side = read_sidecar(Path(model)) if model and Path(model).is_dir() else None
            check_output_file(json_path, force, [model or "demo", base, (side or {}).get("source_model"),
                                                 *recipe.calibration.data.values()])
        result = run_pipeline(recipe, progress=RichProgress())
        if not _rank0():
            return
        report = result.report["stages"][0]["result"]
        print_eval(report)
        if json_path is not None:
            atomic_write(json_path, json.dumps(report, indent=1) + "\n", replace=force)
            success(f"wrote {json_path}")
