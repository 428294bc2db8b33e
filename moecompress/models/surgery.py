"""Structural expert removal through the adapters, such that plain transformers still loads the result.

transformers stores one routed-expert count per config, so every MoE layer must keep the same number
of experts (which ones may differ per layer). Group-limited routers (DeepSeek-V2/V3, GLM-4-MoE) route
within contiguous groups of ``E / n_group`` experts: keeping the same number from every group keeps
the routing rule intact; otherwise ``regroup=True`` rewrites the grouping to one group (which changes
routing, and is reported).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel

from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch, MoEBlockView

__all__ = ["check_keep", "keep_experts", "keep_layer", "set_expert_count"]


def check_keep(
    arch: MoEArch, config, keep: Mapping[int, Sequence[int]], regroup: bool = False
) -> dict[int, list[int]]:
    """Validate a keep plan and return it normalised (every MoE layer present, ids sorted).

    Layers absent from ``keep`` keep every expert. Raises `MoecompressError` with the fix on any
    plan transformers could not load or that would break the family's routing rule.
    """
    layers = arch.moe_layer_indices(config)
    n = arch.num_experts(config)
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise MoecompressError(f"layers {unknown} are not MoE layers", f"the MoE layers are {layers}")
    plan: dict[int, list[int]] = {}
    for i in layers:
        ids = sorted(int(e) for e in keep.get(i, range(n)))
        if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= n)):
            raise MoecompressError(f"layer {i}: expert ids must be distinct and in 0..{n - 1}, got {ids}",
                                   "fix the keep list")
        plan[i] = ids
    counts = {len(v) for v in plan.values()}
    if len(counts) != 1:
        raise MoecompressError(
            f"the plan keeps different expert counts per layer ({sorted(counts)})",
            "transformers stores one expert count per config; keep the same number in every MoE layer",
        )
    kept = counts.pop()
    top_k = max(arch.routing(config, i).top_k for i in layers)
    if kept < top_k:
        raise MoecompressError(f"the plan keeps {kept} of {n} experts but top_k is {top_k}",
                               f"keep at least {top_k} experts per layer")
    rule = arch.routing(config, layers[0])
    if rule.group_score is not None and rule.n_group > 1 and not regroup:
        size = n // rule.n_group
        for i, ids in plan.items():
            per_group = [sum(1 for e in ids if e // size == g) for g in range(rule.n_group)]
            if len(set(per_group)) != 1:
                raise MoecompressError(
                    f"layer {i} keeps {per_group} experts from its {rule.n_group} routing groups",
                    "keep the same number from every group, or allow regrouping to a single group",
                )
        per = kept // rule.n_group
        need = 2 if rule.group_score == "top2_sum" else 1
        if per < need or rule.top_k > rule.topk_group * per:
            raise MoecompressError(
                f"keeping {per} experts per group breaks group-limited routing "
                f"(needs at least {max(need, -(-rule.top_k // rule.topk_group))} per group)",
                "keep more experts, or allow regrouping to a single group",
            )
    return plan


def keep_experts(
    model: PreTrainedModel, arch: MoEArch, keep: Mapping[int, Sequence[int]], regroup: bool = False
) -> dict[int, list[int]]:
    """Remove every routed expert not listed in ``keep`` (layer -> original ids), in place.

    Slices router rows, router and correction biases and expert tensors (shared experts untouched),
    rewrites every config key holding the expert count (and the grouping when ``regroup``), and
    updates cached counts on the modules. Returns the normalised plan.
    """
    plan = check_keep(arch, model.config, keep, regroup)
    old = arch.num_experts(model.config)
    for view in arch.moe_blocks(model):
        keep_layer(view, plan[view.index], regroup)
    set_expert_count(model.config, arch, len(next(iter(plan.values()))), regroup)
    for m in model.modules():
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(m, attr, None), int) and getattr(m, attr) == old:
                setattr(m, attr, len(next(iter(plan.values()))))
    return plan


def keep_layer(view: MoEBlockView, ids: Sequence[int], regroup: bool = False) -> None:
    """Keep routed experts ``ids`` of one MoE block (a checked plan's entry), in place; with ``regroup`` the
    router's cached group counts become 1."""
    if list(ids) != list(range(view.num_experts)):
        view.keep(ids)
    rule = view.routing
    if regroup and view.arch.group_keys and rule.n_group > 1:
        for attr in view.arch.router_group_attrs:
            setattr(view.router, attr, 1)


def set_expert_count(config, arch: MoEArch, n: int, regroup: bool = False) -> None:
    """Write the routed-expert count into every config key the adapter lists (and one routing group when
    ``regroup`` on a group-limited family)."""
    groups = arch.routing(config, arch.moe_layer_indices(config)[0]).n_group
    for key in arch.num_experts_keys:
        setattr(config, key, n)
    if regroup and arch.group_keys and groups > 1:
        for key in arch.group_keys:
            setattr(config, key, 1)
