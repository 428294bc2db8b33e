"""Runtime modules whose weights stay packed in memory and are dequantized on the fly.

`PackedLinear` replaces an ``nn.Linear``; `PackedExperts` replaces a fused experts module and computes each
active expert from its own packed slice (only the experts the tokens were routed to are decoded). Buffer
names follow docs/FORMAT.md; for experts they avoid ``gate_up_proj.*`` / ``down_proj.*``, which transformers'
reverse key conversion would split per expert. Activation quantization recorded with the checkpoint
(A8/A4, and the online rotation of the experts' intermediate) is applied inside the modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moecompress.algorithms.moe_math import ExpertWeights, glu
from moecompress.formats.codecs import CODECS
from moecompress.kernels import dispatch
from moecompress.nn.act_quant import ActQuant, rotation_matrix
from moecompress.runtime.hooks import experts_call_args
from moecompress.types import Activation, Proj

__all__ = ["PackedExperts", "PackedLinear"]

PROJS = ("gate", "up", "down")


def _buffers(module: nn.Module, prefix: str, codec: str, shape: tuple[int, int, int], group: int,
             symmetric: bool) -> None:
    E, O, C = shape
    c = CODECS.get(codec)
    G = max(1, C // group) if group > 0 else 1
    if c.base3:
        module.register_buffer(f"{prefix}_trits", torch.zeros(E, O, (C + 4) // 5, dtype=torch.uint8))
    else:
        module.register_buffer(f"{prefix}_packed", torch.zeros(E, O, (C * c.bits + 31) // 32, dtype=torch.int32))
    module.register_buffer(f"{prefix}_scale", torch.zeros(E, O, G, dtype=torch.float16))
    if not symmetric and not c.ternary:
        module.register_buffer(f"{prefix}_zero", torch.zeros(E, O, G, dtype=torch.uint8))
    module.register_buffer(f"{prefix}_shape", torch.tensor([E, O, C], dtype=torch.int64))


def dequantize_packed(codec: str, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` from a codec's packed tensors (through the kernel dispatch)."""
    return dispatch.dequantize_packed(*_args(codec, t), dtype)


def _args(codec: str, t: dict[str, torch.Tensor]) -> tuple:
    c = CODECS.get(codec)
    return c.bits, c.ternary, c.base3, (t["trits"] if c.base3 else t["packed"]), t["scale"], t.get("zero"), \
        int(t["shape"][2])


def _tensors(module: nn.Module, prefix: str, experts: slice | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for local in ("packed", "trits", "scale", "zero", "shape"):
        t = getattr(module, f"{prefix}_{local}", None)
        if t is not None:
            out[local] = t if experts is None or local == "shape" else t[experts]
    if experts is not None:
        out["shape"] = torch.tensor([experts.stop - experts.start, *out["shape"][1:].tolist()])
    return out


class PackedLinear(nn.Module):
    """A linear layer with a packed weight (``weight_packed`` / ``weight_trits``, ``weight_scale``, ...)."""

    def __init__(self, in_features: int, out_features: int, codec: str, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codec, self.group_size, self.symmetric = codec, group_size, symmetric
        self.act: ActQuant | None = None
        _buffers(self, "weight", codec, (1, out_features, in_features), group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.codec, _tensors(self, "weight"), dtype)[0]  # [O, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        flat = x.reshape(-1, x.shape[-1])
        y = dispatch.packed_linear(flat, *_args(self.codec, _tensors(self, "weight")))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class _PackedExpertView:
    """The adapter-facing view of `PackedExperts` (dequantized stacks, read-only)."""

    def __init__(self, module: PackedExperts) -> None:
        self.module = module

    @property
    def num_experts(self) -> int:
        return self.module.num_experts

    def stacked(self, proj) -> torch.Tensor:
        return self.module.dequantized(Proj(proj).value)

    def weight(self, e: int, proj) -> torch.Tensor:
        return self.stacked(proj)[e]

    def bias(self, proj) -> torch.Tensor | None:
        return getattr(self.module, f"{Proj(proj).value}_bias", None)

    def bias_tensors(self) -> list[torch.Tensor]:
        return [b for p in PROJS if (b := self.bias(p)) is not None]

    def weights(self) -> ExpertWeights:
        return ExpertWeights(*(self.stacked(p) for p in PROJS), *(self.bias(p) for p in PROJS))

    def set_stacked(self, proj, w) -> None:
        raise TypeError("packed experts are read-only; quantize from the unpacked (fake-quant) checkpoint")

    def keep(self, ids) -> None:
        raise TypeError("packed experts cannot be pruned; prune before quantizing")

    def numel(self) -> int:
        E, I, H = self.module.num_experts, self.module.intermediate, self.module.hidden
        return 3 * E * I * H

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class PackedExperts(nn.Module):
    """Routed experts with packed gate/up ``[E, I, H]`` and down ``[E, H, I]`` weights."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, spec: dict[str, Any],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.spec = spec
        self.codecs = spec["codecs"]  # proj -> codec
        self.activation = Activation(**spec["activation"])
        self.inter_rotation_seed = spec.get("intermediate_rotation_seed")
        self.act: ActQuant | None = None
        shapes = {"gate": (num_experts, intermediate, hidden), "up": (num_experts, intermediate, hidden),
                  "down": (num_experts, hidden, intermediate)}
        for p in PROJS:
            _buffers(self, p, self.codecs[p], shapes[p], spec["group_size"], spec["symmetric"])
            if spec.get("bias"):
                self.register_parameter(f"{p}_bias", nn.Parameter(torch.zeros(shapes[p][:2], dtype=dtype)))

    def expert_view(self) -> _PackedExpertView:
        return _PackedExpertView(self)

    def dequantized(self, proj: str, experts: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_packed(self.codecs[proj], _tensors(self, proj, experts), dtype)
        if proj == "down" and self.inter_rotation_seed is not None:  # stored as W Q: give back W = (W Q) Q^T
            w = w @ rotation_matrix(self.intermediate, self.inter_rotation_seed, w.device).to(dtype).T
        return w

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Every (token, slot) pair through its expert: gate/up, the GLU, down; weighted sum over slots.
        On Triton each projection is one grouped launch over all active experts."""
        hidden, index, weights = experts_call_args(args, kwargs)
        x = hidden if self.act is None else self.act(hidden)
        T, K = index.shape
        rows_expert = index.reshape(-1)  # [T*K]
        xs = x.repeat_interleave(K, dim=0)  # [T*K, H], row t*K + k is token t's k-th slot
        gb, ub, db = (getattr(self, f"{p}_bias", None) for p in PROJS)
        g = dispatch.grouped_linear(xs, rows_expert, *_args(self.codecs["gate"], _tensors(self, "gate")))
        u = dispatch.grouped_linear(xs, rows_expert, *_args(self.codecs["up"], _tensors(self, "up")))
        if gb is not None:
            g, u = g + gb[rows_expert].to(g.dtype), u + ub[rows_expert].to(u.dtype)
        h = glu(g, u, self.activation)
        if self.inter_rotation_seed is not None:  # the online rotation the rotated down weights expect
            h = h @ rotation_matrix(self.intermediate, self.inter_rotation_seed, h.device).to(h.dtype)
        if self.act is not None:
            h = self.act(h)
        y = dispatch.grouped_linear(h, rows_expert, *_args(self.codecs["down"], _tensors(self, "down")))
        if db is not None:
            y = y + db[rows_expert].to(y.dtype)
        y = y * weights.reshape(-1, 1).to(y.dtype)
        return y.view(T, K, -1).sum(1).to(hidden.dtype)
