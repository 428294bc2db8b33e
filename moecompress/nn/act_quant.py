"""Simulated activation quantization in the forward pass (per-token dynamic, with a clip ratio).

Every quantized linear's input is fake-quantized: attention and dense/shared MLP ``nn.Linear`` inputs by
a forward pre-hook; routed experts by replacing the experts module's forward with one that quantizes the
expert input and each expert's intermediate activation (the down-projection input). Routers (and
shared-expert gates) keep full-precision inputs unless ``router`` is set. Installing returns a handle
whose ``remove()`` restores the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.algorithms.moe_math import glu
from moecompress.algorithms.quant_grid import fake_quant_tokens
from moecompress.algorithms.rotation import random_orthogonal
from moecompress.models.base import MoEArch, MoEBlockView
from moecompress.models.calls import experts_call_args

__all__ = ["ActQuant", "ActQuantHandle", "install_act_quant", "install_layer_act_quant", "rotation_matrix"]


@dataclass(frozen=True)
class ActQuant:
    bits: int
    clip_ratio: float = 1.0
    symmetric: bool = True
    router: bool = False  # also quantize router / shared-gate inputs
    inter_rotation_seed: int | None = None  # experts' down inputs are quantized as h Q (online Hadamard, QuaRot)

    @classmethod
    def from_record(cls, spec: dict | None) -> ActQuant | None:
        """The scheme a checkpoint records (``quantization.activations`` in ``moecompress.json``, or a packed
        config's ``activations``), or None."""
        if not spec:
            return None
        return cls(spec["bits"], spec.get("clip_ratio", 1.0), spec.get("symmetric", True), spec.get("router", False),
                   spec.get("intermediate_rotation_seed"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_tokens(x, self.bits, self.clip_ratio, self.symmetric)

    def intermediate(self, h: torch.Tensor) -> torch.Tensor:
        """Quantize an expert's down-projection input; with a rotation, in the rotated basis (``aq(h Q) Q^T``,
        i.e. what ``aq(h Q) (W_down Q)^T`` computes with the rotated weights of a deployment)."""
        if self.inter_rotation_seed is None:
            return self(h)
        Q = rotation_matrix(h.shape[-1], self.inter_rotation_seed, h.device).to(h.dtype)
        return self(h @ Q) @ Q.T


_ROT: dict[tuple[int, int, str], torch.Tensor] = {}


def rotation_matrix(n: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The (cached) float32 orthogonal matrix used for intermediate rotations of width ``n``, on ``device``
    (default: the CPU; a model computing on a GPU gets its copy there once)."""
    key = (n, seed, str(torch.device(device or "cpu")))
    if key not in _ROT:
        cpu = (n, seed, "cpu")
        if cpu not in _ROT:
            _ROT[cpu] = random_orthogonal(n, seed).float()
        _ROT[key] = _ROT[cpu].to(key[2])
    return _ROT[key]


@dataclass
class ActQuantHandle:
    hooks: list = field(default_factory=list)
    restores: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for r in self.restores:
            r()
        self.hooks.clear()
        self.restores.clear()


def _experts_forward(view: MoEBlockView, aq: ActQuant):
    def forward(*args, **kwargs):
        hidden_states, index, weights = experts_call_args(args, kwargs)
        w = view.experts.weights()
        x = aq(hidden_states)
        out = torch.zeros_like(hidden_states)
        K = index.shape[-1]
        flat = index.reshape(-1)
        for e in torch.unique(flat).tolist():
            pos = (flat == e).nonzero().squeeze(-1)
            tok = pos // K
            g = nn.functional.linear(x[tok], w.gate[e], None if w.gate_bias is None else w.gate_bias[e])
            u = nn.functional.linear(x[tok], w.up[e], None if w.up_bias is None else w.up_bias[e])
            h = aq.intermediate(glu(g, u, view.activation))
            y = nn.functional.linear(h, w.down[e], None if w.down_bias is None else w.down_bias[e])
            out.index_add_(0, tok, (y * weights.reshape(-1)[pos, None].to(y.dtype)).to(out.dtype))
        return out

    return forward


def install_layer_act_quant(view_layer: nn.Module, views: list[MoEBlockView], aq: ActQuant,
                            handle: ActQuantHandle) -> None:
    """Fake-quantize activations inside one decoder layer (its MoE block views given in ``views``)."""
    skip: set[int] = set()
    for v in views:
        skip.add(id(v.experts.module))
        if not aq.router:
            skip.add(id(v.router))
            if v.shared_gate is not None:
                skip.add(id(v.shared_gate))
        experts = v.experts.module
        original = experts.__dict__.get("forward")
        experts.forward = _experts_forward(v, aq)
        handle.restores.append(lambda m=experts, o=original: (
            setattr(m, "forward", o) if o is not None else m.__dict__.pop("forward", None)))
    experts_params = {id(p) for v in views for p in v.experts.module.parameters()}
    for m in view_layer.modules():
        if isinstance(m, nn.Linear) and id(m) not in skip and id(m.weight) not in experts_params:
            handle.hooks.append(m.register_forward_pre_hook(lambda mod, args: (aq(args[0]),) + tuple(args[1:])))


def install_act_quant(model: nn.Module, arch: MoEArch, aq: ActQuant) -> ActQuantHandle:
    """Fake-quantize activations in every decoder layer (not the LM head)."""
    handle = ActQuantHandle()
    views = {v.index: v for v in arch.moe_blocks(model)}
    for i, layer in enumerate(arch.decoder_layers(model)):
        install_layer_act_quant(layer, [views[i]] if i in views else [], aq, handle)
    return handle
