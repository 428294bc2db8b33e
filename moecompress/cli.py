"""The ``moecompress`` command. Thin: each command parses options, calls one library function, prints.

Errors a user can fix end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from moecompress import __version__
from moecompress.console import RichProgress, console, error, print_table, success
from moecompress.errors import MoecompressError

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
    """Turn user-facing errors into one line + exit status 2."""
    try:
        yield
    except MoecompressError as e:
        error(str(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None


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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command("list")
def list_cmd() -> None:
    """List registered architectures, stages, formats and the bundled calibration tasks."""
    with handled():
        from moecompress.calib import bundled_tasks, read_documents
        from moecompress.formats import FORMATS
        from moecompress.models import ARCHS
        from moecompress.stages import STAGES

        rows = []
        for name, arch in ARCHS.items():
            rows.append([name, _routing_text(arch), arch.shared_experts or "-", arch.expert_layout,
                         f"{arch.layers}.N.{arch.moe_block}"])
        print_table("Architectures", ["model_type", "routing", "shared experts", "expert storage", "MoE block"], rows)
        print_table("Stages", ["stage", "modifies model", "keys", "what it does"],
                    [[n, "yes" if s.modifies_model else "no",
                      ", ".join(k for k in s.config.model_fields if k != "stage"), s.summary] for n, s in STAGES.items()])
        print_table("Formats", ["format", "bits/weight", "description"],
                    [[n, f.bits, f.description] for n, f in FORMATS.items()])
        print_table("Bundled tasks (calib_data/)", ["task", "calib documents", "eval documents"],
                    [[t, len(read_documents(t, "calib")), len(read_documents(t, "eval"))] for t in bundled_tasks()])


def _routing_text(arch) -> str:
    """The family's routing rule as text, read off its tiny test config."""
    from moecompress.testing import tiny_config

    cfg = tiny_config(arch.name)
    rule = arch.routing(cfg, arch.moe_layer_indices(cfg)[0])
    text = rule.score + (f" + {rule.group_score} groups" if rule.group_score else "")
    text += " + correction bias" if arch.correction_bias else ""
    return text + (" + renorm" if rule.renormalize else "")


@app.command()
def info(model: ModelArg = None) -> None:
    """Describe a model: MoE layout, routing rule, parameters by role (reads the config only)."""
    with handled():
        from moecompress.runtime.describe import describe_model

        d = describe_model(model)
        print_table(f"{d['model']}", ["property", "value"], [[k, v] for k, v in d.items() if k != "model"])


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output directory.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated calibration tasks (override).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="TASK=PATH (.jsonl or .txt), repeatable: "
                                                      "your own text for a task (override).")] = None,
) -> None:
    """Run a recipe: its stages in order on one loaded model, then save and report."""
    with handled():
        from moecompress.calib import parse_data_specs
        from moecompress.pipeline import run as run_pipeline
        from moecompress.recipe import load_recipe

        r = load_recipe(recipe)
        if tasks or data:
            files = {k: str(v) for k, v in parse_data_specs(data).items()}
            calib = r.calibration.model_copy(update={
                "tasks": tasks.split(",") if tasks else r.calibration.tasks,
                "data": {**r.calibration.data, **files}})
            r = r.model_copy(update={"calibration": calib})
        result = run_pipeline(r, model=model, output=output, force=force, progress=RichProgress())
        rows = [[s["stage"], f"{s['seconds']:.1f}", _summary(s["result"])] for s in result.report["stages"]]
        print_table(f"{r.name or recipe.name}", ["stage", "seconds", "result"], rows)
        success(f"wrote {result.output} (report: {result.output / 'moecompress.json'})")


def _summary(result: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, (dict, list)))[:200]


if __name__ == "__main__":  # pragma: no cover
    app()
