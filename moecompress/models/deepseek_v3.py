"""DeepSeek-V3 (arXiv:2412.19437): fp32 sigmoid scores; the choice adds ``e_score_correction_bias`` (kept
fp32) and is limited to the ``topk_group`` best of ``n_group`` contiguous groups (group score = sum of its two
best); weights are the bias-free sigmoids, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``;
ungated shared experts; the first ``first_k_dense_replace`` layers are dense."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing


def routing(cfg, i: int) -> Routing:
    return Routing(
        "sigmoid", cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob), renorm_eps=1e-20,
        scaling=cfg.routed_scaling_factor, group_score="top2_sum", n_group=cfg.n_group,
        topk_group=cfg.topk_group, fp32=True,
    )


DEEPSEEK_V3 = register_arch(MoEArch(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    num_experts_keys=("n_routed_experts",),
    routing=routing,
    is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
    correction_bias="e_score_correction_bias",
    shared_experts="shared_experts",
    group_keys=("n_group", "topk_group"),
))
