"""Hunyuan-A13B (HunYuan MoE v1): fp32 router ``gate.wg``, softmax top-k always renormalised; ``moe_topk``
may be a per-layer list; a shared MLP (``shared_mlp``) always added, ungated."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing


def routing(cfg, i: int) -> Routing:
    k = cfg.moe_topk if isinstance(cfg.moe_topk, int) else cfg.moe_topk[i]
    return Routing("softmax", k, renormalize=True, fp32=True)


HUNYUAN_V1_MOE = register_arch(MoEArch(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    num_experts_keys=("num_experts",),
    top_k_key="moe_topk",
    routing=routing,
    router_weight="wg.weight",
    shared_experts="shared_mlp",
))
