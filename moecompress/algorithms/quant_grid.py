"""Uniform integer quantization grids for weights (per channel or per group) and activations (per token).

Weights ``[..., O, C]`` are split along C into groups of ``group_size`` (``-1``: one group per row).
Each group gets a scale and, when asymmetric, a zero point: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,
``w_hat = (q - z) * s`` (GPTQ's convention, Frantar et al. 2022, arXiv:2210.17323). Symmetric grids fix
``z = 2^(b-1)`` (so codes are still unsigned). The MSE clip search (as in GPTQ's ``mse`` option) shrinks
the range per group and keeps the factor with the least ``|w - w_hat|^2.4``: a coarse pass over
``1.00, 0.95, ..., clip_floor`` (0.20 by default), then the neighbourhood of the best factor in steps of 0.01.
A higher floor keeps wider ranges: the range that is best for rounding the weights alone clips more than
suits GPTQ, whose error feedback must then absorb the clipped weights (at 2 bits g128 the full search picks
0.57-0.72 of the range on the demo's experts, 10th-90th percentile; at 3 bits 0.77-0.89); `stages.quantize`
raises the floor to 0.8 for GPTQ at 2 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantGrid", "QuantResult", "TernaryGrid", "dequantize", "dequantize_ternary", "fake_quant_tokens", "find_params",
           "fractional_zero_bits", "quantize_codes", "rtn_quantize", "storable", "ternary_params"]


@dataclass(frozen=True)
class QuantGrid:
    bits: int
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    clip_search: bool = True
    clip_floor: float = 0.2  # the smallest range factor the clip search tries
    zero_frac: int = 0  # fraction bits of asymmetric zero points (0: integers; `fractional_zero_bits`)

    def __post_init__(self) -> None:
        if self.symmetric and self.zero_frac:
            raise ValueError("symmetric grids have a fixed integer zero; fractional zeros need an asymmetric grid")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size in (-1, 0) or self.group_size >= columns else columns // self.group_size

    def size(self, columns: int) -> int:
        return columns if self.group_size in (-1, 0) else min(self.group_size, columns)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-row quantization parameters of ``w [..., n]``: ``(scale, zero)``, each ``[..., 1]``."""
        return find_params(w, self)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, scale, zero, self.maxq, self.zero_frac > 0)


def fractional_zero_bits(bits: int) -> int:
    """Fraction bits a uint8 zero point has room for beside the integer part of a ``bits``-wide grid's zero
    (``8 - bits``): zeros in steps of ``2^-(8 - bits)`` on ``[0, 2^bits)``, in the same byte as an integer zero."""
    return max(0, 8 - bits)


@dataclass(frozen=True)
class TernaryGrid:
    """Ternary weights ``t * alpha``, ``t`` in {-1, 0, 1}, one ``alpha`` per group, stored as codes ``t + 1`` with a
    fixed zero of 1 (so ``(q - z) * s`` dequantizes them like any grid).

    rule ``absmean`` (BitNet b1.58, arXiv:2402.17764): threshold ``0.5 * mean|w|``, ``alpha = mean|w|``;
    ``twn`` (Li et al. 2016, arXiv:1605.04711): threshold ``0.7 * mean|w|`` and ``alpha`` refit by least squares
    over the surviving weights (the mean of their magnitudes);
    ``qmoe`` (Frantar & Alistarh 2023, arXiv:2310.16795): asymmetric levels ``{xmin, 0, xmax}`` per group with
    ``xmin = min(w_min, 0)``, ``xmax = max(w_max, 0)``, thresholds ``xmax / 2`` and ``xmin / 2``: 88-93 % zeros on
    Gaussian rows. Its two levels are two scales: ``scale = xmax`` and ``scale_neg = -xmin`` (`two_scales`).

    ``threshold`` (the zero-fraction control) replaces the rule's factor (0.5, 0.7, 0.5): larger gives more
    zeros and more error.
    """

    rule: str = "twn"
    group_size: int = 128
    threshold: float | None = None
    bits: int = 2  # storage width of the codes in the 2-bit layout
    symmetric: bool = True

    @property
    def maxq(self) -> int:
        return 2

    @property
    def two_scales(self) -> bool:
        return self.rule == "qmoe"

    def groups(self, columns: int) -> int:
        return QuantGrid(2, self.group_size).groups(columns)

    def size(self, columns: int) -> int:
        return QuantGrid(2, self.group_size).size(columns)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ternary_params(w, self.rule, self.threshold)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, thresh: torch.Tensor,
              *neg: torch.Tensor) -> torch.Tensor:
        if neg:  # qmoe: (scale_neg, threshold_neg), both magnitudes
            return torch.where(w > thresh, 2.0, torch.where(w < -neg[1], 0.0, 1.0))
        return torch.where(w.abs() > thresh, torch.sign(w), torch.zeros_like(w)) + 1

    def dequant(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if self.two_scales:
            return dequantize_ternary(q, scale, extra[1])
        return dequantize(q, scale, zero)


def dequantize_ternary(q: torch.Tensor, scale: torch.Tensor, scale_neg: torch.Tensor | None) -> torch.Tensor:
    """Ternary codes ``q = t + 1`` to values: ``t * scale``, or with ``scale_neg`` (two-level grids such as QMoE's)
    ``scale`` for ``t = 1`` and ``-scale_neg`` for ``t = -1``. ``q``, ``scale``, ``scale_neg`` broadcast together."""
    if scale_neg is None:
        return (q - 1) * scale
    return torch.where(q > 1, scale, torch.where(q < 1, -scale_neg, torch.zeros_like(scale)))


_DEFAULT_THRESHOLD = {"absmean": 0.5, "twn": 0.7, "qmoe": 0.5}


def ternary_params(w: torch.Tensor, rule: str = "twn", threshold: float | None = None) -> tuple[torch.Tensor, ...]:
    """``(alpha, zero = 1, threshold)``, each ``[..., 1]``, for rows of ``w [..., n]``; rule ``qmoe`` adds
    ``(scale_neg, threshold_neg)`` (magnitudes of the negative level and threshold)."""
    if rule not in _DEFAULT_THRESHOLD:
        raise ValueError(f"unknown ternary rule {rule!r}; use absmean, twn or qmoe")
    f = _DEFAULT_THRESHOLD[rule] if threshold is None else float(threshold)
    w = w.float()
    if rule == "qmoe":
        xmax = storable(w.amax(dim=-1, keepdim=True).clamp(min=0))
        xmin = storable((-w.amin(dim=-1, keepdim=True)).clamp(min=0))
        return xmax, torch.ones_like(xmax), f * xmax, xmin, f * xmin
    m = w.abs().mean(dim=-1, keepdim=True).clamp(min=1e-12)
    if rule == "absmean":
        alpha, thresh = m, f * m
    else:
        thresh = f * m
        keep = w.abs() > thresh
        alpha = (w.abs() * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
        alpha = torch.where(keep.any(-1, keepdim=True), alpha, m)
    alpha = storable(alpha)
    return alpha, torch.ones_like(alpha), thresh


@dataclass
class QuantResult:
    """Quantized weights ``[E, O, C]``: dequantized values, integer codes and per-group parameters."""

    weight: torch.Tensor  # [E, O, C] dequantized (float32)
    codes: torch.Tensor  # [E, O, C] uint8
    scales: torch.Tensor  # [E, O, G]
    zeros: torch.Tensor  # [E, O, G] (integer-valued)
    loss: torch.Tensor | None = None  # [E] GPTQ's proxy loss, when computed
    neg_scales: torch.Tensor | None = None  # [E, O, G] two-level ternary grids (qmoe): the negative level's magnitude


def storable(scale: torch.Tensor) -> torch.Tensor:
    """Scales as the packed format stores them (float16), so packed and fake-quantized weights agree exactly."""
    return scale.clamp(min=1e-6, max=60000.0).half().float()


def _params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, symmetric: bool,
            zero_frac: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    same = (xmax - xmin) == 0
    xmin, xmax = torch.where(same, -torch.ones_like(xmin), xmin), torch.where(same, torch.ones_like(xmax), xmax)
    scale = storable((xmax - xmin) / maxq)
    if symmetric:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    if zero_frac:  # the grid's first level as close to xmin as the zero's fraction bits allow
        k = 2.0 ** zero_frac
        return scale, (torch.round(-xmin / scale * k) / k).clamp(0, maxq)
    return scale, torch.round(-xmin / scale)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                   fractional: bool = False) -> torch.Tensor:
    """The nearest level's code; ``fractional``: zeros that need not be integers (``round(w / s + z)``; integer
    zeros keep ``round(w / s) + z``, which differs from it only on exact ties, for unchanged bytes)."""
    if fractional:
        return torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def find_params(w: torch.Tensor, grid: QuantGrid, rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[..., 1]`` for each row of ``w [..., n]`` (one quantization group per row).

    The clip search runs over ``rows`` rows at a time with one reused buffer (in-place arithmetic): the same
    choices as a whole-tensor search, bit for bit, about 5x faster on the CPU and with a bounded working set.
    """
    lead, n = w.shape[:-1], w.shape[-1]
    flat = w.detach().reshape(-1, n)  # parameters may require grad; the search never needs it
    parts = [_find_rows(flat[i:i + rows].float(), grid) for i in range(0, max(flat.shape[0], 1), rows)]  # >= 1
    scale, zero = (torch.cat(p) for p in zip(*parts))
    return scale.reshape(*lead, 1), zero.reshape(*lead, 1)


def _find_rows(w: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``find_params`` of ``w [R, n]`` (float32)."""
    xmin, xmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    frac = grid.zero_frac
    scale, zero = _params(xmin, xmax, grid.maxq, grid.symmetric, frac)
    if not grid.clip_search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    factor = torch.ones_like(scale)
    buf = torch.empty_like(w)

    def trial(p: torch.Tensor) -> None:
        nonlocal best, scale, zero, factor
        s, z = _params(p * xmin, p * xmax, grid.maxq, grid.symmetric, frac)
        # |dequantize(quantize_codes(w, s, z)) - w| ** 2.4, in place
        q = torch.div(w, s, out=buf).add_(z).round_() if frac else torch.div(w, s, out=buf).round_().add_(z)
        d = q.clamp_(0, grid.maxq).sub_(z).mul_(s).sub_(w).abs_().pow_(2.4)
        err = d.sum(dim=-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        factor = torch.where(better, p, factor)

    floor = grid.clip_floor
    for i in range(int((1 - floor) / 0.05 + 1e-6) + 1):  # 1.00 .. floor in steps of 0.05 (none below it)
        trial(torch.full_like(scale, 1 - 0.05 * i))
    coarse = factor.clone()
    for d in (-4, -3, -2, -1, 1, 2, 3, 4):  # refine around each group's best in steps of 0.01
        trial((coarse + 0.01 * d).clamp(floor, 1.0))
    return scale, zero


def rtn_quantize(W: torch.Tensor, grid: QuantGrid | TernaryGrid) -> QuantResult:
    """Round-to-nearest ``W [E, O, C]`` on ``grid`` (per group; integer grids with the MSE clip search if enabled)."""
    E, O, C = W.shape
    G, gs = grid.groups(C), grid.size(C)
    if C % gs:
        raise ValueError(f"group size {gs} does not divide {C} columns")
    Wg = W.float().reshape(E, O, G, gs)
    params = grid.params(Wg)  # each [E, O, G, 1]
    q = grid.codes(Wg, *params)
    scale, zero = params[0], params[1]
    w = grid.dequant(q, *params) if isinstance(grid, TernaryGrid) else dequantize(q, scale, zero)
    neg = params[3][..., 0] if isinstance(grid, TernaryGrid) and grid.two_scales else None
    return QuantResult(w.reshape(E, O, C), q.reshape(E, O, C).to(torch.uint8), scale[..., 0], zero[..., 0],
                       neg_scales=neg)


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
