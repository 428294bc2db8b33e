"""Task patterns for task-adaptive expert retrieval (PreMoe's TAER, Pei et al. 2025, arXiv:2505.17639).

One pattern per profiled task: a routing signature (the task's mean router logits over the first MoE layers, from
the profile) and every MoE layer's expert ranking by a profile score; plus a generalist pattern (all tasks) and a
per-task distance threshold, calibrated by routing calibration windows of every task through the first MoE layers
(the layer-streaming probe of `runtime.prompt_routing`: nothing past the last signature layer is read, nor that
layer's routed experts). Written as a pattern store (`formats.patterns`) into the output directory; the
``retrieve`` stage matches a prompt against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from moecompress.algorithms.expert_scores import SCORES, super_experts
from moecompress.calib import resolve_tasks, task_windows
from moecompress.errors import MoecompressError
from moecompress.formats.patterns import PatternStore
from moecompress.formats.profile import Profile
from moecompress.models.identity import check_identity, config_identity
from moecompress.runtime.identity import source_identity
from moecompress.runtime.prompt_routing import cosine_distance, routing_signatures
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["PatternsConfig"]

_FIX = "profile this model first: moecompress profile MODEL -o PROFILE"


class PatternsConfig(StageConfig):
    """Store one routing pattern per profiled task (the recipe's calibration windows set the thresholds).

    Example recipe entry::

        - stage: patterns
          profile: out/demo-profile   # or omit after a `profile` stage in the same recipe
          signature_layers: 2         # MoE layers in a routing signature
          score: tcess                # ranks each task's experts
    """

    stage: Literal["patterns"] = "patterns"
    profile: str | None = None
    score: str = "tcess"
    signature_layers: int = Field(2, ge=1)
    margin: float = Field(1.0, gt=0.0)  # a task's threshold: margin x the 99th percentile of its own distances
    batch_size: int = Field(8, ge=1)

    @field_validator("score")
    @classmethod
    def _score(cls, v: str) -> str:
        if v not in SCORES:
            raise ValueError(f"unknown score {v!r}: use one of {', '.join(SCORES)}")
        return v

    def check(self, config: Any, arch: Any) -> None:
        n = len(arch.moe_layer_indices(config))
        if self.signature_layers > n:
            raise MoecompressError(f"--signature-layers {self.signature_layers} is not between 1 and {n}",
                                   "use a number of MoE layers the model has")
        if self.profile is not None:
            check_identity(Profile.peek(self.profile).get("model", {}), config_identity(config, arch),
                           f"the profile {self.profile!r}", _FIX)


def _resolve_profile(ctx: StageContext, cfg: PatternsConfig) -> Profile:
    if cfg.profile is not None:
        return Profile.load(cfg.profile)
    if "profile" in ctx.artifacts:
        return ctx.artifacts["profile"]
    raise MoecompressError("patterns needs a profile", "pass --profile DIR (from `moecompress profile`)")


@register_stage(PatternsConfig, modifies_model=False, uses_text=True, needs_original=True, needs_profile=True,
                makes_patterns=True)
def run(ctx: StageContext, cfg: PatternsConfig) -> dict[str, Any]:
    """Store one routing pattern per profiled task for task-adaptive expert retrieval (TAER)."""
    arch, config = ctx.arch, ctx.config
    profile = _resolve_profile(ctx, cfg)
    identity = source_identity(ctx.source, ctx.placement)  # router weights only
    check_identity(profile.model, identity, "the profile", _FIX)
    layers = arch.moe_layer_indices(config)
    m = cfg.signature_layers
    sig = layers[:m]
    patterns: dict[str, Any] = {}
    for t in profile.tasks:
        stats, tokens = profile.combined([t])
        mean_logits = stats["logit_sum"][:m] / tokens  # [m, E]
        ranking = profile.scores(cfg.score, [t]).argsort(dim=1, descending=True, stable=True)
        patterns[t] = {"signature": mean_logits.flatten().tolist(), "ranking": ranking.tolist(), "tokens": tokens}
    generalist = {"ranking": profile.scores(cfg.score).argsort(dim=1, descending=True, stable=True).tolist(),
                  "tasks": profile.tasks}
    # Thresholds: how far calibration windows of every task lie from their own pattern (windows drawn with the
    # next seed, so not the ones a profile of the same calibration settings read).
    c = ctx.calibration
    chosen = [t for t in resolve_tasks(profile.tasks, {k: Path(v) for k, v in c.data.items()})
              if t.task in profile.tasks]
    windows = task_windows(ctx.tokenizer, chosen, "calib", c.seq_len, c.samples, c.seed + 1)
    batches = [w[i:i + cfg.batch_size] for w in windows.values() for i in range(0, len(w), cfg.batch_size)]
    with ctx.stream(batches) as stream:
        signatures = routing_signatures(stream, sig)  # [N, m * E]
    centroids = torch.tensor([patterns[t]["signature"] for t in profile.tasks])
    own, hits, total, start = [], 0, 0, 0
    for t, w in windows.items():
        j = profile.tasks.index(t)
        d = cosine_distance(signatures[start:start + len(w)], centroids)  # [N, tasks]
        start += len(w)
        own.append(d[:, j])
        hits += int((d.argmin(1) == j).sum())
        total += len(w)
    # Per task: the 99th percentile of its own calibration windows' distances (times a margin).
    threshold = {t: cfg.margin * float(torch.quantile(d, 0.99)) for t, d in zip(windows, own)}
    own_d = torch.cat(own)
    combined, _ = profile.combined()
    flags = super_experts(combined["act_max"])
    source = ctx.source.path if ctx.source.path is not None else ctx.source.label
    store = PatternStore(identity, str(source), sig, threshold, cfg.score,
                         [[layers[j], e] for j, e in flags.nonzero().tolist()], patterns, generalist,
                         {"windows": total, "seq_len": c.seq_len, "accuracy": hits / total,
                          "own_distance_q50": float(own_d.median()), "own_distance_q99": float(torch.quantile(own_d, 0.99)),
                          "margin": cfg.margin, "profile": str(profile.path) if profile.path else "(this recipe)"})
    if ctx.out_dir is not None:
        store.save(ctx.out_dir)
    ctx.artifacts["patterns"] = store
    return {"tasks": profile.tasks, "signature_layers": sig, "threshold": threshold, **store.calibration}
