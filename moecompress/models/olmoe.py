"""OLMoE (Muennighoff et al. 2024, arXiv:2409.02060): softmax top-k, renormalised if ``norm_topk_prob``."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing

OLMOE = register_arch(MoEArch(
    name="olmoe",
    model_types=("olmoe",),
    num_experts_keys=("num_experts",),
    routing=lambda cfg, i: Routing("softmax", cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob)),
))
