"""Triton kernel for the ``ternary-dict`` codec (QMoE's dictionary code, formats/dictcode.py): decode a row's
uint16 codewords and multiply with the activations in one pass, plain (batch 1..16, larger batches in tiles of 16)
and in the grouped MoE form of `triton_dequant.grouped_matmul` (the same `MoeRoute`). `reference.dict_decode` /
`reference.dict_dequantize` are the specification.

Design (QMoE's ``Sub1MatVec``, arXiv:2310.16795, laid out for Triton):

* A program owns ``BLOCK_N`` weight rows and ``MB`` activation rows (MB = 1 for decode). Each weight row is walked
  codeword by codeword, all ``BLOCK_N`` rows in lock step (``max`` codewords of the tile iterations; a row that
  has run out is masked). Per step the tile is ``[BLOCK_N, 32]``: slot ``t < 28`` of a row is trit ``t`` of its
  current codeword, digit ``(dec[c, t // 14] >> (4 + 2 (t % 14))) & 3`` (0 zero, 1 minus, 2 plus; slots past the
  codeword's ``2 len`` are masked), at input position ``idx + t``; then ``idx += 2 len``.
* One group per row (QMoE's grid: ``GROUP = 0``): the activations under plus and minus digits are summed
  separately and the two row scales applied once at the end (``s+ * sum_plus - s- * sum_minus``); smaller groups
  gather the scale per slot.
* Activations are gathered from global memory (a row of x is small and stays in L1/L2; QMoE stages it in shared
  memory), loaded as float32; accumulation is float32 and the output float32 (the dispatch casts it).
* Grouped MoE: ``BLOCK_M`` of the route = 1: program ``r`` serves row ``r`` with its own expert; otherwise the
  route's sorted rows in sub-blocks of ``MB`` (a block of 64 rows is 4 programs).

Portability as in triton_dequant: plain pointer arithmetic, no inline asm / libdevice / block pointers, int64
offsets. Every specialization is compiled for sm_80 / sm_90 in tests/kernels/test_aot_compile.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moecompress.kernels.routing import MoeRoute
from moecompress.kernels.triton_common import _cdiv, _decoder_rows, decoder_batch, decoder_route

__all__ = ["dict_arguments", "dict_matmul", "grouped_dict_matmul"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 16 if INTERPRET else 32


@triton.jit
def _dict_mm_kernel(x_ptr, cw_ptr, ri_ptr, dec_ptr, scale_ptr, neg_ptr, out_ptr, rows_ptr, expert_ptr,
                    M, N, K, G, X_DIV, SUBS, GROUP: tl.constexpr, HAS_NEG: tl.constexpr, GROUPED: tl.constexpr,
                    BLOCK_M: tl.constexpr, MB: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e, orow, xrow, m_ok = _decoder_rows(pid, rows_ptr, expert_ptr, M, X_DIV, SUBS, GROUPED, BLOCK_M, MB)
    wrow = e * N + offs_n.to(tl.int64)  # [BN] weight rows
    start = tl.load(ri_ptr + wrow, mask=n_ok, other=0).to(tl.int64)
    ncw = tl.load(ri_ptr + wrow + 1, mask=n_ok, other=0).to(tl.int64) - start
    ncw = tl.where(n_ok & (tl.max(m_ok.to(tl.int32), axis=0) > 0), ncw, 0)
    steps = tl.max(ncw, axis=0)
    t = tl.arange(0, 32)
    shift = 4 + 2 * (t % 14)
    use_w0 = t < 14
    x_off = xrow[None, None, :] * K  # [1, 1, MB]
    idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    acc_p = tl.zeros([BLOCK_N, MB], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_N, MB], dtype=tl.float32)
    srow = wrow * G
    for s in range(0, steps):
        live = s < ncw
        c = tl.load(cw_ptr + start + s, mask=live, other=0).to(tl.int32) & 0xFFFF
        w0 = tl.load(dec_ptr + 2 * c, mask=live, other=0)
        w1 = tl.load(dec_ptr + 2 * c + 1, mask=live, other=0)
        ntrit = (w0 & 15) * 2
        word = tl.where(use_w0[None, :], w0[:, None], w1[:, None])  # [BN, 32]
        d = (word >> shift[None, :]) & 3
        pos = idx[:, None] + t[None, :]
        ok = (t[None, :] < ntrit[:, None]) & live[:, None] & (pos < K) & (d != 0)
        xg = tl.load(x_ptr + x_off + pos[:, :, None], mask=ok[:, :, None] & m_ok[None, None, :],
                     other=0.0).to(tl.float32)  # [BN, 32, MB]
        if GROUP == 0:
            acc_p += tl.sum(tl.where((d == 2)[:, :, None], xg, 0.0), axis=1)
            acc_m += tl.sum(tl.where((d == 1)[:, :, None], xg, 0.0), axis=1)
        else:
            g = pos // GROUP
            sp = tl.load(scale_ptr + srow[:, None] + g, mask=ok, other=0.0).to(tl.float32)
            if HAS_NEG:
                sn = tl.load(neg_ptr + srow[:, None] + g, mask=ok, other=0.0).to(tl.float32)
            else:
                sn = sp
            v = tl.where(d == 2, sp, -sn)
            acc_p += tl.sum(v[:, :, None] * xg, axis=1)
        idx += ntrit
    if GROUP == 0:
        sp = tl.load(scale_ptr + srow, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_NEG:
            sn = tl.load(neg_ptr + srow, mask=n_ok, other=0.0).to(tl.float32)
        else:
            sn = sp
        res = acc_p * sp[:, None] - acc_m * sn[:, None]
    else:
        res = acc_p
    tl.store(out_ptr + orow[None, :] * N + offs_n[:, None], res, mask=n_ok[:, None] & m_ok[None, :])


def _launch(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


def dict_arguments(x, codewords, row_index, dec, scale, scale_neg, out, rows, experts, *, M: int, N: int, K: int,
                   G: int, x_div: int, subs: int, grouped: bool, block_m: int, mb: int) -> dict:
    """Every argument of `_dict_mm_kernel` by name (the launches and `moecompress.kernels.aot` use it)."""
    return dict(x_ptr=x, cw_ptr=codewords, ri_ptr=row_index, dec_ptr=dec, scale_ptr=scale,
                neg_ptr=scale if scale_neg is None else scale_neg, out_ptr=out, rows_ptr=rows, expert_ptr=experts,
                M=M, N=N, K=K, G=G, X_DIV=x_div, SUBS=subs, GROUP=0 if G == 1 else K // G,
                HAS_NEG=scale_neg is not None, GROUPED=grouped, BLOCK_M=block_m, MB=mb, BLOCK_N=BLOCK_N,
                num_warps=4)


def dict_matmul(x: torch.Tensor, codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor,
                scale: torch.Tensor, scale_neg: torch.Tensor | None, columns: int) -> torch.Tensor:
    """``x [M, K] @ W^T`` for one ``ternary-dict`` weight (``scale [1, N, G]``) -> ``[M, N]`` float32."""
    M, K = x.shape
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    _, N, G = scale.shape
    mb = decoder_batch(M)
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    values = dict_arguments(x.contiguous(), codewords, row_index, dec, scale, scale_neg, out, row_index, row_index,
                            M=M, N=N, K=K, G=G, x_div=1, subs=1, grouped=False, block_m=mb, mb=mb)
    _launch(_dict_mm_kernel, (_cdiv(M, mb), _cdiv(N, BLOCK_N)), **values)
    return out


def grouped_dict_matmul(x: torch.Tensor, route: MoeRoute, x_div: int, codewords: torch.Tensor,
                        row_index: torch.Tensor, dec: torch.Tensor, scale: torch.Tensor,
                        scale_neg: torch.Tensor | None, columns: int) -> torch.Tensor:
    """Row ``r`` of the result is ``x[r // x_div] @ W_{e(r)}^T`` (``[route.num_rows, N]`` float32); one launch."""
    K = x.shape[1]
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    E, N, G = scale.shape
    R, bm = route.num_rows, route.block_m
    out = torch.empty(R, N, dtype=torch.float32, device=x.device)
    rows, experts, mb, subs, programs = decoder_route(route)
    values = dict_arguments(x.contiguous(), codewords, row_index, dec, scale, scale_neg, out, rows, experts,
                            M=R, N=N, K=K, G=G, x_div=x_div, subs=subs, grouped=True, block_m=bm, mb=mb)
    if programs:
        _launch(_dict_mm_kernel, (programs, _cdiv(N, BLOCK_N)), **values)
    return out
