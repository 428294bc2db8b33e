"""Uniform integer quantization grids for weights (per channel or per group) and activations (per token).

Weights ``[..., O, C]`` are split along C into groups of ``group_size`` (``-1``: one group per row).
Each group gets a scale and, when asymmetric, a zero point: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,
``w_hat = (q - z) * s`` (GPTQ's convention, Frantar et al. 2022, arXiv:2210.17323). Symmetric grids fix
``z = 2^(b-1)`` (so codes are still unsigned). The MSE clip search (as in GPTQ's ``mse`` option) shrinks
the range per group and keeps the factor with the least ``|w - w_hat|^2.4``: a coarse pass over
``1.00, 0.95, ..., 0.20``, then the neighbourhood of the best factor in steps of 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantGrid", "QuantResult", "dequantize", "fake_quant_tokens", "find_params", "quantize_codes",
           "rtn_quantize"]


@dataclass(frozen=True)
class QuantGrid:
    bits: int
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    clip_search: bool = True

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size in (-1, 0) or self.group_size >= columns else columns // self.group_size

    def size(self, columns: int) -> int:
        return columns if self.group_size in (-1, 0) else min(self.group_size, columns)


@dataclass
class QuantResult:
    """Quantized weights ``[E, O, C]``: dequantized values, integer codes and per-group parameters."""

    weight: torch.Tensor  # [E, O, C] dequantized (float32)
    codes: torch.Tensor  # [E, O, C] uint8
    scales: torch.Tensor  # [E, O, G]
    zeros: torch.Tensor  # [E, O, G] (integer-valued)
    loss: torch.Tensor | None = None  # [E] GPTQ's proxy loss, when computed


def _params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    same = (xmax - xmin) == 0
    xmin, xmax = torch.where(same, -torch.ones_like(xmin), xmin), torch.where(same, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def find_params(w: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[..., 1]`` for each row of ``w [..., n]`` (one quantization group per row)."""
    w = w.float()
    xmin, xmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale, zero = _params(xmin, xmax, grid.maxq, grid.symmetric)
    if not grid.clip_search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    factor = torch.ones_like(scale)

    def trial(p: torch.Tensor) -> None:
        nonlocal best, scale, zero, factor
        s, z = _params(p * xmin, p * xmax, grid.maxq, grid.symmetric)
        err = (dequantize(quantize_codes(w, s, z, grid.maxq), s, z) - w).abs().pow(2.4).sum(dim=-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        factor = torch.where(better, p, factor)

    for i in range(17):  # 1.00 .. 0.20 in steps of 0.05
        trial(torch.full_like(scale, 1 - 0.05 * i))
    coarse = factor.clone()
    for d in (-4, -3, -2, -1, 1, 2, 3, 4):  # refine around each group's best in steps of 0.01
        trial((coarse + 0.01 * d).clamp(0.2, 1.0))
    return scale, zero


def rtn_quantize(W: torch.Tensor, grid: QuantGrid) -> QuantResult:
    """Round-to-nearest ``W [E, O, C]`` on ``grid`` (per group, with the MSE clip search if enabled)."""
    E, O, C = W.shape
    G, gs = grid.groups(C), grid.size(C)
    if C % gs:
        raise ValueError(f"group size {gs} does not divide {C} columns")
    Wg = W.float().reshape(E, O, G, gs)
    scale, zero = find_params(Wg, grid)  # [E, O, G, 1]
    q = quantize_codes(Wg, scale, zero, grid.maxq)
    return QuantResult(dequantize(q, scale, zero).reshape(E, O, C), q.reshape(E, O, C).to(torch.uint8),
                       scale[..., 0], zero[..., 0])


def fake_quant_tokens(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = True) -> torch.Tensor:
    """Per-token dynamic fake quantization of activations ``[..., C]`` (each row its own scale)."""
    maxq = 2 ** bits - 1
    xf = x.float()
    if symmetric:
        amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) * clip_ratio
        scale = amax / (maxq // 2)
        out = torch.clamp(torch.round(xf / scale), -(maxq // 2) - 1, maxq // 2) * scale
    else:
        xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        scale = ((xmax - xmin) / maxq).clamp(min=1e-8)
        zero = torch.round(-xmin / scale)
        out = (torch.clamp(torch.round(xf / scale) + zero, 0, maxq) - zero) * scale
    return out.to(x.dtype)
