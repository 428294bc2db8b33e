"""Triton kernels for the packed codecs: dequantization, fused dequant + matmul (plain and grouped MoE) and the
device-side MoE row alignment. `moecompress.kernels.reference` is their specification; the format is
docs/FORMAT.md's (a kernel never changes it).

Design (docs/BENCHMARKS.md, "Packed kernels", has the reasoning and the GPU measurements to make):

* **Storage units.** A row of packed codes is read in *units* that hold a whole number of codes: one int32
  word for b in {1, 2, 4, 8} (``32 / b`` codes), three int32 words for int3 (96 bits, 32 codes: int3 codes
  cross word boundaries, a triple never does), one byte for base-3 ternary (5 trits). A tile of ``BU`` units
  is loaded **once** (one load per word, contiguous along the row, so the loads vectorise) and unpacked in
  registers: code ``j`` of every unit by constant shifts/masks (``SLOTS`` codes per unit; base 3: a multiply,
  a mask and a shift per trit).
* **Integer to float without a conversion instruction.** ``q | 0x4B000000`` read as float32 is ``2^23 + q``
  (``q | 0x6400`` read as float16 is ``1024 + q``): an OR and a subtraction instead of a quarter-rate
  int-to-float conversion; exact for every code.
* **Decode (GEMV, ``BLOCK_M = 1``).** One program computes ``BLOCK_N`` outputs of one row over a K range
  (split-K: ``SPLIT_K`` programs per output tile, combined with atomic adds). For each unit slot ``j``:
  ``p += (q_j - z) * x_j`` in fp32 FMAs on the [BLOCK_N, BU] tile; the group scale is applied once per unit
  (``acc += p * s``), not once per element, and an asymmetric zero point is folded in as ``- z * sum(x)``.
  No tensor-core padding, no layout shuffles, weights read exactly once: the bandwidth-bound regime.
* **Prefill / small batches (``BLOCK_M >= 16``).** A tiled GEMM on tensor cores: the [BLOCK_N, BU, SLOTS]
  code tile is dequantized to the activation dtype (fp16: ``(1024 + q) - (1024 + z)`` then ``* s`` in fp16,
  which rounds exactly as the reference does; bf16: the same in fp32, then one rounding), reshaped to
  [BLOCK_K, BLOCK_N] and fed to ``tl.dot`` with fp32 accumulation (fp16/bf16 inputs; no ``ieee`` fp32 dots).
  Base-3 units hold 5 codes: the tile is padded to 8 slots per byte (the extra slots meet zero activations).
* **Group scales.** The group size is a compile-time constant (``GROUP``; 0 = one group per row), so group
  indices are shifts. A K tile that lies inside one group (e.g. 128 elements at group 128, or one group per
  row) loads one scale (and zero) per row; a larger tile loads one per storage unit (``SCALE_MODE`` 0: units
  never straddle a group). When a unit can straddle one boundary (base 3 with groups of 128: 5 does not divide
  128) two partial sums per unit are kept (mode 1); only groups smaller than a unit (test-sized groups) load
  a scale per element (mode 2).
* **Grouped MoE.** vLLM's fused-MoE layout, computed on the device by `moe_align`: (token, slot) rows sorted
  by expert, each expert's segment padded to ``BLOCK_M`` (padding rows = ``num_rows``), one expert id per
  M-block (``-1`` past the end: those programs run no K iterations). With ``BLOCK_M = 1`` (decode: about one
  row per active expert) no sorting at all: program ``r`` serves row ``r`` with its own expert.
  Everything has static shapes and no host sync, so the MoE forward can be captured in a CUDA graph.
* **Autotuning** on a GPU: configuration lists per path (`DECODE_CONFIGS`, `GEMM_CONFIGS`,
  `GROUPED_CONFIGS`), keyed on the shape, codec and a power-of-two bucket of M. The first call of a shape
  benchmarks (it synchronises): warm up before capturing a CUDA graph. Under ``TRITON_INTERPRET=1`` one fixed
  small configuration per path (multi-config autotuning cannot run there).

Portability: plain pointer arithmetic (no block pointers), no inline asm or libdevice, int64 expert and row
offsets, nothing touches ``torch.cuda`` at import. The interpreter computes bf16 wrongly, so under it bf16
activations are computed in fp32 and cast by torch; on a GPU the dot runs in the activation dtype.
Every specialization is compiled ahead of time for sm_80 and sm_90 in tests/kernels/test_aot_compile.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moecompress.kernels.routing import MoeRoute, grouped_block_m, max_blocks

__all__ = ["DECODE_CONFIGS", "GEMM_CONFIGS", "GROUPED_CONFIGS", "INTERPRET", "MoeRoute", "align_arguments",
           "dequant_arguments", "dequantize", "geometry", "grouped_block_m", "grouped_matmul", "mm_arguments",
           "moe_align", "packed_matmul", "plain_tuner", "supported"]

INT, TERNARY2, BASE3 = 0, 1, 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by @triton.jit at import, as here


# ----------------------------------------------------------------------------------------------- device code
@triton.jit
def _load_units(data_ptr, row_off, u, n_ok, W, KIND: tl.constexpr, BITS: tl.constexpr):
    """Storage units ``u`` ([1, BU] unit indices) of the rows at ``row_off`` ([BN, 1]): ``(w0, w1, w2)``
    int32 [BN, BU]; int3 units are three words, other units one word (or one byte: base 3)."""
    if KIND == 2:
        w0 = tl.load(data_ptr + row_off + u, mask=n_ok & (u < W), other=0).to(tl.int32)
        w1 = w0
        w2 = w0
    elif BITS == 3:
        b = u * 3
        w0 = tl.load(data_ptr + row_off + b, mask=n_ok & (b < W), other=0)
        w1 = tl.load(data_ptr + row_off + b + 1, mask=n_ok & (b + 1 < W), other=0)
        w2 = tl.load(data_ptr + row_off + b + 2, mask=n_ok & (b + 2 < W), other=0)
    else:
        w0 = tl.load(data_ptr + row_off + u, mask=n_ok & (u < W), other=0)
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _slot(w0, w1, w2, J: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` (a compile-time slot) of every unit: unsigned ``q`` (base 3: the digit ``t + 1``)."""
    if KIND == 2:
        P: tl.constexpr = 3 ** J
        q = (((w0 * P) & 255) * 3) >> 8
    elif BITS == 3:  # bit 3J of the unit's 96-bit little-endian stream
        if J < 10:
            q = (w0 >> (3 * J)) & 7
        elif J == 10:
            q = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
        elif J < 21:
            q = (w1 >> (3 * J - 32)) & 7
        elif J == 21:
            q = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
        else:
            q = (w2 >> (3 * J - 64)) & 7
    else:
        q = (w0 >> (J * BITS)) & ((1 << BITS) - 1)
    return q


@triton.jit
def _codes3(w0, w1, w2, KIND: tl.constexpr, BITS: tl.constexpr, SP2: tl.constexpr):
    """All codes of the units as [BN, BU, SP2] int32 (slot ``j`` of unit ``u`` is element ``u*SLOTS + j``;
    base 3 pads 5 slots to 8, the padding slots hold junk codes that the callers mask)."""
    j = tl.arange(0, SP2)[None, None, :]
    if KIND == 2:
        a = w0[:, :, None]
        pw = tl.where(j == 0, 1, tl.where(j == 1, 3, tl.where(j == 2, 9, tl.where(j == 3, 27, 81))))
        q = (((a * pw) & 255) * 3) >> 8
    elif BITS == 3:
        lo = w0.to(tl.uint32, bitcast=True).to(tl.int64) | (w1.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
        hi = w1.to(tl.uint32, bitcast=True).to(tl.int64) | (w2.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
        p = j * 3
        q = (tl.where(j < 21, lo[:, :, None] >> tl.minimum(p, 63), hi[:, :, None] >> tl.maximum(p - 32, 0))
             & 7).to(tl.int32)
    else:
        q = (w0[:, :, None] >> (j * BITS)) & ((1 << BITS) - 1)
    return q


@triton.jit
def _as_f32(q):
    """Exact float32 of small non-negative int32 codes: ``(q | bits(2^23)) - 2^23``."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _scale_zero3(scale_ptr, zero_ptr, srow, u, n_ok, G, k0, KSTEP: tl.constexpr, GROUP: tl.constexpr,
                 SLOTS: tl.constexpr, SP2: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                 ZC: tl.constexpr):
    """Scale and zero (fp32) broadcastable to the [BN, BU, SP2] code tile of units ``u`` [1, BU] whose first
    element is ``k0`` (``GROUP == 0``: one group per row)."""
    ONE_GROUP: tl.constexpr = (GROUP % KSTEP) == 0  # the whole tile lies in one group: one load per row
    if SCALE_MODE == 0 and ONE_GROUP:
        if GROUP == 0:
            g = 0
        else:
            g = k0 // GROUP
        s = tl.load(scale_ptr + srow + g, mask=n_ok, other=0.0).to(tl.float32)[:, :, None]
        if HAS_ZERO:
            z = tl.load(zero_ptr + srow + g, mask=n_ok, other=0).to(tl.float32)[:, :, None]
        else:
            z = tl.zeros_like(s) + ZC
    elif SCALE_MODE == 0:  # a unit never straddles a group: one load per unit
        g = (u * SLOTS) // GROUP
        m = n_ok & (g < G)
        s = tl.load(scale_ptr + srow + g, mask=m, other=0.0).to(tl.float32)[:, :, None]
        if HAS_ZERO:
            z = tl.load(zero_ptr + srow + g, mask=m, other=0).to(tl.float32)[:, :, None]
        else:
            z = tl.zeros_like(s) + ZC
    elif SCALE_MODE == 1:  # at most one boundary inside a unit: two loads, one select per element
        kb = u * SLOTS
        j = tl.arange(0, SP2)[None, None, :]
        g = kb // GROUP
        lo = j < ((g + 1) * GROUP - kb)[:, :, None]
        m0 = n_ok & (g < G)
        m1 = n_ok & (g + 1 < G)
        s = tl.where(lo, tl.load(scale_ptr + srow + g, mask=m0, other=0.0).to(tl.float32)[:, :, None],
                     tl.load(scale_ptr + srow + g + 1, mask=m1, other=0.0).to(tl.float32)[:, :, None])
        if HAS_ZERO:
            z = tl.where(lo, tl.load(zero_ptr + srow + g, mask=m0, other=0).to(tl.float32)[:, :, None],
                         tl.load(zero_ptr + srow + g + 1, mask=m1, other=0).to(tl.float32)[:, :, None])
        else:
            z = tl.zeros_like(s) + ZC
    else:  # groups smaller than a unit: per element
        j = tl.arange(0, SP2)[None, None, :]
        g = ((u * SLOTS)[:, :, None] + j) // GROUP
        m = n_ok[:, :, None] & (g < G)
        s = tl.load(scale_ptr + srow[:, :, None] + g, mask=m, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zero_ptr + srow[:, :, None] + g, mask=m, other=0).to(tl.float32)
        else:
            z = tl.zeros_like(s) + ZC
    return s, z


@triton.jit
def _weights3(q, s, z, DOT: tl.constexpr):
    """``(q - z) * s`` in the dot dtype, rounded once from the exact value (as the reference rounds)."""
    if DOT == tl.float16:
        qf = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q, exact
        w = (qf - (z + 1024.0).to(tl.float16)) * s.to(tl.float16)
    else:
        w = ((_as_f32(q) - z) * s).to(DOT)
    return w


@triton.jit
def _store_out(out_ptr, offs, val, mask, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _k_range(K, pid_k, KSTEP: tl.constexpr, SPLIT_K: tl.constexpr):
    tiles = tl.cdiv(K, KSTEP)
    per = tl.cdiv(tiles, SPLIT_K)
    t0 = pid_k * per
    return t0, tl.minimum(t0 + per, tiles)


@triton.jit
def _gemv(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, expert_ptr, M, N, K, W, G, X_DIV,
          stride_e_data, stride_e_scale, GROUP: tl.constexpr,
          BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_MODE: tl.constexpr,
          SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr, GROUPED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row, BLOCK_N outputs, one K split; fp32 FMAs, scales once per tile (tile inside a group) or per
    unit (module docstring)."""
    BU: tl.constexpr = BLOCK_K // SP2
    KSTEP: tl.constexpr = BU * SLOTS
    ONE_GROUP: tl.constexpr = (GROUP % KSTEP) == 0
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None]
    if GROUPED:
        e = tl.load(expert_ptr + row).to(tl.int64)
        x_row = x_ptr + (row // X_DIV).to(tl.int64) * K
        data_base = data_ptr + e * stride_e_data
        scale_base = scale_ptr + e * stride_e_scale
        zero_base = zero_ptr + e * stride_e_scale
    else:
        x_row = x_ptr + row.to(tl.int64) * K
        data_base = data_ptr
        scale_base = scale_ptr
        zero_base = zero_ptr
    n64 = offs_n.to(tl.int64)[:, None]
    row_off = n64 * W
    srow = n64 * G
    t0, t1 = _k_range(K, tl.program_id(2), KSTEP, SPLIT_K)
    acc = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
    for t in range(t0, t1):
        u = t * BU + tl.arange(0, BU)[None, :]
        w0, w1, w2 = _load_units(data_base, row_off, u, n_ok, W, KIND, BITS)
        kb = u * SLOTS
        if SCALE_MODE == 0:
            if ONE_GROUP:  # one scale (and zero) per row for the whole tile
                if GROUP == 0:
                    g = 0
                else:
                    g = (t * KSTEP) // GROUP
                m = n_ok
            else:
                g = kb // GROUP
                m = n_ok & (g < G)
            s = tl.load(scale_base + srow + g, mask=m, other=0.0).to(tl.float32)
            p = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
            sx = tl.zeros([1, BU], dtype=tl.float32)
            for j in tl.static_range(SLOTS):
                xj = tl.load(x_row + kb + j, mask=kb + j < K, other=0.0).to(tl.float32)
                q = _as_f32(_slot(w0, w1, w2, j, KIND, BITS))
                if HAS_ZERO:
                    p += q * xj
                    sx += xj
                else:
                    p += (q - ZC) * xj
            if HAS_ZERO:
                p -= tl.load(zero_base + srow + g, mask=m, other=0).to(tl.float32) * sx
            acc += p * s
        elif SCALE_MODE == 1:
            g = kb // GROUP
            cut = (g + 1) * GROUP - kb  # slots below `cut` are in group g, the rest in g + 1
            m0 = n_ok & (g < G)
            m1 = n_ok & (g + 1 < G)
            p0 = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
            p1 = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
            sx0 = tl.zeros([1, BU], dtype=tl.float32)
            sx1 = tl.zeros([1, BU], dtype=tl.float32)
            for j in tl.static_range(SLOTS):
                xj = tl.load(x_row + kb + j, mask=kb + j < K, other=0.0).to(tl.float32)
                x0 = tl.where(j < cut, xj, 0.0)
                x1 = xj - x0
                q = _as_f32(_slot(w0, w1, w2, j, KIND, BITS))
                if not HAS_ZERO:
                    q = q - ZC
                p0 += q * x0
                p1 += q * x1
                sx0 += x0
                sx1 += x1
            if HAS_ZERO:
                p0 -= tl.load(zero_base + srow + g, mask=m0, other=0).to(tl.float32) * sx0
                p1 -= tl.load(zero_base + srow + g + 1, mask=m1, other=0).to(tl.float32) * sx1
            acc += p0 * tl.load(scale_base + srow + g, mask=m0, other=0.0).to(tl.float32)
            acc += p1 * tl.load(scale_base + srow + g + 1, mask=m1, other=0.0).to(tl.float32)
        else:
            for j in tl.static_range(SLOTS):
                xj = tl.load(x_row + kb + j, mask=kb + j < K, other=0.0).to(tl.float32)
                g = (kb + j) // GROUP
                m = n_ok & (g < G)
                s = tl.load(scale_base + srow + g, mask=m, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(zero_base + srow + g, mask=m, other=0).to(tl.float32)
                else:
                    z = ZC
                acc += (_as_f32(_slot(w0, w1, w2, j, KIND, BITS)) - z) * s * xj
    _store_out(out_ptr, row.to(tl.int64) * N + offs_n, tl.sum(acc, axis=1), offs_n < N, SPLIT_K)


@triton.jit
def _gemm(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr, M, N, K, W, G, X_DIV,
          stride_e_data, stride_e_scale, GROUP: tl.constexpr,
          BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_MODE: tl.constexpr,
          SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr, GROUPED: tl.constexpr, DOT: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """A BLOCK_M x BLOCK_N output tile over one K split on tensor cores (module docstring)."""
    BU: tl.constexpr = BLOCK_K // SP2
    KSTEP: tl.constexpr = BU * SLOTS
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t0, t1 = _k_range(K, tl.program_id(2), KSTEP, SPLIT_K)
    if GROUPED:
        rows = tl.load(rows_ptr + offs_m)  # sorted (token, slot) rows; padding = M
        valid = rows < M
        x_rows = tl.where(valid, rows // X_DIV, 0)
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
        t1 = tl.where(e >= 0, t1, t0)  # blocks past the used ones run no iterations
        e = tl.maximum(e, 0)
        data_base = data_ptr + e * stride_e_data
        scale_base = scale_ptr + e * stride_e_scale
        zero_base = zero_ptr + e * stride_e_scale
    else:
        rows = offs_m
        valid = rows < M
        x_rows = tl.where(valid, rows, 0)
        data_base = data_ptr
        scale_base = scale_ptr
        zero_base = zero_ptr
    x_base = x_ptr + x_rows.to(tl.int64)[:, None] * K  # [BM, 1]
    n64 = offs_n.to(tl.int64)[:, None]
    row_off = n64 * W
    srow = n64 * G
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t0, t1):
        u = t * BU + tl.arange(0, BU)[None, :]
        w0, w1, w2 = _load_units(data_base, row_off, u, n_ok, W, KIND, BITS)
        q = _codes3(w0, w1, w2, KIND, BITS, SP2)
        s, z = _scale_zero3(scale_base, zero_base, srow, u, n_ok, G, t * KSTEP, KSTEP, GROUP, SLOTS, SP2, SCALE_MODE,
                            HAS_ZERO, ZC)
        w = tl.trans(tl.reshape(_weights3(q, s, z, DOT), (BLOCK_N, BLOCK_K)))  # [BK, BN], k = u*SP2 + j
        if SP2 == SLOTS:  # contiguous elements
            kx = t * KSTEP + tl.arange(0, BLOCK_K)[None, :]
            xt = tl.load(x_base + kx, mask=valid[:, None] & (kx < K), other=0.0)
        else:  # base 3: 5 elements per 8 slots
            j = tl.arange(0, SP2)[None, None, :]
            kx = (t * BU + tl.arange(0, BU))[None, :, None] * SLOTS + j
            x3 = tl.load(x_base[:, :, None] + kx, mask=valid[:, None, None] & (j < SLOTS) & (kx < K), other=0.0)
            xt = tl.reshape(x3, (BLOCK_M, BLOCK_K))
        acc = tl.dot(xt.to(DOT), w, acc)
    out_offs = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    _store_out(out_ptr, out_offs, acc, valid[:, None] & (offs_n[None, :] < N), SPLIT_K)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _packed_mm_kernel(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr,
                      M, N, K, W, G, X_DIV, stride_e_data, stride_e_scale, M_BUCKET, GROUP: tl.constexpr,
                      BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_MODE: tl.constexpr,
                      SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr, GROUPED: tl.constexpr,
                      DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """``out[r] = x[r // X_DIV] @ W_e^T`` for the rows of program axis 0 (grid: M-blocks, N-tiles, K-splits).

    ``BLOCK_M == 1``: GEMV (row = program, grouped: expert ``expert_ptr[row]``); else the tensor-core GEMM
    (grouped: rows ``rows_ptr[block]``, expert ``expert_ptr[block]``). ``M_BUCKET`` is only an autotune key."""
    if BLOCK_M == 1:
        _gemv(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, expert_ptr, M, N, K, W, G, X_DIV,
              stride_e_data, stride_e_scale, GROUP, BITS, KIND, HAS_ZERO, SCALE_MODE, SLOTS, SP2, ZC, GROUPED,
              BLOCK_N, BLOCK_K, SPLIT_K)
    else:
        _gemm(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr, M, N, K, W, G, X_DIV,
              stride_e_data, stride_e_scale, GROUP, BITS, KIND, HAS_ZERO, SCALE_MODE, SLOTS, SP2, ZC, GROUPED, DOT,
              BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.jit
def _dequant_kernel(data_ptr, scale_ptr, zero_ptr, out_ptr, R, C, W, G, GROUP: tl.constexpr,
                    BITS: tl.constexpr, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_MODE: tl.constexpr,
                    SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[R, C]`` from packed rows: a [BLOCK_R, BU] unit tile loaded once, written as [.., BU, SLOTS]."""
    BU: tl.constexpr = BLOCK_K // SP2
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = (rows < R)[:, None]
    r64 = rows.to(tl.int64)[:, None]
    u = tl.program_id(1) * BU + tl.arange(0, BU)[None, :]
    w0, w1, w2 = _load_units(data_ptr, r64 * W, u, r_ok, W, KIND, BITS)
    q = _codes3(w0, w1, w2, KIND, BITS, SP2)
    s, z = _scale_zero3(scale_ptr, zero_ptr, r64 * G, u, r_ok, G, tl.program_id(1) * BU * SLOTS, BU * SLOTS, GROUP,
                        SLOTS, SP2, SCALE_MODE, HAS_ZERO, ZC)
    v = (_as_f32(q) - z) * s
    j = tl.arange(0, SP2)[None, None, :]
    k = u[:, :, None] * SLOTS + j
    tl.store(out_ptr + r64[:, :, None] * C + k, v.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, :, None] & (j < SLOTS) & (k < C))


@triton.jit
def _moe_align_kernel(expert_ptr, sorted_ptr, block_expert_ptr, R, E, NUM_BLOCKS,
                      BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """One program: (token, slot) rows sorted by expert, each expert's segment padded to BLOCK_M with the
    sentinel ``R``, and one expert per block (``-1`` past the used blocks). Stable (rows keep their order)."""
    ids = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, R, CHUNK):
        r = c0 + tl.arange(0, CHUNK)
        ex = tl.load(expert_ptr + r, mask=r < R, other=E_P2).to(tl.int32)
        counts += tl.sum((ex[:, None] == ids[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    end = tl.where(ids < E, end, 2147483647)
    for p0 in range(0, NUM_BLOCKS * BLOCK_M, FILL):
        p = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + p, tl.zeros([FILL], dtype=tl.int32) + R, mask=p < NUM_BLOCKS * BLOCK_M)
    for b0 in range(0, NUM_BLOCKS, FILL):
        b = b0 + tl.arange(0, FILL)
        e_of = tl.sum((end[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(e_of < E, e_of, -1), mask=b < NUM_BLOCKS)
    tl.debug_barrier()  # the sentinel fill above is visible before the rows are scattered over it
    seen = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, R, CHUNK):
        r = c0 + tl.arange(0, CHUNK)
        ex = tl.load(expert_ptr + r, mask=r < R, other=E_P2).to(tl.int32)
        onehot = (ex[:, None] == ids[None, :]).to(tl.int32)  # [CHUNK, E_P2]
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # rank among this chunk's rows of e
        base = tl.sum(onehot * (start + seen)[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, r, mask=r < R)
        seen += tl.sum(onehot, axis=0)


# ------------------------------------------------------------------------------------------------- host code
def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_out if kw.get("SPLIT_K", 1) > 1 else None)


def _zero_out(nargs):  # split-K programs add into the output
    nargs["out_ptr"].zero_()


# Decode (M <= 16): GEMV configurations (BLOCK_M = 1) and tensor-core ones (BLOCK_M = 16), split-K for
# shapes with few output tiles (e.g. 14336 -> 4096). BLOCK_K counts unit slots (base 3: 8 per byte); tiles of
# at most a group (128) load one scale per row, larger ones one per word.
DECODE_CONFIGS = [
    _cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
    _cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1, num_warps=8),
    _cfg(BLOCK_M=1, BLOCK_N=32, BLOCK_K=512, SPLIT_K=2),
    _cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512, SPLIT_K=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=2),
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4),
]
# Prefill (M > 16): tensor-core tiles.
GEMM_CONFIGS = [
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),
]
# Grouped MoE: BLOCK_M is fixed by the routing (`grouped_block_m`), the rest is tuned.
GROUPED_CONFIGS = {
    1: [_cfg(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1), _cfg(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
        _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1), _cfg(BLOCK_N=32, BLOCK_K=512, SPLIT_K=2),
        _cfg(BLOCK_N=16, BLOCK_K=512, SPLIT_K=4)],
    16: [_cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_stages=4), _cfg(BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
         _cfg(BLOCK_N=32, BLOCK_K=256, SPLIT_K=2), _cfg(BLOCK_N=64, BLOCK_K=256, SPLIT_K=4)],
    64: [_cfg(BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
         _cfg(BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
         _cfg(BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=8, num_stages=3),
         _cfg(BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3)],
}
GROUPED_CONFIGS[32] = GROUPED_CONFIGS[64]
# Under the interpreter: one small configuration per path.
INTERPRET_CONFIGS = {
    "gemv": dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1),
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1),
}
_TUNE_KEY = ["M_BUCKET", "N", "K", "G", "BITS", "KIND", "HAS_ZERO", "SCALE_MODE", "BLOCK_M"]


def _prune(configs, named_args, **kwargs):
    """Drop configurations whose K tile holds no whole unit or whose unit tile is huge."""
    sp2 = kwargs["SP2"]
    keep = [c for c in configs if 1 <= c.kwargs["BLOCK_K"] // sp2 <= 256]
    return keep or configs[:1]


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _tuner(configs):
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                           do_bench=_bench)(_packed_mm_kernel)


_TUNED: dict = {}


def _tuned(name: str, configs):
    if name not in _TUNED:
        _TUNED[name] = _tuner(configs)
    return _TUNED[name]


@dataclass(frozen=True)
class Geometry:
    """How a codec's rows are read: ``SLOTS`` codes per storage unit (``SP2``: padded to a power of two),
    ``ZC`` the implied zero (symmetric int ``2^(b-1)``; ternary2 stores ``t + 2``; base 3 decodes ``t + 1``)."""

    BITS: int
    KIND: int
    SLOTS: int
    SP2: int
    ZC: int


def supported(bits: int, ternary: bool, base3: bool) -> bool:
    """Whether the kernels implement this codec (every registered codec; not e.g. 5-7 bit codes)."""
    return base3 or bits in (1, 2, 3, 4, 8)


def geometry(bits: int, ternary: bool, base3: bool) -> Geometry:
    if base3:
        return Geometry(8, BASE3, 5, 8, 1)
    if not supported(bits, ternary, base3):
        raise ValueError(f"no Triton kernel for {bits}-bit codes")
    slots = 32 if bits == 3 else 32 // bits
    return Geometry(bits, TERNARY2 if ternary else INT, slots, slots, 2 if ternary else 2 ** (bits - 1))


def _group_args(K: int, G: int, slots: int) -> tuple[int, int]:
    """``(GROUP, SCALE_MODE)`` (compile-time constants): ``GROUP = 0`` means one group per row."""
    if G == 1:
        return 0, 0
    group = K // G
    if group % slots == 0:
        return group, 0
    return group, (1 if slots < group else 2)


def _dot_dtype(dtype: torch.dtype):
    if INTERPRET:  # the interpreter's bf16 arithmetic is wrong; fp16 dots are exact there
        return tl.float16 if dtype == torch.float16 else tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch goes through here (tests replace it to check the host code without a GPU)."""
    kernel[grid](*args, **kwargs)


def mm_arguments(x, data, scale, zero, out, rows, experts, *, M: int, N: int, K: int, W: int, G: int, x_div: int,
                 stride_e: tuple[int, int], geo: Geometry, grouped: bool, dot_dtype: torch.dtype | None = None) -> dict:
    """Every argument of `_packed_mm_kernel` except the tile configuration, by name: the launches use it, and
    so does `moecompress.kernels.aot` (which compiles exactly what is launched). Shapes are given explicitly
    so that the AOT compiler can pass placeholder tensors."""
    group, mode = _group_args(K, G, geo.SLOTS)
    return dict(x_ptr=x, data_ptr=data, scale_ptr=scale, zero_ptr=scale if zero is None else zero, out_ptr=out,
                rows_ptr=rows, expert_ptr=experts, M=M, N=N, K=K, W=W, G=G, GROUP=group, X_DIV=x_div,
                stride_e_data=stride_e[0], stride_e_scale=stride_e[1], M_BUCKET=_bucket(M),
                BITS=geo.BITS, KIND=geo.KIND, HAS_ZERO=zero is not None, SCALE_MODE=mode, SLOTS=geo.SLOTS,
                SP2=geo.SP2, ZC=geo.ZC, GROUPED=grouped, DOT=_dot_dtype(dot_dtype or x.dtype))


def _mm(values: dict, config: dict | None, tuner, grid_m, **extra) -> None:
    N = values["N"]
    if config is not None:
        config = dict(config)
        opts = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
        if config.get("SPLIT_K", 1) > 1:
            values["out_ptr"].zero_()
        grid = (grid_m(config), triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        _launch(_packed_mm_kernel, grid, **values, **config, **opts)
    else:
        _launch(tuner, lambda meta: (grid_m(meta), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]), **values,
                **extra)


def packed_matmul(x: torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, columns: int, config: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for one packed weight ``[1, N, W]`` -> ``[M, N]`` in ``x.dtype`` (float32 for bf16
    under the interpreter), dequantizing in the kernel. ``config``: a fixed kernel configuration
    (``BLOCK_M`` 1 = GEMV, else >= 16), bypassing the autotuner."""
    M, K = x.shape
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    _, N, _ = data.shape
    geo = geometry(bits, ternary, base3)
    if config is not None and config["BLOCK_M"] != 1 and min(config["BLOCK_M"], config["BLOCK_N"]) < 16:
        raise ValueError("Triton block sizes must be at least 16 for tensor-core tiles")
    if config is None and INTERPRET:
        config = INTERPRET_CONFIGS["gemv" if M == 1 else "gemm"]
    out = torch.empty(M, N, dtype=_out_dtype(x.dtype), device=x.device)
    values = mm_arguments(x.contiguous(), data, scale, zero, out, out, out, M=M, N=N, K=K, W=data.shape[-1],
                          G=scale.shape[-1], x_div=1, stride_e=(0, 0), geo=geo, grouped=False)
    _mm(values, config, plain_tuner(M), lambda meta: triton.cdiv(M, meta["BLOCK_M"]))
    return out


def plain_tuner(M: int):
    """The autotuner of a plain (one weight) product with M rows: decode configurations up to 16 rows."""
    return _tuned("decode", DECODE_CONFIGS) if M <= 16 else _tuned("gemm", GEMM_CONFIGS)


# ------------------------------------------------------------------------------------------------- MoE routing
def moe_align(rows_expert: torch.Tensor, num_experts: int, block_m: int | None = None) -> MoeRoute:
    """The grouped kernel's routing for ``rows_expert [R]`` (one Triton launch; none when ``block_m == 1``)."""
    R = rows_expert.numel()
    rows_expert = rows_expert.reshape(-1)
    bm = grouped_block_m(R, num_experts) if block_m is None else block_m
    if bm == 1:
        return MoeRoute(R, num_experts, 1, rows_expert.contiguous(), None)
    nb = max_blocks(R, num_experts, bm)
    sorted_rows = torch.empty(nb * bm, dtype=torch.int32, device=rows_expert.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=rows_expert.device)
    _launch(_moe_align_kernel, (1,), **align_arguments(rows_expert.contiguous(), sorted_rows, block_expert, R=R,
                                                       E=num_experts, num_blocks=nb, block_m=bm))
    return MoeRoute(R, num_experts, bm, block_expert, sorted_rows)


def align_arguments(rows_expert, sorted_rows, block_expert, *, R: int, E: int, num_blocks: int, block_m: int) -> dict:
    """Every argument of `_moe_align_kernel` by name, launch options included."""
    e_p2 = triton.next_power_of_2(E)
    return dict(expert_ptr=rows_expert, sorted_ptr=sorted_rows, block_expert_ptr=block_expert, R=R, E=E,
                NUM_BLOCKS=num_blocks, BLOCK_M=block_m, E_P2=e_p2, CHUNK=max(16, min(256, 8192 // e_p2)), FILL=256,
                num_warps=4)


def grouped_matmul(x: torch.Tensor, route: MoeRoute, x_div: int, bits: int, ternary: bool, base3: bool,
                   data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, columns: int,
                   config: dict | None = None) -> torch.Tensor:
    """Row ``r`` of the result is ``x[r // x_div] @ W_{e(r)}^T`` (``[route.num_rows, N]``, ``x.dtype``); one launch
    for every expert. ``x_div``: the top-k when ``x`` holds one row per token, 1 when one row per (token, slot)."""
    K = x.shape[1]
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    E, N, W = data.shape
    geo = geometry(bits, ternary, base3)
    bm = route.block_m
    if config is None and INTERPRET:
        config = {k: v for k, v in INTERPRET_CONFIGS["gemv" if bm == 1 else "gemm"].items() if k != "BLOCK_M"}
    out = torch.empty(route.num_rows, N, dtype=_out_dtype(x.dtype), device=x.device)
    rows = route.sorted_rows if route.sorted_rows is not None else route.block_expert
    nb = route.num_blocks
    G = scale.shape[-1]
    values = mm_arguments(x.contiguous(), data, scale, zero, out, rows, route.block_expert, M=route.num_rows, N=N,
                          K=K, W=W, G=G, x_div=x_div, stride_e=(N * W, N * G), geo=geo, grouped=True)
    _mm(values, None if config is None else {**config, "BLOCK_M": bm}, _tuned(f"grouped{bm}", GROUPED_CONFIGS[bm]),
        lambda meta: nb, BLOCK_M=bm)
    return out


def dequantize(bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[E, O, C]`` weights from packed ``data [E, O, W]``, ``scale``/``zero [E, O, G]``."""
    E, O, W = data.shape
    R, G = E * O, scale.shape[-1]
    geo = geometry(bits, ternary, base3)
    out = torch.empty(R, columns, dtype=_out_dtype(dtype), device=data.device)
    values = dequant_arguments(data.contiguous().view(R, W), scale.contiguous().view(R, G),
                               None if zero is None else zero.contiguous(), out, R=R, C=columns, W=W, G=G, geo=geo)
    grid = (triton.cdiv(R, values["BLOCK_R"]),
            triton.cdiv(triton.cdiv(columns, geo.SLOTS), values["BLOCK_K"] // geo.SP2))
    _launch(_dequant_kernel, grid, **values)
    return out.view(E, O, columns).to(dtype)


def dequant_arguments(data, scale, zero, out, *, R: int, C: int, W: int, G: int, geo: Geometry) -> dict:
    """Every argument of `_dequant_kernel` by name (see `mm_arguments`)."""
    group, mode = _group_args(C, G, geo.SLOTS)
    BR, BK = (16, 64) if INTERPRET else (32, 256)
    return dict(data_ptr=data, scale_ptr=scale, zero_ptr=scale if zero is None else zero, out_ptr=out, R=R, C=C, W=W,
                G=G, GROUP=group, BITS=geo.BITS, KIND=geo.KIND, HAS_ZERO=zero is not None, SCALE_MODE=mode,
                SLOTS=geo.SLOTS, SP2=geo.SP2, ZC=geo.ZC, BLOCK_R=BR, BLOCK_K=max(BK, geo.SP2))
