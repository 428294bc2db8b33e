"""Qwen1.5/Qwen2-MoE: softmax top-k (renormalised if ``norm_topk_prob``), a shared expert scaled by
``sigmoid(shared_expert_gate(x))``; dense MLP layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing


def is_sparse(cfg, i: int) -> bool:
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


QWEN2_MOE = register_arch(MoEArch(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    num_experts_keys=("num_experts",),
    routing=lambda cfg, i: Routing("softmax", cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob)),
    is_moe_layer=is_sparse,
    shared_experts="shared_expert",
    shared_gate="shared_expert_gate",
))
