"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), batched over experts as in QMoE (arXiv:2310.16795).

For each expert, columns are quantized one at a time and the error is spread over the columns not yet
quantized through the inverse Hessian's Cholesky factor, in blocks (lazy batch updates). Options: act
order (columns by decreasing ``diag(H)``), damping (a fraction of ``mean(diag(H))``), per-group scales
computed from the original weights' groups ("static groups", so act order never reorders groups and
the packed layout needs no group index), symmetric or asymmetric grids. Hessians ``H = sum_t g_t x_t
x_t^T`` come from each expert's routed tokens weighted by their gate score (MoEQuant's affinity-guided
Hessian, arXiv:2505.03804); an all-zero Hessian (an expert with no tokens) becomes the identity, i.e. RTN.
With a `TernaryGrid` this is QMoE's error-compensated ternary GPTQ (arXiv:2310.16795), with group scales.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.quant_grid import QuantGrid, QuantResult, TernaryGrid, dequantize

__all__ = ["gptq_quantize", "proxy_loss"]


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W - Q) H (W - Q)^T)`` per expert: the output error GPTQ minimises. ``[E, O, C], [E, C, C] -> [E]``."""
    D = (W - Q).double()
    return torch.einsum("eoc,ecd,eod->e", D, H.double(), D)


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: QuantGrid | TernaryGrid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    params: tuple[torch.Tensor, ...] | None = None,
) -> QuantResult:
    """Quantize ``W [E, O, C]`` given Hessians ``H [E, C, C]``; returns codes in the original column order.
    ``params``: the groups' ``(scale, zero)`` ``[E, O, G]`` to use (integer grids; default: from ``W``'s groups)."""
    E, O, C = W.shape
    G, gs = grid.groups(C), grid.size(C)
    if C % gs:
        raise ValueError(f"group size {gs} does not divide {C} columns")
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    empty = H.diagonal(dim1=1, dim2=2).sum(-1) == 0  # [E]
    H[empty] = torch.eye(C, device=H.device)
    dead = H.diagonal(dim1=1, dim2=2) == 0  # [E, C] columns no token ever touched
    idx = torch.arange(C, device=H.device)
    H[:, idx, idx] = torch.where(dead, torch.ones_like(H[:, idx, idx]), H[:, idx, idx])
    # Static groups: parameters from the original weights, fixed before any error feedback or reordering.
    params = [p[..., 0] for p in grid.params(W.reshape(E, O, G, gs))] if params is None else \
        [p.float() for p in params]  # each [E, O, G]
    scale, zero = params[0], params[1]
    perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True) if act_order else \
        idx.expand(E, C).clone()  # [E, C]
    W = W.gather(2, perm[:, None, :].expand(E, O, C))
    H = H.gather(1, perm[:, :, None].expand(E, C, C)).gather(2, perm[:, None, :].expand(E, C, C))
    group_of = torch.div(perm, gs, rounding_mode="floor")  # [E, C] group of each (permuted) column
    d = H.diagonal(dim1=1, dim2=2).mean(-1) * damp  # [E]
    H[:, idx, idx] += d[:, None]
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)  # [E, C, C]
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    losses = torch.zeros(E, O, device=W.device)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]  # [E, O]
            dg = Hinv1[:, i, i]  # [E]
            g = group_of[:, i1 + i]  # [E]
            col = [p.gather(2, g[:, None, None].expand(E, O, 1))[..., 0] for p in params]  # each [E, O]
            q = grid.codes(w, *col)
            wq = grid.dequant(q, *col) if isinstance(grid, TernaryGrid) else dequantize(q, col[0], col[1])
            codes[:, :, i1 + i] = q
            Q[:, :, i1 + i] = wq
            err = (w - wq) / dg[:, None]
            losses += (w - wq) ** 2 / dg[:, None] ** 2 / 2
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    inv = torch.argsort(perm, dim=1)
    Q = Q.gather(2, inv[:, None, :].expand(E, O, C))
    codes = codes.gather(2, inv[:, None, :].expand(E, O, C))
    neg = params[3] if isinstance(grid, TernaryGrid) and grid.two_scales else None
    return QuantResult(Q, codes.to(torch.uint8), scale, zero, losses.sum(-1), neg)
