"""Tiny random MoE models built from configs (no hub): the test fixtures and the CLI's ``tiny:<type>`` ids.

Every registered architecture needs one entry in `FAMILY` (``tests/models`` fails otherwise). The
configs are small (hidden 64, 8 experts of width 24, top-2, so ``2I != H`` and shapes cannot be
confused) but keep each family's routing features switched on: groups, correction biases, shared
experts and their gates, dense layers mixed with sparse ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

__all__ = ["FAMILY", "TINY", "DeviceMix", "skew_router", "tiny_config", "tiny_moe"]

TINY: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=False,
    bos_token_id=256, eos_token_id=256, pad_token_id=256,  # tiny_tokenizer(): 256 bytes + <|endoftext|>
)
_E8 = 8  # routed experts in every tiny model
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4, head_dim=8)  # MLA: no grouped KV heads; rotary width = qk_rope_head_dim

FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=_E8, num_experts_per_tok=2, intermediate_size=24),
    "qwen2_moe": dict(num_experts=_E8, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_hidden_layers=3, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=_E8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                      num_hidden_layers=3, mlp_only_layers=[1]),
    "olmoe": dict(num_experts=_E8, num_experts_per_tok=2, intermediate_size=24),
    "deepseek_v2": dict(n_routed_experts=_E8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, topk_method="group_limited_greedy",
                        n_group=2, topk_group=1, routed_scaling_factor=2.0, **_MLA),
    "deepseek_v3": dict(n_routed_experts=_E8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5, **_MLA),
    "gpt_oss": dict(num_local_experts=_E8, num_experts_per_tok=2, intermediate_size=24, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phimoe": dict(num_local_experts=_E8, num_experts_per_tok=2, intermediate_size=24),
    "granitemoe": dict(num_local_experts=_E8, num_experts_per_tok=2, intermediate_size=24),
    "glm4_moe": dict(n_routed_experts=_E8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                     first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1, norm_topk_prob=True,
                     routed_scaling_factor=1.5, partial_rotary_factor=0.5),
    "ernie4_5_moe": dict(moe_num_experts=_E8, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=1,
                         num_hidden_layers=3, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1),
    "hunyuan_v1_moe": dict(num_experts=_E8, moe_topk=2, intermediate_size=24),
}


def tiny_config(model_type: str, **overrides: Any):
    """The tiny config of a registered family (see `FAMILY`), with optional overrides."""
    if model_type not in FAMILY:
        raise KeyError(f"no tiny config for {model_type!r}; add one to moecompress/testing.py FAMILY")
    kwargs = {**TINY, **FAMILY[model_type], **overrides}
    cfg = AutoConfig.for_model(model_type, **kwargs)
    return cfg


@torch.no_grad()
def tiny_moe(model_type: str, seed: int = 0, hot_experts: Sequence[int] = (), **overrides: Any) -> PreTrainedModel:
    """A seeded random tiny MoE in eval mode (fp32, eager experts).

    Routers are re-initialised with a larger scale than HF's default (std 0.02 would make every router
    nearly uniform) and every optional bias (router bias, score-correction bias, expert biases) is set
    to a random non-zero value, so the tests exercise them. ``hot_experts`` skews every router towards
    those experts (see `skew_router`).
    """
    from moecompress.models import find_arch  # local import: testing is a leaf utility used by tests and cli

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    arch = find_arch(model.config)
    g = torch.Generator().manual_seed(seed + 1)
    for view in arch.moe_blocks(model):
        w = view.router_weight
        w.copy_(torch.randn(w.shape, generator=g) * (2.0 / w.shape[1] ** 0.5))
        for b in (view.router_bias, view.correction_bias):
            if b is not None:
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.2)
        for t in view.experts.bias_tensors():
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    if hot_experts:
        skew_router(model, hot_experts)
    return model


@torch.no_grad()
def skew_router(model: PreTrainedModel, hot_experts: Sequence[int], strength: float = 3.0) -> None:
    """Make ``hot_experts`` win most tokens in every MoE layer.

    Every token embedding gets a shared unit direction ``d`` (so every residual stream, hence every
    normalised MoE input, leans towards ``d``), and the hot experts' router rows get ``strength * d``.
    """
    from moecompress.models import find_arch

    arch = find_arch(model.config)
    emb = model.get_input_embeddings().weight  # [V, H]
    g = torch.Generator().manual_seed(1234)
    d = torch.randn(emb.shape[1], generator=g)
    d = d / d.norm()
    emb += d.to(emb.dtype) * emb.norm(dim=1, keepdim=True).mean() * 2.0
    for view in arch.moe_blocks(model):
        w = view.router_weight  # [E, H]
        for e in hot_experts:
            w[e] += (strength * d).to(w.dtype)


class DeviceMix(TorchDispatchMode):
    """Records every operator whose tensors span more than one device (0-dim CPU scalars aside, which CUDA
    accepts; explicit copies such as ``.to(device)`` are transfers, not mixes). Run code on ``meta`` tensors
    inside it: a tensor made on the CPU without ``device=`` (an index, a zero buffer) then used with the
    model's shows up as a mix, which on a GPU is an error or a hidden host round trip."""

    TRANSFERS = ("aten._to_copy", "aten.copy_", "aten.to.")

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(self.TRANSFERS):
            return out
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        devices = {t.device for t in leaves
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(str(d) for d in devices)}")
        return out
