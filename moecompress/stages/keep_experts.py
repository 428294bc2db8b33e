"""Remove routed experts by explicit id lists: structural surgery through the adapters.

The result is a standard checkpoint with fewer experts per layer that plain transformers loads. Use it
to apply an expert selection made elsewhere; the ``prune`` stage chooses the experts from a profile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

from pydantic import model_validator

from moecompress.errors import MoecompressError
from moecompress.io.checkpoint import build_skeleton
from moecompress.models.surgery import check_keep, keep_layer, set_expert_count
from moecompress.runtime.executor import ModelSource
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["KeepExpertsConfig", "LayerWork", "apply_keep", "mask_dead"]


class KeepExpertsConfig(StageConfig):
    """Keep (or drop) the listed experts, for every MoE layer (``all``) or per layer index.

    Example recipe entry::

        - stage: keep_experts
          drop: {all: [6, 7]}        # or keep: {all: [0, 1, 2, 3, 4, 5], 3: [0, 1, 2, 4, 5, 7]}
    """

    stage: Literal["keep_experts"] = "keep_experts"
    keep: dict[int | Literal["all"], list[int]] | None = None
    drop: dict[int | Literal["all"], list[int]] | None = None
    regroup: bool = False  # allow group-limited routers to be rewritten to a single group (changes routing)

    @model_validator(mode="after")
    def _one_of(self) -> KeepExpertsConfig:
        if (self.keep is None) == (self.drop is None):
            raise ValueError("give exactly one of 'keep' or 'drop'")
        return self

    def plan(self, config: Any, arch: Any) -> dict[int, list[int]]:
        n = arch.num_experts(config)
        spec = self.keep if self.keep is not None else self.drop
        plan = {}
        for layer in arch.moe_layer_indices(config):
            ids = spec.get(layer, spec.get("all"))
            if ids is None:
                continue
            bad = [e for e in ids if not 0 <= e < n]
            if bad:
                raise MoecompressError(f"keep_experts: expert ids {bad} are out of range", f"ids run from 0 to {n - 1}")
            plan[layer] = sorted(ids) if self.keep is not None else [e for e in range(n) if e not in set(ids)]
        extra = [k for k in spec if k != "all" and k not in arch.moe_layer_indices(config)]
        if extra:
            raise MoecompressError(f"keep_experts: layers {extra} are not MoE layers",
                                   f"the MoE layers are {arch.moe_layer_indices(config)}")
        return plan

    def check(self, config: Any, arch: Any) -> None:
        check_keep(arch, config, self.plan(config, arch), self.regroup)


@register_stage(KeepExpertsConfig, modifies_model=True, needs_original=True, changes="experts")
def run(ctx: StageContext, cfg: KeepExpertsConfig) -> dict[str, Any]:
    """Remove routed experts by explicit id lists (structural; plain transformers loads the result)."""
    plan, before, after = apply_keep(ctx, cfg.plan(ctx.config, ctx.arch), cfg.regroup)
    ctx.artifacts["kept_experts"] = plan
    return {"experts_before": before["experts"], "experts_after": after["experts"], "params_before": before["params"],
            "params_after": after["params"], "kept_experts": {str(k): v for k, v in plan.items()}}


class LayerWork(Protocol):
    """Per-layer work around the surgery on a stream of ``batches`` (router recalibration, in ``prune``)."""

    batches: list[torch.Tensor]

    def layer(self, stream: Any, i: int, cut: Callable[[], None] | None) -> None:
        """Layer ``i`` is loaded as stored and ``stream.hidden`` holds its inputs: call ``cut()`` (the surgery of
        layer ``i``; None for a layer the plan leaves alone) once, and run the layer (``stream.run_layer(i)``)."""

    def end(self, stream: Any) -> None:
        """After the last layer (the head can be loaded: ``stream.load_head()``)."""


def apply_keep(ctx: StageContext, keep: dict[int, list[int]], regroup: bool = False,
               dead: dict[int, list[int]] | None = None, work: LayerWork | None = None, reads: list | None = None):
    """Stream the model through the surgery: keep ``keep[layer]`` experts per MoE layer (renumbered in that
    order), one layer at a time, into the stage's sink. ``dead``: positions (after renumbering) to make
    unreachable (padding experts: a -1e4 router or correction bias, zero weights). ``work``: per-layer work
    around the surgery (`LayerWork`). ``reads``: a list the stream's checkpoint reader is appended to (its
    ``read_log``: bytes read per stored tensor). Returns the checked plan and the expert / parameter counts before
    and after.

    A model read from disk with no ``work`` is read pruned: only the kept experts' tensors (and router rows) are
    read, into the skeleton of the pruned model, so pruning to half the experts reads half the expert bytes.
    ``work`` needs every expert (it compares with the unpruned layer), so the whole layers are read then."""
    arch, config = ctx.arch, ctx.config
    plan = check_keep(arch, config, keep, regroup)
    E = arch.num_experts(config)
    n = len(next(iter(plan.values())))
    sink = ctx.sink()
    new_config = config if sink.in_place else copy.deepcopy(config)
    if not sink.in_place:
        set_expert_count(new_config, arch, n, regroup)
    src = ctx.source
    pruned_read = work is None and not src.in_memory
    if pruned_read:
        src = ModelSource(new_config, arch, directory=src.directory, tokenizer=src.tokenizer,
                          stored_dtype=src.stored_dtype, label=src.label, path=src.path)
    with ctx.stream(work.batches if work is not None else [], source=src,
                    **({"experts": plan} if pruned_read else {})) as stream:
        before = _params(build_skeleton(config, stream.dtype, "meta") if pruned_read else stream.model)
        if reads is not None and stream.files is not None:
            reads.append(stream.files)
        for i in range(stream.num_layers):
            stream.load(i)

            def cut(i: int = i) -> None:
                view = arch.block(stream.model, i)
                keep_layer(view, range(n) if pruned_read else plan[i], regroup)
                if dead and dead.get(i):
                    mask_dead(view, dead[i])

            if work is None:
                if i in plan:
                    cut()
            else:
                work.layer(stream, i, cut if i in plan else None)
            sink.layer(stream, i)
            stream.release(i)
        if work is not None:
            work.end(stream)
        after = _params(stream.model)
        sink.outside(stream)
    if sink.in_place:
        set_expert_count(new_config, arch, n, regroup)
    ctx.adopt(sink, new_config)
    return plan, {"experts": E, "params": before}, {"experts": n, "params": after}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


@torch.no_grad()
def mask_dead(view, positions: list[int]) -> None:
    """Make padding experts unreachable: a -1e4 router or correction bias, zero weights."""
    bias = view.correction_bias if view.correction_bias is not None else view.router_bias
    bias.view(-1)[positions] = -1e4
    for proj in ("gate", "up", "down"):
        w = view.experts.stacked(proj).clone()
        w[positions] = 0
        view.experts.set_stacked(proj, w)
