"""PhiMoE (Phi-3.5-MoE): SparseMixer routing, hard-coded top-2 whatever ``num_experts_per_tok`` says, with
``router_jitter_noise`` as the masking threshold also in eval (arXiv:2409.12136); LayerNorm, not RMSNorm."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing

PHIMOE = register_arch(MoEArch(
    name="phimoe",
    model_types=("phimoe",),
    num_experts_keys=("num_local_experts",),
    routing=lambda cfg, i: Routing("sparsemixer", 2, jitter_eps=cfg.router_jitter_noise),
    router="router",
))
