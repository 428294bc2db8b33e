"""Run a recipe: validate everything, load the model once, run the stages in order, save, report.

Outputs are written to a temporary directory beside the target and renamed into place at the end, so
a failed run leaves nothing half-written; an existing output is replaced only with ``force`` (and only
one moecompress wrote, never an input: see runtime/outdir).
"""

from __future__ import annotations

import json
import logging
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
from moecompress.formats.inspect import storage_summary
from moecompress.runtime.memory import memory_report
from moecompress.runtime.modelio import SIDECAR, input_facts, load_config, load_model, model_label, save_model
from moecompress.runtime.outdir import check_output, discard, finish, new_temp_dir
from moecompress.stages import STAGES
from moecompress.stages.order import InputState, check_order

__all__ = ["RunResult", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def run(recipe: Recipe, *, model: str | None = None, output: str | Path | None = None, force: bool = False,
        progress: Progress | None = None) -> RunResult:
    """Run ``recipe``; ``model`` / ``output`` override the recipe's. Raises `MoecompressError` on bad input.

    A recipe whose stages only report (``evaluate``) may run without an output directory.
    """
    spec = model if model is not None else recipe.model
    specs = [STAGES.get(c.stage) for c in recipe.stages]
    wants_output = any(s.modifies_model or s.writes_output for s in specs)
    target = output if output is not None else recipe.output
    calib = recipe.calibration
    inputs = [spec or "demo", *calib.data.values(),  # and any stage setting naming a path (profile, baseline)
              *(v for c in recipe.stages for v in c.model_dump().values() if isinstance(v, str))]
    out = check_output(target, force, inputs) if (wants_output or target) else None
    files = parse_data_specs([f"{k}={v}" for k, v in calib.data.items()])  # files exist
    tasks = resolve_tasks(calib.tasks, files)  # task names are known
    config = load_config(spec)
    arch = find_arch(config)
    facts = input_facts(spec, config)
    state = InputState(model_label(spec), facts["representation"], facts["scheme"], facts["original"])
    check_order(recipe.stages, specs, state, [t.task for t in tasks], arch.num_experts(config))
    limit = getattr(config, "max_position_embeddings", None)
    if limit and calib.seq_len > limit and any(s.uses_text for s in specs):
        raise MoecompressError(f"sequence length {calib.seq_len} is above the model's limit of {limit} tokens",
                               f"use --seq-len {limit} or less")
    for cfg in recipe.stages:  # cross-checks against the model before any weight is read
        cfg.check(config, arch)
    progress = progress or NullProgress()
    t0 = time.time()
    loaded = load_model(spec)
    tmp = new_temp_dir(out) if out is not None else None
    try:
        ctx = Context(loaded, recipe.calibration, tmp, progress)
        stages = []
        for cfg, stage in zip(recipe.stages, specs):
            s0 = time.time()
            log.info("stage %s", cfg.stage)
            summary = stage.run(ctx, cfg) or {}
            if stage.modifies_model:
                ctx.artifacts["model_modified"] = True
            stages.append({"stage": cfg.stage, "config": cfg.model_dump(mode="json"),
                           "seconds": round(time.time() - s0, 2), "result": summary})
        wrote_model = any(s.modifies_model for s in specs)
        report = {
            "moecompress_version": __version__,
            "source_model": model_label(spec) if loaded.path is None else str(loaded.path),
            "architecture": arch.name,
            "recipe": recipe.model_dump(mode="json"),
            "stages": stages,
            "model_written": wrote_model and tmp is not None,
            "seconds": round(time.time() - t0, 2),
        }
        if "kept_experts" in ctx.artifacts:
            report["kept_experts"] = {str(k): v for k, v in ctx.artifacts["kept_experts"].items()}
        report.update(ctx.artifacts.get("sidecar", {}))  # what stages record for loaders (quantization, ...)
        if tmp is not None:
            if wrote_model and ctx.artifacts.get("save_format") == "packed" and "quant_record" in ctx.artifacts:
                from moecompress.runtime.pack import write_packed

                report["packed"] = write_packed(loaded, ctx.artifacts["quant_record"],
                                                report.get("quantization", {}), tmp,
                                                ctx.artifacts.get("ternary_codec", "ternary-b3"))
            elif wrote_model:
                save_model(loaded, tmp)
            if wrote_model:
                _report_written_size(report, tmp)
        report.update(memory_report())
        if tmp is not None:
            (tmp / SIDECAR).write_text(json.dumps(report, indent=2) + "\n")
            finish(tmp, out, replace=force)
    except BaseException:
        discard(tmp)
        raise
    return RunResult(out, report)


def _report_written_size(report: dict[str, Any], directory: Path) -> None:
    """Replace size estimates made before the model was written by what the files hold (as ``inspect``
    counts it), in the report and in every evaluate stage's result (and its ``eval.json``)."""
    size = storage_summary(directory)
    report["size"] = size
    for s in report["stages"]:
        result = s["result"]
        if s["stage"] == "evaluate" and isinstance(result, dict) and "size_bytes" in result:
            result.update({k: size[k] for k in ("params", "size_bytes", "bits_per_param", "size_source")})
            if (directory / "eval.json").is_file():
                (directory / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
