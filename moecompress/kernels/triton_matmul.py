"""The fused dequant + matmul kernel `_packed_mm_kernel` (a GEMV for decode, a tensor-core GEMM for prefill and
small batches, both also in the grouped MoE form) and its autotuning: the configurations per path and the autotuners,
built on first use. `triton_dequant.packed_matmul` / `grouped_matmul` launch it; the design is in that module's
docstring.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from moecompress.kernels.triton_common import (_as_f32, _codes3, _k_range, _load_units, _scale_zero3, _slot,
                                               _store_out, _weights3, _window_code, _zload)

__all__ = ["DECODE_CONFIGS", "GEMM_CONFIGS", "GROUPED_CONFIGS", "INTERPRET_CONFIGS", "plain_tuner"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by @triton.jit at import, as here


# ----------------------------------------------------------------------------------------------- device code
@triton.jit
def _gemv(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, expert_ptr, M, N, K, W, G, X_DIV, W_ROW,
          stride_e_data, stride_e_scale, GROUP: tl.constexpr,
          BITS: tl.constexpr, KIND: tl.constexpr, ZERO_DIV: tl.constexpr, SCALE_MODE: tl.constexpr,
          SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr, GROUPED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row, BLOCK_N outputs, one K split; fp32 FMAs, scales once per tile (tile inside a group) or per
    unit (module docstring). Codes with a power-of-two count per word are read in place (`_window_code`), and their
    rows are addressed through ``W_ROW`` (= ``W``, never specialized): the compiler cannot prove 16-byte row
    starts, so it gives each thread one word column of several rows instead of a vector of one row's words, and
    one activation load serves those rows (int3 and base 3 keep the vector loads of ``W``)."""
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
    WINDOW: tl.constexpr = KIND != 2 and BITS != 3  # power-of-two codes per word
    LOW: tl.constexpr = (23 - BITS) // BITS + 1  # slots read without a shift (WINDOW)
    n64 = offs_n.to(tl.int64)[:, None]
    if WINDOW:  # the layout measured with the in-place read; int3 / base 3 keep their vector loads
        row_off = n64 * W_ROW
    else:
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
                if WINDOW:
                    f, xs = _window_code(w0, j, BITS, LOW, 0 if ZERO_DIV else ZC)
                    p += f * (xj * xs)
                    if ZERO_DIV:
                        sx += xj
                else:
                    q = _as_f32(_slot(w0, w1, w2, j, KIND, BITS))
                    if ZERO_DIV:
                        p += q * xj
                        sx += xj
                    else:
                        p += (q - ZC) * xj
            if ZERO_DIV:
                p -= _zload(zero_base + srow + g, m, ZERO_DIV) * sx
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
                if not ZERO_DIV:
                    q = q - ZC
                p0 += q * x0
                p1 += q * x1
                sx0 += x0
                sx1 += x1
            if ZERO_DIV:
                p0 -= _zload(zero_base + srow + g, m0, ZERO_DIV) * sx0
                p1 -= _zload(zero_base + srow + g + 1, m1, ZERO_DIV) * sx1
            acc += p0 * tl.load(scale_base + srow + g, mask=m0, other=0.0).to(tl.float32)
            acc += p1 * tl.load(scale_base + srow + g + 1, mask=m1, other=0.0).to(tl.float32)
        else:
            for j in tl.static_range(SLOTS):
                xj = tl.load(x_row + kb + j, mask=kb + j < K, other=0.0).to(tl.float32)
                g = (kb + j) // GROUP
                m = n_ok & (g < G)
                s = tl.load(scale_base + srow + g, mask=m, other=0.0).to(tl.float32)
                if ZERO_DIV:
                    z = _zload(zero_base + srow + g, m, ZERO_DIV)
                else:
                    z = ZC
                acc += (_as_f32(_slot(w0, w1, w2, j, KIND, BITS)) - z) * s * xj
    _store_out(out_ptr, row.to(tl.int64) * N + offs_n, tl.sum(acc, axis=1), offs_n < N, SPLIT_K)


@triton.jit
def _gemm(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr, M, N, K, W, G, X_DIV,
          stride_e_data, stride_e_scale, GROUP: tl.constexpr,
          BITS: tl.constexpr, KIND: tl.constexpr, ZERO_DIV: tl.constexpr, SCALE_MODE: tl.constexpr,
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
                            ZERO_DIV, ZC)
        w = tl.trans(tl.reshape(_weights3(q, s, z, DOT, ZERO_DIV > 1), (BLOCK_N, BLOCK_K)))  # [BK, BN], k = u*SP2 + j
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


@triton.jit(do_not_specialize=["M_BUCKET", "W_ROW"])
def _packed_mm_kernel(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr,
                      M, N, K, W, G, X_DIV, W_ROW, stride_e_data, stride_e_scale, M_BUCKET, GROUP: tl.constexpr,
                      BITS: tl.constexpr, KIND: tl.constexpr, ZERO_DIV: tl.constexpr, SCALE_MODE: tl.constexpr,
                      SLOTS: tl.constexpr, SP2: tl.constexpr, ZC: tl.constexpr, GROUPED: tl.constexpr,
                      DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """``out[r] = x[r // X_DIV] @ W_e^T`` for the rows of program axis 0 (grid: M-blocks, N-tiles, K-splits).

    ``BLOCK_M == 1``: GEMV (row = program, grouped: expert ``expert_ptr[row]``); else the tensor-core GEMM
    (grouped: rows ``rows_ptr[block]``, expert ``expert_ptr[block]``). ``M_BUCKET`` is only an autotune key;
    ``W_ROW`` equals ``W`` (the GEMV's unspecialized copy)."""
    if BLOCK_M == 1:
        _gemv(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, expert_ptr, M, N, K, W, G, X_DIV, W_ROW,
              stride_e_data, stride_e_scale, GROUP, BITS, KIND, ZERO_DIV, SCALE_MODE, SLOTS, SP2, ZC, GROUPED,
              BLOCK_N, BLOCK_K, SPLIT_K)
    else:
        _gemm(x_ptr, data_ptr, scale_ptr, zero_ptr, out_ptr, rows_ptr, expert_ptr, M, N, K, W, G, X_DIV,
              stride_e_data, stride_e_scale, GROUP, BITS, KIND, ZERO_DIV, SCALE_MODE, SLOTS, SP2, ZC, GROUPED, DOT,
              BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


# ------------------------------------------------------------------------------------------------ autotuning
def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_out if kw.get("SPLIT_K", 1) > 1 else None)


def _zero_out(nargs):  # split-K programs add into the output
    nargs["out_ptr"].zero_()


# Decode (M <= 16): GEMV configurations (BLOCK_M = 1) and tensor-core ones (BLOCK_M = 16), split-K for
# shapes with few output tiles (e.g. 14336 -> 4096). BLOCK_K counts unit slots (base 3: 8 per byte); tiles of
# at most a group (128) load one scale per row, larger ones one per word.
# The GEMV tiles of a group (128) and split K in two were the fastest of a sweep of the in-place read on an H200
# (benchmarks/gemv_variants.py: 128 x 128 / 2 at 4096 x 14336, 32 x 128 / 2 at 14336 x 4096 and 2048 x 768).
DECODE_CONFIGS = [
    _cfg(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
    _cfg(BLOCK_M=1, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2),
    _cfg(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=8),
    _cfg(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=8),
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
        _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1), _cfg(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
        _cfg(BLOCK_N=128, BLOCK_K=128, SPLIT_K=2), _cfg(BLOCK_N=16, BLOCK_K=512, SPLIT_K=4)],
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
_TUNE_KEY = ["M_BUCKET", "N", "K", "G", "BITS", "KIND", "ZERO_DIV", "SCALE_MODE", "BLOCK_M"]


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


def plain_tuner(M: int):
    """The autotuner of a plain (one weight) product with M rows: decode configurations up to 16 rows."""
    return _tuned("decode", DECODE_CONFIGS) if M <= 16 else _tuned("gemm", GEMM_CONFIGS)
