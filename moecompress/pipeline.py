"""Run a recipe: validate everything, load the model once, run the stages in order, save, report.

Outputs are written to a temporary directory beside the target and renamed into place at the end, so
a failed run leaves nothing half-written; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecompress import __version__
from moecompress.calib import parse_data_specs, resolve_tasks
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.progress import NullProgress, Progress
from moecompress.recipe import Recipe
from moecompress.runtime.modelio import load_config, load_model, model_label, save_model
from moecompress.stages import STAGES

__all__ = ["RunResult", "check_output", "run"]

log = logging.getLogger(__name__)
SIDECAR = "moecompress.json"


@dataclass
class RunResult:
    output: Path
    report: dict[str, Any] = field(default_factory=dict)


def check_output(output: str | Path | None, force: bool) -> Path:
    if not output:
        raise MoecompressError("no output directory given", "pass -o DIR (or set 'output:' in the recipe)")
    out = Path(output)
    if out.exists() and not force:
        raise MoecompressError(f"output {str(out)!r} already exists", "choose another -o, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoecompressError(f"output {str(out)!r} exists and is not a directory", "choose another -o")
    return out


def _finish(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (only reached with --force) is removed after the move."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(recipe: Recipe, *, model: str | None = None, output: str | Path | None = None, force: bool = False,
        progress: Progress | None = None) -> RunResult:
    """Run ``recipe``; ``model`` / ``output`` override the recipe's. Raises `MoecompressError` on bad input."""
    spec = model if model is not None else recipe.model
    out = check_output(output if output is not None else recipe.output, force)
    calib = recipe.calibration
    parse_data_specs([f"{k}={v}" for k, v in calib.data.items()])  # files exist
    resolve_tasks(calib.tasks, {k: Path(v) for k, v in calib.data.items()})  # task names are known
    config = load_config(spec)
    arch = find_arch(config)
    for cfg in recipe.stages:  # cross-checks against the model before any weight is read
        cfg.check(config, arch)
    progress = progress or NullProgress()
    t0 = time.time()
    loaded = load_model(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        ctx = Context(loaded, recipe.calibration, tmp, progress)
        stages = []
        for cfg in recipe.stages:
            stage = STAGES.get(cfg.stage)
            s0 = time.time()
            log.info("stage %s", cfg.stage)
            summary = stage.run(ctx, cfg) or {}
            stages.append({"stage": cfg.stage, "config": cfg.model_dump(mode="json"),
                           "seconds": round(time.time() - s0, 2), "result": summary})
        wrote_model = any(STAGES.get(c.stage).modifies_model for c in recipe.stages)
        if wrote_model:
            save_model(loaded, tmp)
        report = {
            "moecompress_version": __version__,
            "source_model": model_label(spec) if loaded.path is None else str(loaded.path),
            "architecture": arch.name,
            "recipe": recipe.model_dump(mode="json"),
            "stages": stages,
            "model_written": wrote_model,
            "seconds": round(time.time() - t0, 2),
        }
        if "kept_experts" in ctx.artifacts:
            report["kept_experts"] = {str(k): v for k, v in ctx.artifacts["kept_experts"].items()}
        (tmp / SIDECAR).write_text(json.dumps(report, indent=2) + "\n")
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(out, report)
