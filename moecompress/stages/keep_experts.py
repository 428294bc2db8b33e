"""Remove routed experts by explicit id lists: structural surgery through the adapters.

The result is a standard checkpoint with fewer experts per layer that plain transformers loads. Use it
to apply an expert selection made elsewhere; the ``prune`` stage chooses the experts from a profile.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from pydantic import model_validator

from moecompress.errors import MoecompressError
from moecompress.models.surgery import check_keep, keep_layer, set_expert_count
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["KeepExpertsConfig", "apply_keep", "mask_dead"]


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


def apply_keep(ctx: StageContext, keep: dict[int, list[int]], regroup: bool = False,
               dead: dict[int, list[int]] | None = None):
    """Stream the model through the surgery: keep ``keep[layer]`` experts per MoE layer (renumbered in that
    order), one layer at a time, into the stage's sink. ``dead``: positions (after renumbering) to make
    unreachable (padding experts: a -1e4 router or correction bias, zero weights). Returns the checked plan
    and the expert / parameter counts before and after."""
    arch, config = ctx.arch, ctx.config
    plan = check_keep(arch, config, keep, regroup)
    E = arch.num_experts(config)
    n = len(next(iter(plan.values())))
    sink = ctx.sink()
    params = {"before": 0, "after": 0}
    with ctx.stream([]) as stream:
        for i, layer in stream.layers_in_order():
            params["before"] += sum(p.numel() for p in layer.parameters())
            if i in plan:
                view = arch.block(stream.model, i)
                keep_layer(view, plan[i], regroup)
                if dead and dead.get(i):
                    mask_dead(view, dead[i])
            params["after"] += sum(p.numel() for p in layer.parameters())
            sink.layer(stream, i)
        outside = stream.outside_state()
        rest = sum(t.numel() for t in {t.data_ptr(): t for t in outside.values()}.values())
        sink.outside(stream, outside)
    new_config = config if sink.in_place else copy.deepcopy(config)
    set_expert_count(new_config, arch, n, regroup)
    ctx.adopt(sink, new_config)
    return plan, {"experts": E, "params": params["before"] + rest}, {"experts": n, "params": params["after"] + rest}


@torch.no_grad()
def mask_dead(view, positions: list[int]) -> None:
    """Make padding experts unreachable: a -1e4 router or correction bias, zero weights."""
    bias = view.correction_bias if view.correction_bias is not None else view.router_bias
    bias.view(-1)[positions] = -1e4
    for proj in ("gate", "up", "down"):
        w = view.experts.stacked(proj).clone()
        w[positions] = 0
        view.experts.set_stacked(proj, w)
