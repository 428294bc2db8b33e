"""The computation of gated expert MLPs, batched over experts, from plain 2-D weights.

An expert is ``y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down`` (Shazeer 2020,
arXiv:2002.05202); an MoE layer sums the top-k experts' outputs weighted by the routing weights
(Fedus et al. 2022). Weights follow nn.Linear's ``[O, C]`` convention whatever the storage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from moecompress.types import Activation

__all__ = ["ExpertWeights", "RoutedTokens", "expert_forward", "expert_intermediate", "glu", "moe_combine",
           "routed_output_stats", "routed_outputs"]


@dataclass
class ExpertWeights:
    """Stacked expert weights: gate/up ``[E, I, H]``, down ``[E, H, I]``; optional biases ``[E, I]``/``[E, H]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


@dataclass
class RoutedTokens:
    """One call's routed (token, slot) pairs grouped by expert, from a single stable sort of the top-k choices
    instead of a scan of ``index [T, K]`` per expert: expert ``e``'s tokens in increasing order and their routing
    weights are ``tokens[b[e]:b[e+1]]``, ``gates[b[e]:b[e+1]]`` (`of`), the same as
    ``(index == e).any(1).nonzero()`` and ``(weights * (index == e)).sum(1)`` at those tokens (a token chooses an
    expert at most once)."""

    tokens: torch.Tensor  # [T*K] token numbers, by expert
    gates: torch.Tensor  # [T*K] their routing weights
    bounds: list[int]  # [E + 1]

    @classmethod
    def group(cls, index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> RoutedTokens:
        """``index, weights [T, K]`` of a call with ``num_experts`` experts."""
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
        return cls(order // index.shape[-1], weights.reshape(-1)[order], [0] + counts.cumsum(0).tolist())

    def of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s tokens ``[n]`` and gates ``[n]``."""
        a, b = self.bounds[e], self.bounds[e + 1]
        return self.tokens[a:b], self.gates[a:b]


def expert_intermediate(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_bias: torch.Tensor | None,
                        up_bias: torch.Tensor | None, act: Activation, dtype: torch.dtype) -> torch.Tensor:
    """One expert's intermediate ``act(W_gate x + b_gate) * (W_up x + b_up)`` (``x [T, H]``, ``gate, up [I, H]``,
    biases ``[I]`` or None) computed in ``dtype``, as the model computes it (its parameters' dtype: the values its
    down projection reads, and on CPUs and GPUs with bf16 units several times faster than float32), returned as
    float32 ``[T, I]``."""
    def lin(w, b):
        return torch.nn.functional.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    return glu(lin(gate, gate_bias), lin(up, up_bias), act).float()


def glu(gate: torch.Tensor, up: torch.Tensor, act: Activation) -> torch.Tensor:
    """Combine gate and up pre-activations (same shape ``[..., I]``)."""
    if act.kind == "clamped_swiglu":
        g = gate.clamp(max=act.limit)
        u = up.clamp(min=-act.limit, max=act.limit)
        return (u + 1) * g * torch.sigmoid(g * act.alpha)
    return _activation(act.fn)(gate) * up


@functools.lru_cache(maxsize=None)
def _activation(name: str):
    """transformers' activation module ``name``, built once (``ACT2FN[name]`` builds a new module on every
    lookup: host time on every expert call)."""
    return ACT2FN[name]


def expert_forward(x: torch.Tensor, w: ExpertWeights, e: int, act: Activation) -> torch.Tensor:
    """Expert ``e`` on tokens ``x [N, H] -> [N, H]``."""
    g = torch.nn.functional.linear(x, w.gate[e], None if w.gate_bias is None else w.gate_bias[e])
    u = torch.nn.functional.linear(x, w.up[e], None if w.up_bias is None else w.up_bias[e])
    return torch.nn.functional.linear(glu(g, u, act), w.down[e], None if w.down_bias is None else w.down_bias[e])


def routed_outputs(x: torch.Tensor, index: torch.Tensor, w: ExpertWeights, act: Activation) -> torch.Tensor:
    """Unweighted output of every (token, slot) pair's chosen expert. ``x [T, H]``, ``index [T, K]`` -> ``[T, K, H]``.

    Runs each expert only on the tokens routed to it.
    """
    T, K = index.shape
    out = x.new_zeros(T, K, x.shape[-1])
    flat = index.reshape(-1)  # [T*K]
    for e in torch.unique(flat).tolist():
        pos = (flat == e).nonzero().squeeze(-1)  # positions in [T*K]
        tok = pos // K
        out.view(T * K, -1)[pos] = expert_forward(x[tok], w, e, act).to(out.dtype)
    return out


def moe_combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over slots: ``[T, K, H]`` x ``[T, K]`` -> ``[T, H]``."""
    return (outputs * weights.to(outputs.dtype).unsqueeze(-1)).sum(dim=1)


def routed_output_stats(
    x: torch.Tensor, index: torch.Tensor, w: ExpertWeights, act: Activation, experts: range | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per routed (token, slot): ``||f_e(x)||_2``, ``max |act(gate) * up|`` and ``max |f_e(x)|``, each ``[T, K]``.

    Runs each expert only on its routed tokens and keeps no ``[T, K, H]`` tensor. ``experts``: compute only
    these (the other slots stay 0: expert parallelism sums the slots of every process).
    """
    T, K = index.shape
    norm, act_max, out_max = (x.new_zeros(T * K, dtype=torch.float32) for _ in range(3))
    flat = index.reshape(-1)
    for e in torch.unique(flat).tolist():
        if experts is not None and e not in experts:
            continue
        pos = (flat == e).nonzero().squeeze(-1)
        xe = x[pos // K]
        g = torch.nn.functional.linear(xe, w.gate[e], None if w.gate_bias is None else w.gate_bias[e])
        u = torch.nn.functional.linear(xe, w.up[e], None if w.up_bias is None else w.up_bias[e])
        h = glu(g, u, act)  # [n, I]
        y = torch.nn.functional.linear(h, w.down[e], None if w.down_bias is None else w.down_bias[e])
        norm[pos] = y.float().norm(dim=-1)
        act_max[pos] = h.float().abs().amax(dim=-1)
        out_max[pos] = y.float().abs().amax(dim=-1)
    return norm.view(T, K), act_max.view(T, K), out_max.view(T, K)
