"""DeepSeek-V2 (arXiv:2405.04434): fp32 softmax, ``greedy`` or ``group_limited_greedy`` top-k (group score =
best expert in the group), never renormalised (the config's ``norm_topk_prob`` is ignored by transformers),
times ``routed_scaling_factor``; ungated shared experts; the first ``first_k_dense_replace`` layers are dense."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing


def routing(cfg, i: int) -> Routing:
    grouped = cfg.topk_method == "group_limited_greedy"
    return Routing(
        "softmax", cfg.num_experts_per_tok, scaling=cfg.routed_scaling_factor, fp32=True,
        group_score="max" if grouped else None,
        n_group=cfg.n_group if grouped else 1, topk_group=cfg.topk_group if grouped else 1,
    )


DEEPSEEK_V2 = register_arch(MoEArch(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    num_experts_keys=("n_routed_experts",),
    routing=routing,
    is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
    shared_experts="shared_experts",
    group_keys=("n_group", "topk_group"),
))
