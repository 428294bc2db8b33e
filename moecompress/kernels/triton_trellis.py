"""Triton kernel for the trellis codecs (``trellis2/3/4``, QTIP's bitshift trellis; docs/FORMAT.md): decode each
weight's 10-bit state from its column's circular stream, look it up in the table, apply the group's zero and scale
and multiply with the activations in one pass, plain (batch 1..16, larger batches in tiles of 16) and in the
grouped MoE form of `triton_dequant.grouped_matmul` (the same `MoeRoute`). `reference.trellis_dequantize` is the
specification.

Design:

* A program owns ``BLOCK_P`` sequence positions of one weight (position ``64 j + p``: weight ``p`` of sequence
  ``j``; its output row is ``order[position]``, stored there) and ``MB`` activation rows (MB = 1 for decode), and
  walks the input columns in blocks of ``BLOCK_K``. A weight's state is the 10 bits at stream bit
  ``(k p + k - 10) mod 64 k`` of sequence ``j``'s stream for that column: two int32 words (the word holding the
  window's start and the next, circularly) joined into 64 bits, one shift and a mask. Words shared by
  neighbouring positions and the 4 KiB table stay in L1.
* Group scales: with groups a multiple of ``BLOCK_K`` one scale and zero per row and block, else per element.
  Zeros are stored as ``zero * 2^zero_frac`` (``ZERO_DIV``); accumulation float32, the output float32 (the
  dispatch casts it).
* Grouped MoE: as `triton_dict` (``BLOCK_M`` of the route = 1: program ``r`` serves row ``r`` with its own expert;
  otherwise the route's sorted rows in sub-blocks of ``MB``).

Portability as in triton_dequant: plain pointer arithmetic, no inline asm / libdevice / block pointers, int64
offsets. Every specialization is compiled for sm_80 / sm_90 in tests/kernels/test_aot_compile.py. Speed on a GPU
is not measured yet: a decode-first layout (one program re-decodes its tile for every 16 activation rows).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moecompress.kernels.routing import MoeRoute
from moecompress.kernels.triton_common import _cdiv, _decoder_rows, decoder_batch, decoder_route

__all__ = ["grouped_trellis_matmul", "trellis_arguments", "trellis_matmul"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_P = 16 if INTERPRET else 32
BLOCK_K = 32 if INTERPRET else 64


@triton.jit
def _trellis_mm_kernel(x_ptr, stream_ptr, order_ptr, table_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr,
                       M, N, K, G, S, X_DIV, SUBS, BITS: tl.constexpr, L: tl.constexpr, SEQ: tl.constexpr,
                       GROUP: tl.constexpr, ZERO_DIV: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
                       MB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < N
    e, orow, xrow, m_ok = _decoder_rows(pid, rows_ptr, expert_ptr, M, X_DIV, SUBS, GROUPED, BLOCK_M, MB)
    W: tl.constexpr = SEQ * BITS // 32  # words per stream
    NK: tl.constexpr = SEQ * BITS  # bits per stream
    row = tl.load(order_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)  # [BP] the output row of each position
    seq = (offs_p // SEQ).to(tl.int64)
    a = ((offs_p % SEQ) * BITS + (BITS - L + NK)) % NK  # the window's first stream bit
    w0 = (a // 32).to(tl.int64)
    w1 = ((a // 32 + 1) % W).to(tl.int64)
    sh = (64 - L - a % 32).to(tl.int64)
    base = (e * S + seq) * K * W  # [BP]: stream[e, j, 0, 0]
    srow = (e * N + row) * G
    live = p_ok & (tl.max(m_ok.to(tl.int32), axis=0) > 0)
    acc = tl.zeros([BLOCK_P, MB], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        c_ok = c < K
        ok = live[:, None] & c_ok[None, :]
        at = base[:, None] + c[None, :].to(tl.int64) * W  # [BP, BK]
        lo = tl.load(stream_ptr + at + w0[:, None], mask=ok, other=0)
        hi = tl.load(stream_ptr + at + w1[:, None], mask=ok, other=0)
        both = (lo.to(tl.uint32, bitcast=True).to(tl.int64) << 32) | hi.to(tl.uint32, bitcast=True).to(tl.int64)
        st = ((both >> sh[:, None]) & ((1 << L) - 1)).to(tl.int32)
        v = tl.load(table_ptr + st, mask=ok, other=0.0)
        if GROUP == 0:  # one group per row
            s = tl.load(scale_ptr + srow, mask=p_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + srow, mask=p_ok, other=0).to(tl.float32)[:, None] / ZERO_DIV
        elif GROUP % BLOCK_K == 0:  # the block lies in one group
            s = tl.load(scale_ptr + srow + k0 // GROUP, mask=p_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + srow + k0 // GROUP, mask=p_ok, other=0).to(tl.float32)[:, None] / ZERO_DIV
        else:
            g = (c // GROUP)[None, :]
            s = tl.load(scale_ptr + srow[:, None] + g, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + srow[:, None] + g, mask=ok, other=0).to(tl.float32) / ZERO_DIV
        w = tl.where(ok, (v - z) * s, 0.0)  # [BP, BK]
        xg = tl.load(x_ptr + xrow[None, :] * K + c[:, None], mask=c_ok[:, None] & m_ok[None, :],
                     other=0.0).to(tl.float32)  # [BK, MB]
        acc += tl.sum(w[:, :, None] * xg[None, :, :], axis=1)
    tl.store(out_ptr + orow[None, :] * N + row[:, None], acc, mask=p_ok[:, None] & m_ok[None, :])


def _launch(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


def trellis_arguments(x, stream, order, table, scale, zero, out, rows, experts, *, M: int, N: int, K: int, G: int,
                      S: int, bits: int, zero_frac: int, x_div: int, subs: int, grouped: bool, block_m: int,
                      mb: int, L: int = 10, seq: int = 64) -> dict:
    """Every argument of `_trellis_mm_kernel` by name (the launches and `moecompress.kernels.aot` use it)."""
    return dict(x_ptr=x, stream_ptr=stream, order_ptr=order, table_ptr=table, scale_ptr=scale, zero_ptr=zero,
                out_ptr=out, rows_ptr=rows, expert_ptr=experts, M=M, N=N, K=K, G=G, S=S, X_DIV=x_div, SUBS=subs,
                BITS=bits, L=L, SEQ=seq, GROUP=0 if G == 1 else K // G, ZERO_DIV=2 ** zero_frac, GROUPED=grouped,
                BLOCK_M=block_m, MB=mb, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=4)


def _sizes(stream: torch.Tensor, table: torch.Tensor, bits: int) -> dict:
    """The state width and the sequence length of a trellis weight (host-known shapes, no device read)."""
    return {"L": table.numel().bit_length() - 1, "seq": 32 * stream.shape[3] // bits}


def _check(x: torch.Tensor, stream: torch.Tensor, order: torch.Tensor, table: torch.Tensor, bits: int) -> None:
    K = x.shape[1]
    if stream.shape[2] != K:
        raise ValueError(f"x has {K} features, the weight {stream.shape[2]}")
    if table.numel() & (table.numel() - 1) or (32 * stream.shape[3]) % bits:
        raise ValueError("not a trellis table of 2^L entries / streams of whole weights")
    if order.numel() > stream.shape[1] * (32 * stream.shape[3] // bits):
        raise ValueError("the row order is longer than the sequences")


def trellis_matmul(x: torch.Tensor, stream: torch.Tensor, order: torch.Tensor, table: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor, bits: int, zero_frac: int) -> torch.Tensor:
    """``x [M, K] @ W^T`` for one trellis weight (``stream [1, S, K, W]``, ``scale [1, N, G]``) -> ``[M, N]``
    float32."""
    _check(x, stream, order, table, bits)
    M, K = x.shape
    _, N, G = scale.shape
    mb = decoder_batch(M)
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    values = trellis_arguments(x.contiguous(), stream, order, table, scale, zero, out, order, order, M=M, N=N, K=K,
                               G=G, S=stream.shape[1], bits=bits, zero_frac=zero_frac, x_div=1, subs=1,
                               grouped=False, block_m=mb, mb=mb, **_sizes(stream, table, bits))
    _launch(_trellis_mm_kernel, (_cdiv(M, mb), _cdiv(N, BLOCK_P)), **values)
    return out


def grouped_trellis_matmul(x: torch.Tensor, route: MoeRoute, x_div: int, stream: torch.Tensor, order: torch.Tensor,
                           table: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                           zero_frac: int) -> torch.Tensor:
    """Row ``r`` of the result is ``x[r // x_div] @ W_{e(r)}^T`` (``[route.num_rows, N]`` float32); one launch."""
    _check(x, stream, order, table, bits)
    K = x.shape[1]
    E, N, G = scale.shape
    R = route.num_rows
    out = torch.empty(R, N, dtype=torch.float32, device=x.device)
    rows, experts, mb, subs, programs = decoder_route(route)
    values = trellis_arguments(x.contiguous(), stream, order, table, scale, zero, out, rows, experts, M=R, N=N, K=K,
                               G=G, S=stream.shape[1], bits=bits, zero_frac=zero_frac, x_div=x_div, subs=subs,
                               grouped=True, block_m=route.block_m, mb=mb, **_sizes(stream, table, bits))
    if programs:
        _launch(_trellis_mm_kernel, (programs, _cdiv(N, BLOCK_P)), **values)
    return out
