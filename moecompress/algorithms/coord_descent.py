"""Coordinate-descent refinement of GPTQ's codes (QuantEase, Behdin et al. 2023, arXiv:2309.01885).

With the group parameters fixed, the Hessian-weighted error ``(w - w_hat) H (w - w_hat)^T`` of a row is a
quadratic in each code alone: holding the others, its minimum over the grid is the unconstrained optimum
``q_j + (D H)_j / H_jj`` (``D = W - W_hat``) rounded to the nearest level and clamped, so a cyclic sweep over
the columns never increases the error. GPTQ's result is the starting point (QuantEase starts from it too);
a sweep costs about one GPTQ pass. Alternating sweeps with `algorithms.refit` (scales and zeros for fixed
codes) is block coordinate descent on the same objective.

Shapes: E experts, O output rows, C input columns, G groups of ``C / G`` columns.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.quant_grid import QuantResult, dequantize, quantize_codes

__all__ = ["refine_codes"]


@torch.no_grad()
def refine_codes(W: torch.Tensor, H: torch.Tensor, res: QuantResult, maxq: int, sweeps: int = 1,
                 damp: float = 0.0, block: int = 64, fractional: bool = False) -> QuantResult:
    """``sweeps`` cyclic passes over the columns of ``W [E, O, C]`` (Hessians ``H [E, C, C]``; an all-zero one
    counts as the identity) re-choosing each code of ``res`` on its group's fixed grid ``0 .. maxq``.

    Lazy updates, as GPTQ's: a code change updates ``P = (W - W_hat) H`` at once only on the columns of its
    ``block``; the block's changes reach the other columns in one batched product when the block ends (the same
    decisions as updating every column each time, in products instead of ``C`` rank-one updates). ``fractional``:
    the zeros need not be integers (`quant_grid.quantize_codes`)."""
    E, O, C = W.shape
    G = res.scales.shape[-1]
    gs = C // G
    dt = torch.promote_types(W.dtype, torch.float32)  # float32 (float64 inputs stay float64)
    H = H.detach().to(dt).clone()
    H[H.diagonal(dim1=1, dim2=2).sum(-1) == 0] = torch.eye(C, device=H.device, dtype=dt)
    if damp:
        H += damp * H.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(C, device=H.device, dtype=dt)
    diag = H.diagonal(dim1=1, dim2=2).clone()  # [E, C]
    live = diag > 0  # a column no token touched (and undamped) has no say in the error: keep its code
    codes = res.codes.to(dt)
    scale = res.scales.repeat_interleave(gs, -1)  # [E, O, C]
    zero = res.zeros.repeat_interleave(gs, -1)
    Wq = dequantize(codes, scale, zero)
    P = torch.bmm(W.to(dt) - Wq, H)  # [E, O, C]: (W - W_hat) H
    safe = torch.where(live, diag, torch.ones_like(diag))
    for _ in range(sweeps):
        for a in range(0, C, block):
            b = min(a + block, C)
            before = Wq[:, :, a:b].clone()
            for j in range(a, b):
                target = Wq[:, :, j] + P[:, :, j] / safe[:, None, j]
                q = quantize_codes(target, scale[:, :, j], zero[:, :, j], maxq, fractional)
                q = torch.where(live[:, None, j], q, codes[:, :, j])
                new = (q - zero[:, :, j]) * scale[:, :, j]
                delta = Wq[:, :, j] - new  # the change of D's column j
                if bool((delta != 0).any()):
                    P[:, :, a:b] += delta[:, :, None] * H[:, j, None, a:b]
                    codes[:, :, j], Wq[:, :, j] = q, new
            changed = before - Wq[:, :, a:b]  # [E, O, b - a]: the block's changes of D
            if bool((changed != 0).any()):
                if a:
                    P[:, :, :a] += torch.bmm(changed, H[:, a:b, :a])
                if b < C:
                    P[:, :, b:] += torch.bmm(changed, H[:, a:b, b:])
    return QuantResult(Wq, codes.to(torch.uint8), res.scales, res.zeros, res.loss)
