"""Mixtral (Jiang et al. 2024, arXiv:2401.04088): softmax top-k, always renormalised; no shared experts."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing

MIXTRAL = register_arch(MoEArch(
    name="mixtral",
    model_types=("mixtral",),
    num_experts_keys=("num_local_experts",),
    routing=lambda cfg, i: Routing("softmax", cfg.num_experts_per_tok, renormalize=True),
))
