"""Granite MoE: fp32 logits, top-k on the logits, softmax over the K; block at ``block_sparse_moe``."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing

GRANITEMOE = register_arch(MoEArch(
    name="granitemoe",
    model_types=("granitemoe",),
    num_experts_keys=("num_local_experts",),
    routing=lambda cfg, i: Routing("topk_softmax", cfg.num_experts_per_tok, fp32=True),
    moe_block="block_sparse_moe",
    router="router",
    logits_divisor_key="logits_scaling",
))
