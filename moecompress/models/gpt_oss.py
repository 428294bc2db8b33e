"""gpt-oss: router with a bias; top-k on the logits, softmax over the K; experts stored transposed
(``gate_up_proj [E, H, 2I]`` with gate/up interleaved by column, ``down_proj [E, I, H]``) with biases and
a clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``). The block returns ``(hidden, router_scores)``."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Activation, Routing

GPT_OSS = register_arch(MoEArch(
    name="gpt_oss",
    model_types=("gpt_oss",),
    num_experts_keys=("num_local_experts",),
    routing=lambda cfg, i: Routing("topk_softmax", cfg.num_experts_per_tok),
    activation=lambda cfg: Activation("clamped_swiglu", alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit),
    router="router",
    router_bias="bias",
    expert_layout="fused_transposed_interleaved",
))
