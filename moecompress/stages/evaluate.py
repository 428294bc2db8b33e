"""Evaluate the model on held-out text, side by side with a baseline (usually the uncompressed original).

Both models are streamed one decoder layer at a time on the run's device (see ``eval/compare``): the model
as this run has it (possibly the checkpoint an earlier stage of the run just wrote) and the baseline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from moecompress.errors import MoecompressError
from moecompress.eval.compare import evaluate_models
from moecompress.io.model import lineage, read_sidecar, same_model
from moecompress.runtime.source import open_source
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["EvaluateConfig"]


class EvaluateConfig(StageConfig):
    """Perplexity per task; against a baseline also KL, top-1 agreement and per-layer routing agreement.

    Example recipe entry::

        - stage: evaluate
          baseline: original    # the model this recipe started from; or a model path; or null
          samples: 64           # held-out windows per task (0 = all)
    """

    stage: Literal["evaluate"] = "evaluate"
    baseline: str | None = "original"
    samples: int = Field(64, ge=0)
    batch_size: int = Field(8, ge=1)


def _baseline(ctx: StageContext, cfg: EvaluateConfig, modified: bool, scratch: Path):
    """The baseline as a source: the run's original (when this run changed the model), else the original the
    input's ``moecompress.json`` records, else the model ``cfg.baseline`` names."""
    if cfg.baseline is None:
        return None
    if cfg.baseline != "original":
        return open_source(cfg.baseline, scratch)
    original = ctx.original
    if modified:  # this run changed the model: compare with what it started from
        if original is not ctx.source:
            return original
        # a model held in memory was changed in place: read its original again
        return open_source(str(original.path) if original.path is not None else original.label, scratch)
    side = read_sidecar(ctx.source.path) if ctx.source.path is not None else None
    if side and side.get("source_model"):
        recorded = side["source_model"]
        if not str(recorded).startswith("tiny:") and not (Path(recorded).expanduser() / "config.json").is_file():
            raise MoecompressError(f"the original recorded in {ctx.source.label!r} (moecompress.json), {recorded!r}, "
                                   "is gone", "pass --baseline PATH (the model it was made from), or --no-baseline")
        return open_source(recorded, scratch)
    raise MoecompressError(f"{ctx.source.label!r} has no recorded original (no moecompress.json)",
                           "pass --baseline PATH, or --no-baseline")


def _kept(ctx: StageContext, cfg: EvaluateConfig, modified: bool) -> dict[int, list[int]] | None:
    """Kept-expert lists mapping the model's experts to the baseline's numbering. The baseline is the model
    this one was made from (this run's input when the run changed it), or any earlier one in the lineage the
    ``moecompress.json`` files record (a pruned model quantized later, compared with the model before the
    pruning): the maps along the way are chained. An unrelated baseline gets None (the same numbering)."""
    run = ctx.artifacts.get("kept_experts") if modified else None
    start = ctx.original if modified else ctx.source
    side = read_sidecar(start.path) if start is not None and start.path is not None else None
    if modified:
        if cfg.baseline == "original" or same_model(cfg.baseline, start.label) or same_model(cfg.baseline, start.path):
            return run
        chain = lineage(side, run)
    else:
        chain = lineage(side)
        if cfg.baseline == "original":
            return chain[0][1] if chain else None
    return next((kept for model, kept in chain if same_model(model, cfg.baseline)), None)


@register_stage(EvaluateConfig, modifies_model=False, writes_output=False, uses_text=True)
def run(ctx: StageContext, cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate on held-out text against a baseline: perplexity, KL, token and routing agreement, size, speed."""
    modified = bool(ctx.artifacts.get("model_modified"))
    windows = ctx.windows("eval", samples=cfg.samples)
    # a checkpoint this run wrote has no moecompress.json yet: its activation quantization comes from the run
    acts = ((ctx.artifacts.get("sidecar") or {}).get("quantization") or {}).get("activations") if modified else None
    with tempfile.TemporaryDirectory(prefix="moecompress-eval-") as scratch:  # a tiny baseline is written here
        baseline = _baseline(ctx, cfg, modified, Path(scratch))
        report = evaluate_models(ctx.source, windows, baseline, _kept(ctx, cfg, modified), cfg.batch_size, ctx.progress,
                                 modified, open_stream=ctx.stream, activations=acts)
    if ctx.out_dir is not None:
        (ctx.out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
