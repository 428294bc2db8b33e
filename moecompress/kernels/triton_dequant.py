"""Triton kernels for the packed codecs: dequantization, fused dequant + matmul, and a grouped MoE matmul
(one launch for every active expert). `moecompress.kernels.reference` is their specification.

Decoding, per element ``k`` of a row (docs/FORMAT.md): ``b``-bit codes sit at bit ``k*b`` of the row's
little-endian int32 stream (a code may continue in the next word: int3); base-3 ternary bytes hold five
trits, trit ``n`` being ``((byte * 3^n) & 255) * 3 >> 8``, minus 1. Values are ``(code - zero) * scale`` per
group; ternary in the 2-bit layout is stored as ``t + 2``.

Portability (also under ``TRITON_INTERPRET=1`` on CPU): plain pointer arithmetic, fp32 / fp16 only (bf16 is
upcast by the wrappers), int64 expert offsets, one config (no autotune), block sizes of at least 16, no
inline asm or libdevice. Nothing here touches ``torch.cuda`` at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dequantize", "grouped_experts_matmul", "packed_matmul"]

INT, TERNARY2, BASE3 = 0, 1, 2


@triton.jit
def _codes(data_ptr, row_off, k, BITS: tl.constexpr, KIND: tl.constexpr, mask):
    """Signed integer value ``code - offset`` helper: returns the raw code (INT), ``t`` (ternary kinds)."""
    if KIND == 2:
        byte = tl.load(data_ptr + row_off + k // 5, mask=mask, other=0).to(tl.int32)
        n = k % 5
        pw = tl.where(n == 0, 1, tl.where(n == 1, 3, tl.where(n == 2, 9, tl.where(n == 3, 27, 81))))
        q = (byte * pw) & 255
        return ((q * 3) >> 8) - 1
    bit = k * BITS
    w0 = bit // 32
    off = bit % 32
    lo = tl.load(data_ptr + row_off + w0, mask=mask, other=0).to(tl.uint32, bitcast=True) >> off.to(tl.uint32)
    cross = (off + BITS) > 32
    hi_word = tl.load(data_ptr + row_off + w0 + 1, mask=mask & cross, other=0).to(tl.uint32, bitcast=True)
    shift = tl.where(cross, 32 - off, 0).to(tl.uint32)
    hi = tl.where(cross, hi_word << shift, 0)
    code = ((lo | hi) & ((1 << BITS) - 1)).to(tl.int32)
    if KIND == 1:
        return code - 2
    return code


@triton.jit
def _dequant_kernel(data_ptr, scale_ptr, zero_ptr, out_ptr, R, C, W, G, GROUP, ZERO_CONST,
                    BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)[:, None]
    code = _codes(data_ptr, r64 * W, cols[None, :], BITS, KIND, m)
    g = cols[None, :] // GROUP
    scale = tl.load(scale_ptr + r64 * G + g, mask=m, other=0.0).to(tl.float32)
    if KIND == 0:
        if HAS_ZERO:
            z = tl.load(zero_ptr + r64 * G + g, mask=m, other=0).to(tl.float32)
        else:
            z = ZERO_CONST
        val = (code.to(tl.float32) - z) * scale
    else:
        val = code.to(tl.float32) * scale
    tl.store(out_ptr + r64 * C + cols[None, :], val, mask=m)


@triton.jit
def _matmul_kernel(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr, M, N, K, W, G, GROUP,
                   ZERO_CONST, stride_e_data, stride_e_scale,
                   BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows] = x[rows] @ W_e^T. Grouped: each M-block belongs to one expert ``e = expert[pid_m]`` and
    gathers its rows through ``rows`` (padding rows are -1)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GROUPED:
        rows = tl.load(rows_ptr + offs_m)
        valid = rows >= 0
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
    else:
        rows = offs_m
        valid = offs_m < M
        e = tl.zeros((), dtype=tl.int64)
    rows64 = tl.where(valid, rows, 0).to(tl.int64)
    base_data = data_ptr + e * stride_e_data
    base_scale = scale_ptr + e * stride_e_scale
    base_zero = zero_ptr + e * stride_e_scale
    n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xm = valid[:, None] & (kk[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * K + kk[None, :], mask=xm, other=0.0).to(tl.float32)
        wm = (kk[:, None] < K) & (offs_n[None, :] < N)
        code = _codes(base_data, n64[None, :] * W, kk[:, None], BITS, KIND, wm)  # [BLOCK_K, BLOCK_N]
        g = kk[:, None] // GROUP
        scale = tl.load(base_scale + n64[None, :] * G + g, mask=wm, other=0.0).to(tl.float32)
        if KIND == 0:
            if HAS_ZERO:
                z = tl.load(base_zero + n64[None, :] * G + g, mask=wm, other=0).to(tl.float32)
            else:
                z = ZERO_CONST
            w = (code.to(tl.float32) - z) * scale
        else:
            w = code.to(tl.float32) * scale
        acc += tl.dot(x, w, input_precision="ieee")
    om = valid[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptr + rows64[:, None] * N + n64[None, :], acc, mask=om)


def _kind(ternary: bool, base3: bool) -> int:
    return BASE3 if base3 else (TERNARY2 if ternary else INT)


def _zero_args(zero: torch.Tensor | None, bits: int, like: torch.Tensor):
    if zero is None:
        return like, False, float(2 ** (bits - 1))
    return zero.contiguous(), True, 0.0


def dequantize(bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[E, O, C]`` weights from packed ``data [E, O, W]``, ``scale``/``zero [E, O, G]``."""
    E, O, W = data.shape
    R, G = E * O, scale.shape[-1]
    out = torch.empty(R, columns, dtype=torch.float32, device=data.device)
    zero_t, has_zero, zc = _zero_args(zero, bits, scale)
    BR, BC = 16, 64
    grid = (triton.cdiv(R, BR), triton.cdiv(columns, BC))
    _dequant_kernel[grid](data.contiguous().view(R, W), scale.contiguous().view(R, G), zero_t, out, R, columns, W, G,
                          columns // G, zc, BITS=bits, KIND=_kind(ternary, base3), HAS_ZERO=has_zero,
                          BLOCK_R=BR, BLOCK_C=BC)
    return out.view(E, O, columns).to(dtype)


def packed_matmul(x: torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, columns: int, block: tuple[int, int, int] = (16, 64, 64)) -> torch.Tensor:
    """``x [M, K] @ W^T`` for one packed weight ``[1, N, K]`` -> ``[M, N]`` float32, dequantizing in the kernel."""
    BM, BN, BK = block
    if min(block) < 16:
        raise ValueError("Triton block sizes must be at least 16")
    M, K = x.shape
    _, N, W = data.shape
    G = scale.shape[-1]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    zero_t, has_zero, zc = _zero_args(zero, bits, scale)
    xf = x.float().contiguous() if x.dtype == torch.bfloat16 else x.contiguous()
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _matmul_kernel[grid](xf, data.contiguous(), scale.contiguous(), zero_t, out, out, out, M, N, K, W, G, K // G, zc,
                         0, 0, BITS=bits, KIND=_kind(ternary, base3), HAS_ZERO=has_zero, GROUPED=False,
                         BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return out


def grouped_experts_matmul(x: torch.Tensor, rows_expert: torch.Tensor, bits: int, ternary: bool, base3: bool,
                           data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, columns: int,
                           block: tuple[int, int, int] = (16, 64, 64)) -> torch.Tensor:
    """Row ``t`` of ``x [T, K]`` times expert ``rows_expert[t]``'s packed weight; one launch for all experts.

    Host side: rows are sorted by expert and each expert's rows padded to a multiple of BLOCK_M (padding = -1),
    with one expert id per M-block (vLLM's fused-MoE pattern).
    """
    BM, BN, BK = block
    if min(block) < 16:
        raise ValueError("Triton block sizes must be at least 16")
    T, K = x.shape
    E, N, W = data.shape
    G = scale.shape[-1]
    order = torch.argsort(rows_expert, stable=True)
    counts = torch.bincount(rows_expert, minlength=E)
    rows, experts = [], []
    start = 0
    for e in range(E):
        n = int(counts[e])
        if n == 0:
            continue
        ids = order[start:start + n]
        start += n
        pad = (-n) % BM
        rows.append(torch.cat([ids, torch.full((pad,), -1, dtype=ids.dtype)]))
        experts += [e] * ((n + pad) // BM)
    out = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    if not rows:
        return out
    rows_t = torch.cat(rows).to(torch.int32).to(x.device)
    experts_t = torch.tensor(experts, dtype=torch.int32, device=x.device)
    zero_t, has_zero, zc = _zero_args(zero, bits, scale)
    xf = x.float().contiguous() if x.dtype == torch.bfloat16 else x.contiguous()
    grid = (len(experts), triton.cdiv(N, BN))
    _matmul_kernel[grid](xf, data.contiguous(), scale.contiguous(), zero_t, out, rows_t, experts_t, T, N, K, W, G,
                         K // G, zc, N * W, N * G, BITS=bits, KIND=_kind(ternary, base3), HAS_ZERO=has_zero,
                         GROUPED=True, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return out
