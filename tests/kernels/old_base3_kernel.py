"""The base-3 decoding helper and dequantization kernel as they were before commit "kernels: ...", kept only
as a regression fixture for tests/kernels/test_aot_compile.py: the interpreter accepted them, but the GPU
compiler traces the integer branch after ``if KIND == 2: ... return`` on uint8 data and fails with
"Cannot bitcast data-type of size 8 to data-type of size 32". Not used by the package."""

import triton
import triton.language as tl


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
