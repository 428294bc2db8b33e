"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), batched over experts as in QMoE (arXiv:2310.16795).

For each expert, columns are quantized one at a time and the error is spread over the columns not yet
quantized through the inverse Hessian's Cholesky factor, in blocks (lazy batch updates, here two-level: rank-1
updates only inside 32-column sub-blocks, matrix products for the rest, with the weights held column-major so
each visited column is one contiguous slice; on the CPU this is 1.4-1.9x faster at Mixtral width). Options: act
order (columns by decreasing ``diag(H)``), damping (a fraction of ``mean(diag(H))``), per-group scales
computed from the original weights' groups ("static groups", so act order never reorders groups and
the packed layout needs no group index), symmetric or asymmetric grids. Hessians ``H = sum_t g_t x_t
x_t^T`` come from each expert's routed tokens weighted by their gate score (MoEQuant's affinity-guided
Hessian, arXiv:2505.03804); an all-zero Hessian (an expert with no tokens) becomes the identity, i.e. RTN.
With a `TernaryGrid` this is QMoE's error-compensated ternary GPTQ (arXiv:2310.16795), with group scales; with a
`trellis.TrellisGrid` each visited column is one Viterbi search over its rows (QTIP's trellis code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moecompress.algorithms.quant_grid import QuantGrid, QuantResult, TernaryGrid, dequantize

__all__ = ["gptq_factor", "gptq_quantize", "proxy_loss"]

SUB = 32  # columns per sub-block of the two-level lazy batch update


@contextmanager
def _column_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for GPTQ's column loop: its many small ops gain little from a second thread and, when
    the cores are shared, every op's thread barrier waits for a descheduled thread (measured: one 5632 x 2048
    projection 2.9 s on one thread against 27.4 s on two beside another 2-thread job). The factorizations and
    the products between blocks keep every thread. Element-wise ops give the same bits on any number of threads."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W - Q) H (W - Q)^T)`` per expert: the output error GPTQ minimises. ``[E, O, C], [E, C, C] -> [E]``."""
    D = (W - Q).double()
    return torch.einsum("eoc,ecd,eod->e", D, H.double(), D)


@torch.no_grad()
def gptq_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What GPTQ needs of the Hessians ``H [E, C, C]`` alone: the column order ``perm [E, C]`` (act order: by
    decreasing ``diag(H)``) and the upper Cholesky factor of the damped, permuted inverse Hessian ``[E, C, C]``.
    An all-zero Hessian (no token) is the identity; a column no token touched gets a unit diagonal."""
    E, C = H.shape[0], H.shape[-1]
    H = H.detach().float().clone()
    empty = H.diagonal(dim1=1, dim2=2).sum(-1) == 0  # [E]
    H[empty] = torch.eye(C, device=H.device)
    dead = H.diagonal(dim1=1, dim2=2) == 0  # [E, C] columns no token ever touched
    idx = torch.arange(C, device=H.device)
    H[:, idx, idx] = torch.where(dead, torch.ones_like(H[:, idx, idx]), H[:, idx, idx])
    perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True) if act_order else \
        idx.expand(E, C).clone()  # [E, C]
    H = H.gather(1, perm[:, :, None].expand(E, C, C)).gather(2, perm[:, None, :].expand(E, C, C))
    d = H.diagonal(dim1=1, dim2=2).mean(-1) * damp  # [E]
    H[:, idx, idx] += d[:, None]
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    del H
    return perm, torch.linalg.cholesky(Hinv, upper=True)


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
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantResult:
    """Quantize ``W [E, O, C]`` given Hessians ``H [E, C, C]``; returns codes in the original column order.
    ``params``: the groups' ``(scale, zero)`` ``[E, O, G]`` to use (integer grids; default: from ``W``'s groups).
    ``factor``: `gptq_factor` of ``H`` with these ``damp`` and ``act_order``, when already computed (GPTQ run
    again on the same Hessians: the same result without factorizing again)."""
    E, O, C = W.shape
    G, gs = grid.groups(C), grid.size(C)
    if C % gs:
        raise ValueError(f"group size {gs} does not divide {C} columns")
    W = W.detach().float().clone()
    # Static groups: parameters from the original weights, fixed before any error feedback or reordering.
    params = [p[..., 0] for p in grid.params(W.reshape(E, O, G, gs))] if params is None else \
        [p.float() for p in params]  # each [E, O, G]
    scale, zero = params[0], params[1]
    perm, Hinv = factor if factor is not None else gptq_factor(H, damp, act_order)
    # Columns as rows ([E, C, O]): each column GPTQ visits is one contiguous slice.
    Wt = W.gather(2, perm[:, None, :].expand(E, O, C)).transpose(1, 2).contiguous()
    del W
    group_of = torch.div(perm, gs, rounding_mode="floor")  # [E, C] group of each (permuted) column
    Qt = torch.empty_like(Wt)
    code_dtype = getattr(grid, "code_dtype", torch.uint8)  # trellis states need 16 bits
    codes_t = torch.empty(E, C, O, dtype=code_dtype, device=Wt.device)
    Err = torch.empty_like(Wt[:, :block_size])  # [E, b, O] scaled errors of the block's columns
    losses = torch.zeros(E, O, device=Wt.device)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        b = i2 - i1
        B = Wt[:, i1:i2]  # [E, b, O] view: updated in place
        g = group_of[:, i1:i2, None].expand(E, b, O)
        cols = [p.transpose(1, 2).gather(1, g) for p in params]  # each [E, b, O]: the block's column parameters
        Hb = Hinv[:, i1:i2, i1:i2]
        dg = Hb.diagonal(dim1=1, dim2=2)[..., None]  # [E, b, 1]
        # Two-level lazy batch updates: rank-1 updates only within a sub-block of SUB columns, one product for
        # the rest of the block after each sub-block, one for the columns after the block (same math as GPTQ's
        # single level; the rank-1 traffic falls from b^2 / 2 to b * SUB / 2 columns per block).
        with _column_threads(Wt.device):
            for j1 in range(0, b, SUB):
                j2 = min(j1 + SUB, b)
                for i in range(j1, j2):
                    w = B[:, i]  # [E, O]
                    col = [c[:, i] for c in cols]
                    q = grid.codes(w, *col)
                    wq = dequantize(q, col[0], col[1]) if isinstance(grid, QuantGrid) else grid.dequant(q, *col)
                    codes_t[:, i1 + i] = q
                    Qt[:, i1 + i] = wq
                    err = torch.sub(w, wq, out=Err[:, i]).div_(dg[:, i])
                    if i + 1 < j2:
                        B[:, i + 1:j2] -= Hb[:, i, i + 1:j2, None] * err[:, None, :]
                if j2 < b:
                    B[:, j2:] -= torch.bmm(Hb[:, j1:j2, j2:].transpose(1, 2), Err[:, j1:j2])
        losses += Err[:, :b].square().sum(1) / 2
        if i2 < C:
            Wt[:, i2:] -= torch.bmm(Hinv[:, i1:i2, i2:].transpose(1, 2), Err[:, :b])
    del Wt, Err
    # Back to the original column order, written straight into [E, O, C] (no gathered copy).
    at = perm[:, :, None].expand(E, C, O)
    Q = torch.empty(E, O, C, device=Qt.device).transpose(1, 2).scatter_(1, at, Qt).transpose(1, 2)
    del Qt
    codes = torch.empty(E, O, C, dtype=code_dtype, device=codes_t.device).transpose(1, 2).scatter_(
        1, at, codes_t).transpose(1, 2)
    neg = params[3] if isinstance(grid, TernaryGrid) and grid.two_scales else None
    return QuantResult(Q, codes, scale, zero, losses.sum(-1), neg)
