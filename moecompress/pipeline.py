"""Run a recipe: validate everything, load the model once, run the stages in order, save, report.

Outputs are written to a temporary directory beside the target and renamed into place at the end, so
a failed run leaves nothing half-written; an existing output is replaced only with ``force`` (and only
one moecompress wrote, never an input: see io/outdir).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.calib import parse_data_specs, resolve_tasks
from moecompress.context import Context
from moecompress.errors import MoecompressError
from moecompress.formats.inspect import storage_summary
from moecompress.io.model import SIDECAR, input_facts, load_config, model_label, read_sidecar
from moecompress.io.outdir import check_output, discard, finish, new_temp_dir
from moecompress.io.validate import check_weight_files
from moecompress.models import find_arch
from moecompress.progress import NullProgress, Progress
from moecompress.recipe import Recipe
from moecompress.runtime.dist import init_dist
from moecompress.runtime.executor import ModelSource, Placement, resolve_device
from moecompress.runtime.memory import memory_report
from moecompress.runtime.source import open_source
from moecompress.stages import STAGES
from moecompress.stages.order import InputState, check_order
from moecompress.version import __version__

__all__ = ["RunResult", "open_source", "placement_of", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def placement_of(recipe: Recipe) -> Placement:
    dtype = None if recipe.dtype == "auto" else getattr(torch, recipe.dtype)
    return Placement(resolve_device(recipe.device), dtype, recipe.offload_hidden)


def _check_space(source: ModelSource, specs, where: Path) -> None:
    """Refuse before writing when the output cannot fit: a changed model needs about its input's size (and as
    much again for an intermediate checkpoint when several stages change it)."""
    n = sum(1 for s in specs if s.modifies_model)
    if not n or source.directory is None:
        return
    size = sum(f.stat().st_size for f in check_weight_files(source.directory, True))
    need = size * (2 if n > 1 else 1)
    free = shutil.disk_usage(where).free
    if free < need:
        raise MoecompressError(f"{str(where)!r} has {free / 1e9:.2f} GB free, but this run writes about "
                               f"{need / 1e9:.2f} GB", "free some disk space, or write to another -o")


def run(recipe: Recipe, *, model: str | None = None, output: str | Path | None = None, force: bool = False,
        progress: Progress | None = None) -> RunResult:
    """Run ``recipe``; ``model`` / ``output`` override the recipe's. Raises `MoecompressError` on bad input.

    A recipe whose stages only report (``evaluate``) may run without an output directory. The model is
    streamed one decoder layer at a time from its directory; a stage that changes it writes a new checkpoint
    (the output, or an intermediate one when later stages change it again), which the next stages read.
    """
    spec = model if model is not None else recipe.model
    specs = [STAGES.get(c.stage) for c in recipe.stages]
    wants_output = any(s.modifies_model or s.writes_output for s in specs)
    target = output if output is not None else recipe.output
    calib = recipe.calibration
    inputs = [spec or "demo", *calib.data.values(),  # and any stage setting naming a path (profile, baseline)
              *(v for c in recipe.stages for v in c.model_dump().values() if isinstance(v, str))]
    placement = placement_of(recipe)
    dist = init_dist(placement.device)
    if dist.device is not None and dist.device.type == "cuda":
        placement = dataclasses.replace(placement, device=dist.device)
    out = dist.agree(lambda: check_output(target, force, inputs)) if (wants_output or target) else None
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
    dist.check(arch.num_experts(config))
    progress = progress or NullProgress()
    t0 = time.time()
    tmp = dist.agree(lambda: new_temp_dir(out)) if out is not None else None
    scratch_dir = None
    try:
        scratch_dir = (tmp / ".scratch") if tmp is not None else Path(
            dist.agree(lambda: tempfile.mkdtemp(prefix="moecompress-")))
        if dist.writer:
            scratch_dir.mkdir(exist_ok=True)
        dist.barrier()
        source = open_source(spec, scratch_dir, config, dist)
        if tmp is not None:
            dist.agree(lambda: _check_space(source, specs, tmp))
        ctx = Context(source, recipe.calibration, tmp if dist.writer else None, progress, placement=placement,
                      dist=dist)
        changing = [k for k, s in enumerate(specs) if s.modifies_model]
        stages = []
        for k, (cfg, stage) in enumerate(zip(recipe.stages, specs)):
            s0 = time.time()
            log.info("stage %s", cfg.stage)
            before = ctx.source
            if stage.modifies_model:
                ctx.write_to = tmp if k == changing[-1] else scratch_dir / f"stage-{k}"
            summary = stage.run(ctx, cfg) or {}
            if stage.modifies_model:
                ctx.artifacts["model_modified"] = True
                if ctx.source is before:
                    raise RuntimeError(f"stage {cfg.stage} changes the model but wrote none")
                if before is not ctx.original and before.directory is not None and scratch_dir in \
                        before.directory.parents:
                    shutil.rmtree(before.directory, ignore_errors=True)  # an intermediate nobody reads again
            stages.append({"stage": cfg.stage, "config": cfg.model_dump(mode="json"),
                           "seconds": round(time.time() - s0, 2), "result": summary})
        wrote_model = bool(changing)
        report = {
            "moecompress_version": __version__,
            "source_model": source.label if source.path is None else str(source.path),
            "architecture": arch.name,
            "recipe": recipe.model_dump(mode="json"),
            "device": str(placement.device),
            "stages": stages,
            "model_written": wrote_model and tmp is not None,
            "seconds": round(time.time() - t0, 2),
        }
        if "kept_experts" in ctx.artifacts:
            report["kept_experts"] = {str(k): v for k, v in ctx.artifacts["kept_experts"].items()}
        earlier = read_sidecar(source.path) if source.path is not None else None
        if earlier and earlier.get("source_model"):  # the input was made by moecompress: its lineage, for eval
            report["derived_from"] = {k: earlier[k] for k in ("source_model", "kept_experts", "derived_from")
                                      if k in earlier}
        report.update(ctx.artifacts.get("sidecar", {}))  # what stages record for loaders (quantization, ...)
        if dist.active:
            report["processes"] = dist.world
        dist.barrier()  # every rank is done reading the scratch checkpoints
        if not dist.writer:
            return RunResult(None, report)
        shutil.rmtree(scratch_dir, ignore_errors=True)
        if tmp is not None and wrote_model:
            _report_written_size(report, tmp)
        report.update(memory_report())
        if tmp is not None:
            (tmp / SIDECAR).write_text(json.dumps(report, indent=2) + "\n")
            finish(tmp, out, replace=force)
    except BaseException:
        if dist.writer:
            if scratch_dir is not None:
                shutil.rmtree(scratch_dir, ignore_errors=True)
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
