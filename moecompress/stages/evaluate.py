"""Evaluate the model on held-out text, side by side with a baseline (usually the uncompressed original)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from moecompress.errors import MoecompressError
from moecompress.eval.compare import evaluate_models
from moecompress.runtime.modelio import load_model, read_sidecar
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


def _baseline_spec(ctx: StageContext, cfg: EvaluateConfig, modified: bool) -> str | None:
    if cfg.baseline != "original":
        return cfg.baseline
    if modified:  # this run changed the model: compare with what it started from
        return str(ctx.loaded.path) if ctx.loaded.path is not None else ctx.loaded.source
    side = read_sidecar(ctx.loaded.path) if ctx.loaded.path is not None else None
    if side and side.get("source_model"):
        return side["source_model"]
    raise MoecompressError(f"{ctx.loaded.source!r} has no recorded original (no moecompress.json)",
                           "pass --baseline PATH, or --no-baseline")


@register_stage(EvaluateConfig, modifies_model=False, writes_output=False, uses_text=True)
def run(ctx: StageContext, cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate on held-out text against a baseline: perplexity, KL, token and routing agreement, size, speed."""
    modified = bool(ctx.artifacts.get("model_modified"))
    baseline = None
    spec = _baseline_spec(ctx, cfg, modified) if cfg.baseline is not None else None
    if spec is not None:
        baseline = load_model(spec)
    kept = ctx.artifacts.get("kept_experts")
    if kept is None and ctx.loaded.path is not None:
        side = read_sidecar(ctx.loaded.path) or {}
        kept = {int(k): v for k, v in side.get("kept_experts", {}).items()} or None
    windows = ctx.windows("eval", samples=cfg.samples)
    report = evaluate_models(ctx.loaded, windows, baseline, kept, cfg.batch_size, ctx.progress, modified)
    if ctx.out_dir is not None:
        (ctx.out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
