"""Remove routed experts by explicit id lists: structural surgery through the adapters.

The result is a standard checkpoint with fewer experts per layer that plain transformers loads. Use it
to apply an expert selection made elsewhere; the ``prune`` stage chooses the experts from a profile.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from moecompress.errors import MoecompressError
from moecompress.models.surgery import check_keep, keep_experts
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["KeepExpertsConfig"]


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
    model, arch = ctx.model, ctx.arch
    before_e = arch.num_experts(model.config)
    before_p = sum(p.numel() for p in model.parameters())
    plan = keep_experts(model, arch, cfg.plan(model.config, arch), regroup=cfg.regroup)
    ctx.artifacts["kept_experts"] = plan
    after_p = sum(p.numel() for p in model.parameters())
    return {"experts_before": before_e, "experts_after": arch.num_experts(model.config),
            "params_before": before_p, "params_after": after_p, "kept_experts": {str(k): v for k, v in plan.items()}}
