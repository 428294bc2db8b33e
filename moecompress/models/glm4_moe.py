"""GLM-4.5 MoE: DeepSeek-V3 routing (sigmoid + correction bias + group-limited top-k), ungated shared
experts, first ``first_k_dense_replace`` layers dense."""

from moecompress.models.base import MoEArch
from moecompress.models.deepseek_v3 import routing
from moecompress.models.registry import register_arch

GLM4_MOE = register_arch(MoEArch(
    name="glm4_moe",
    model_types=("glm4_moe",),
    num_experts_keys=("n_routed_experts",),
    routing=routing,
    is_moe_layer=lambda cfg, i: i >= cfg.first_k_dense_replace,
    correction_bias="e_score_correction_bias",
    shared_experts="shared_experts",
    group_keys=("n_group", "topk_group"),
))
