"""ERNIE 4.5 MoE: fp32 softmax; the choice adds ``moe_statics.e_score_correction_bias [1, E]``; weights are
the probabilities renormalised by ``max(sum, moe_norm_min)``; ungated shared experts; sparse layers every
``moe_layer_interval`` between ``moe_layer_start_index`` and ``moe_layer_end_index`` (-1 = last layer)."""

from moecompress.models.base import MoEArch
from moecompress.models.registry import register_arch
from moecompress.types import Routing


def is_sparse(cfg, i: int) -> bool:
    end = cfg.moe_layer_end_index if cfg.moe_layer_end_index >= 0 else cfg.num_hidden_layers - 1
    return (i + 1) % cfg.moe_layer_interval == 0 and cfg.moe_layer_start_index <= i <= end


ERNIE4_5_MOE = register_arch(MoEArch(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    num_experts_keys=("moe_num_experts",),
    top_k_key="moe_k",
    routing=lambda cfg, i: Routing("softmax", cfg.moe_k, renormalize=True, renorm_min=cfg.moe_norm_min, fp32=True),
    is_moe_layer=is_sparse,
    correction_bias="moe_statics.e_score_correction_bias",
    shared_experts="shared_experts",
))
