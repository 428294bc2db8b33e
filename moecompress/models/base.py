"""Per-architecture knowledge as typed data (`MoEArch`) plus a view over one MoE block (`MoEBlockView`).

An `MoEArch` names where a family keeps its MoE parts, which config keys hold the expert count, and
how its router turns logits into top-k weights (`Routing`). Everything else in moecompress speaks
roles (router, experts, shared experts, pre-MoE norm) through `MoEBlockView`, never module paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from moecompress.algorithms.moe_math import moe_combine, routed_outputs
from moecompress.algorithms.routing import route
from moecompress.models.experts import ExpertView, FusedExperts, ListExperts
from moecompress.types import Activation, Routing

__all__ = ["MoEArch", "MoEBlockView", "every_layer", "glu_from_config", "resolve"]


def every_layer(config: PretrainedConfig, i: int) -> bool:
    return True


def glu_from_config(config: PretrainedConfig) -> Activation:
    return Activation("glu", getattr(config, "hidden_act", "silu"))


def resolve(root: nn.Module, path: str) -> torch.Tensor | nn.Module:
    """Follow a dotted attribute path (modules, parameters or buffers)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class MoEArch:
    """Where one family keeps its MoE parts (paths relative to the decoder layer / MoE block)."""

    name: str
    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]  # every config.json key holding the routed-expert count (canonical first)
    routing: Callable[[PretrainedConfig, int], Routing]  # (config, layer index) -> rule
    activation: Callable[[PretrainedConfig], Activation] = glu_from_config
    is_moe_layer: Callable[[PretrainedConfig, int], bool] = every_layer
    top_k_key: str = "num_experts_per_tok"
    layers: str = "model.layers"
    moe_block: str = "mlp"  # in the decoder layer
    router: str = "gate"  # in the block
    router_weight: str = "weight"  # in the router: [E, H]
    router_bias: str | None = None  # in the router: [E], part of the logits
    correction_bias: str | None = None  # in the router: [E] or [1, E], added to scores for the choice only
    experts: str = "experts"  # in the block
    expert_layout: Literal["fused", "fused_transposed_interleaved", "list"] = "fused"
    shared_experts: str | None = None  # in the block: an MLP with gate_proj/up_proj/down_proj
    shared_gate: str | None = None  # in the block: Linear(H, 1); output scaled by sigmoid
    pre_moe_norm: str = "post_attention_layernorm"  # in the decoder layer
    pre_attn_norm: str = "input_layernorm"  # in the decoder layer: the norm whose output attention reads
    final_norm: str = "model.norm"  # in the CausalLM, before the LM head
    logits_divisor_key: str | None = None  # config key the LM head's logits are divided by (Granite)
    group_keys: tuple[str, str] | None = None  # config keys (n_group, topk_group) if routing can be group-limited
    router_group_attrs: tuple[str, ...] = ("num_group", "topk_group")  # the router's cached copies of them
    notes: str = field(default="", compare=False)

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_keys[0]))

    def moe_layer_indices(self, config: PretrainedConfig) -> list[int]:
        return [i for i in range(config.num_hidden_layers) if self.is_moe_layer(config, i)]

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return resolve(model, self.layers)

    def block(self, model: PreTrainedModel, i: int) -> MoEBlockView:
        return MoEBlockView(self, model.config, i, self.decoder_layers(model)[i])

    def moe_blocks(self, model: PreTrainedModel) -> list[MoEBlockView]:
        return [self.block(model, i) for i in self.moe_layer_indices(model.config)]


class MoEBlockView:
    """Roles of one decoder layer's MoE block, and a reference recomputation of its output."""

    def __init__(self, arch: MoEArch, config: PretrainedConfig, index: int, layer: nn.Module) -> None:
        self.arch, self.config, self.index, self.layer = arch, config, index, layer
        self.block: nn.Module = resolve(layer, arch.moe_block)
        self.router: nn.Module = resolve(self.block, arch.router)
        experts = resolve(self.block, arch.experts)
        if arch.expert_layout == "list":
            self.experts: ExpertView = ListExperts(experts)
        else:
            t = arch.expert_layout == "fused_transposed_interleaved"
            self.experts = FusedExperts(experts, transposed=t, interleaved=t)
        self.shared: ExpertView | None = None
        if arch.shared_experts is not None:
            shared = getattr(self.block, arch.shared_experts, None)
            self.shared = None if shared is None else ListExperts(shared)
        self.shared_gate: nn.Linear | None = None if arch.shared_gate is None else resolve(self.block, arch.shared_gate)

    # ------------------------------------------------------------------ tensors
    @property
    def router_weight(self) -> torch.Tensor:
        return resolve(self.router, self.arch.router_weight)  # [E, H]

    @property
    def router_bias(self) -> torch.Tensor | None:
        return None if self.arch.router_bias is None else resolve(self.router, self.arch.router_bias)

    @property
    def correction_bias(self) -> torch.Tensor | None:
        return None if self.arch.correction_bias is None else resolve(self.router, self.arch.correction_bias)

    @property
    def routing(self) -> Routing:
        return self.arch.routing(self.config, self.index)

    @property
    def activation(self) -> Activation:
        return self.arch.activation(self.config)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def pre_moe_norm(self) -> nn.Module:
        return resolve(self.layer, self.arch.pre_moe_norm)

    def pre_moe_norm_weight(self) -> torch.Tensor | None:
        return getattr(self.pre_moe_norm, "weight", None)

    # ------------------------------------------------------------------ math
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H] -> [T, E]`` raw logits, in float32 where the family computes them so."""
        w, b = self.router_weight, self.router_bias
        if self.routing.fp32:
            x, w, b = x.float(), w.float(), None if b is None else b.float()
        return nn.functional.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(logits [T, E], weights [T, K], index [T, K])``."""
        logits = self.router_logits(x)
        cb = self.correction_bias
        weights, index = route(logits, self.routing, None if cb is None else cb.reshape(-1))
        return logits, weights, index

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared experts' contribution for ``x [T, H]`` (gate included), or None."""
        if self.shared is None:
            return None
        y = routed_outputs(x, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device), self.shared.weights(),
                           self.activation)
        y = y[:, 0]
        if self.shared_gate is not None:
            y = torch.sigmoid(nn.functional.linear(x, self.shared_gate.weight)) * y
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recompute the block's output from the adapter alone. ``[T, H] -> [T, H]``."""
        _, weights, index = self.route(x)
        out = moe_combine(routed_outputs(x, index, self.experts.weights(), self.activation), weights)
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def call_block(self, x: torch.Tensor) -> torch.Tensor:
        """Run the real block module on ``x [B, S, H]`` and return ``[B, S, H]`` (tuple outputs unwrapped)."""
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out

    # ------------------------------------------------------------------ surgery
    @torch.no_grad()
    def keep(self, ids: Sequence[int]) -> None:
        """Keep routed experts ``ids`` (in that order): slices router rows, router and correction biases
        and every expert tensor, and updates the modules' cached expert counts. Shared experts untouched."""
        old = self.num_experts
        ids = list(ids)
        for path in (self.arch.router_weight, self.arch.router_bias, self.arch.correction_bias):
            if path is None:
                continue
            *parent_path, name = path.split(".")
            parent = resolve(self.router, ".".join(parent_path)) if parent_path else self.router
            t = getattr(parent, name)
            new = t.data.index_select(t.dim() - 1 if t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == old else 0,
                                      torch.as_tensor(ids, dtype=torch.long, device=t.device))
            if isinstance(t, nn.Parameter):
                setattr(parent, name, nn.Parameter(new.contiguous(), requires_grad=t.requires_grad))
            else:
                parent._buffers[name] = new.contiguous()
        self.experts.keep(ids)
        for m in self.block.modules():
            for attr in ("num_experts", "num_local_experts"):
                if isinstance(getattr(m, attr, None), int) and getattr(m, attr) == old:
                    setattr(m, attr, len(ids))
            if isinstance(m, nn.Linear) and m is self.router:
                m.out_features = len(ids)
