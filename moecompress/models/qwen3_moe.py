"""Qwen3-MoE: softmax top-k (renormalised if ``norm_topk_prob``, True in released checkpoints), no shared
expert, QK-norm attention. transformers 5 writes ``num_local_experts`` while hub files and older tools read
``num_experts``: both are written."""

from moecompress.models.base import MoEArch
from moecompress.models.qwen2_moe import is_sparse
from moecompress.models.registry import register_arch
from moecompress.types import Routing

QWEN3_MOE = register_arch(MoEArch(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    num_experts_keys=("num_local_experts", "num_experts"),
    routing=lambda cfg, i: Routing("softmax", cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob)),
    is_moe_layer=is_sparse,
))
