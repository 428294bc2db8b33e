"""Task-adaptive expert retrieval (PreMoe's TAER, Pei et al. 2025, arXiv:2505.17639): prune for a prompt.

Route the prompt through the first MoE layers only (the layer-streaming probe of `runtime.prompt_routing`), take
the nearest task pattern of a pattern store (``patterns`` stage), or the generalist pattern when the prompt is
farther than the task's threshold, keep that pattern's best experts per layer (super experts protected, whole
routing groups) and write the pruned model with the surgery stream (``keep_experts.apply_keep``), which reads
only the kept experts' tensors from the checkpoint: with a one-layer signature, keeping half the experts reads
half the expert bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from moecompress.algorithms.pruning import select_experts
from moecompress.errors import MoecompressError
from moecompress.formats.patterns import PatternStore
from moecompress.models.identity import check_identity, config_identity
from moecompress.runtime.identity import source_identity
from moecompress.runtime.prompt_routing import cosine_distance, routing_signatures
from moecompress.stages.base import StageConfig, StageContext, register_stage
from moecompress.stages.keep_experts import apply_keep

__all__ = ["RetrieveConfig"]

_FIX = "build it for this model: moecompress patterns MODEL"


class RetrieveConfig(StageConfig):
    """Match a prompt to the nearest task pattern and keep that task's best experts.

    Example recipe entry::

        - stage: retrieve
          store: out/demo-patterns     # or omit after a `patterns` stage in the same recipe
          prompt: "Solve x^2 - 5x + 6 = 0."
          keep_ratio: 0.5              # or keep: 4
    """

    stage: Literal["retrieve"] = "retrieve"
    store: str | None = None
    prompt: str
    keep: int | None = Field(None, ge=1)
    keep_ratio: float | None = Field(None, gt=0.0, le=1.0)
    max_distance: float | None = Field(None, ge=0.0)  # default: the matched task's threshold from the store

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> RetrieveConfig:
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of keep or keep_ratio")
        return self

    def count(self, num_experts: int) -> int:
        return self.keep if self.keep is not None else max(1, round(self.keep_ratio * num_experts))

    def check(self, config: Any, arch: Any) -> None:
        layers = arch.moe_layer_indices(config)
        E = arch.num_experts(config)
        rule = arch.routing(config, layers[0])
        n = self.count(E)
        groups = rule.n_group if rule.group_score else 1
        if n < rule.top_k or n > E or n % groups:
            grouped = f", {groups} routing groups" if groups > 1 else ""
            raise MoecompressError(f"keeping {n} of {E} experts is impossible (top_k {rule.top_k}{grouped})",
                                   f"keep between {rule.top_k} and {E} experts"
                                   + (f", a multiple of {groups}" if groups > 1 else ""))
        if self.store is not None:
            check_identity(PatternStore.load(self.store).model, config_identity(config, arch),
                           "the pattern store", _FIX)


def _resolve_store(ctx: StageContext, cfg: RetrieveConfig) -> PatternStore:
    if cfg.store is not None:
        return PatternStore.load(cfg.store)
    if "patterns" in ctx.artifacts:
        return ctx.artifacts["patterns"]
    raise MoecompressError("retrieve needs a pattern store", "pass --store DIR (from `moecompress patterns`)")


@register_stage(RetrieveConfig, modifies_model=True, needs_original=True, changes="experts", needs_patterns=True)
def run(ctx: StageContext, cfg: RetrieveConfig) -> dict[str, Any]:
    """Match a prompt to the nearest task pattern and keep that task's experts, reading only those experts."""
    arch, config = ctx.arch, ctx.config
    store = _resolve_store(ctx, cfg)
    check_identity(store.model, source_identity(ctx.source, ctx.placement), "the pattern store", _FIX)
    layers = arch.moe_layer_indices(config)
    E = arch.num_experts(config)
    n = cfg.count(E)
    rule = arch.routing(config, layers[0])
    groups = rule.n_group if rule.group_score else 1
    limit = getattr(config, "max_position_embeddings", 4096)
    ids = ctx.tokenizer(cfg.prompt, return_tensors="pt", verbose=False).input_ids[:, :limit]
    t0 = time.time()
    reads, sizes = [], {}
    with ctx.stream([ids]) as stream:
        sig = routing_signatures(stream, store.signature_layers)
        if stream.files is not None:
            reads.append(stream.files)
            sizes = {k: stream.files.nbytes(k) for k in _expert_keys(stream.files, arch, config)}
    tasks = list(store.patterns)
    d = cosine_distance(sig, torch.tensor([store.patterns[t]["signature"] for t in tasks]))[0]
    match_seconds = time.time() - t0
    best = int(d.argmin())
    limit_d = store.threshold[tasks[best]] if cfg.max_distance is None else cfg.max_distance
    fallback = float(d[best]) > limit_d
    ranking = store.generalist["ranking"] if fallback else store.patterns[tasks[best]]["ranking"]
    rank_score = torch.zeros(len(layers), E, dtype=torch.float64)
    for j, order in enumerate(ranking):
        rank_score[j, torch.as_tensor(order)] = -torch.arange(E, dtype=torch.float64)
    protect = torch.zeros(len(layers), E, dtype=torch.bool)
    for layer, e in store.super_experts:
        protect[layers.index(layer), e] = True
    kept = dict(zip(layers, select_experts(rank_score, n, protect, groups)))
    source = ctx.source
    plan, _, _ = apply_keep(ctx, kept, reads=reads)
    ctx.artifacts["kept_experts"] = plan
    report = {
        "source_model": str(source.path) if source.path is not None else source.label,
        "store": str(Path(cfg.store)) if cfg.store is not None else "(this recipe)", "prompt_tokens": int(ids.shape[1]),
        "matched_task": None if fallback else tasks[best], "nearest_task": tasks[best],
        "distance": float(d[best]), "threshold": limit_d, "fallback_to_generalist": fallback,
        "distances": {t: float(v) for t, v in zip(tasks, d)}, "match_seconds": round(match_seconds, 3),
        "experts_before": E, "experts_after": n, "kept_experts": {str(k): v for k, v in plan.items()},
    }
    if reads:  # what was read from the checkpoint (a model held in memory reads nothing)
        log: dict[str, int] = {}
        for f in reads:
            for k, b in f.read_log.items():
                log[k] = log.get(k, 0) + b
        total = sum(sizes.values())
        read = sum(min(b, sizes[k]) for k, b in log.items() if k in sizes)
        report.update({"expert_bytes_read": read, "expert_bytes_total": total,
                       "expert_bytes_read_share": read / total if total else 0.0,
                       "bytes_read_total": sum(f.bytes_read for f in reads),
                       "expert_tensors_read": sorted(k for k in log if k in sizes)})
    return report


def _expert_keys(files, arch, config) -> list[str]:
    """Stored keys of routed-expert tensors (one per expert, or stacked), by the model parameters they load into."""
    prefixes = tuple(f"{arch.layers}.{i}.{arch.moe_block}.{arch.experts}." for i in arch.moe_layer_indices(config))
    return sorted(k for k, target in files.target.items() if target.startswith(prefixes))
