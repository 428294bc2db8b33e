"""What the packed-codec Triton kernels share: the device helpers that read a row of packed codes in storage
units, unpack them, apply group scales and zero points and store the result (called by the kernels of
`triton_matmul` and `triton_dequant`), and the host-side geometry of a codec (how its rows are read). The design is
in `moecompress.kernels.triton_dequant`'s docstring.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import triton
import triton.language as tl

__all__ = ["BASE3", "INT", "INTERPRET", "TERNARY2", "Geometry", "geometry", "supported"]

INT, TERNARY2, BASE3 = 0, 1, 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by @triton.jit at import, as here


# ----------------------------------------------------------------------------------------------- device code
@triton.jit
def _decoder_rows(pid, rows_ptr, expert_ptr, M, X_DIV, SUBS, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
                  MB: tl.constexpr):
    """The activation rows of program ``pid`` of the row-walking decoders (`triton_dict`, `triton_trellis`):
    ``(expert, output rows [MB], input rows [MB], valid [MB])``. Grouped with ``BLOCK_M`` 1: row ``pid`` with its own
    expert (``expert_ptr``: the rows' experts); otherwise sub-block ``pid % SUBS`` of the route's block
    ``pid // SUBS``. Plain: rows ``pid MB ..`` of one weight (expert 0)."""
    mm = tl.arange(0, MB)
    if GROUPED:
        if BLOCK_M == 1:
            e = tl.load(expert_ptr + pid).to(tl.int64)
            orow = pid + mm
            m_ok = mm < 1
        else:
            b = pid // SUBS
            e = tl.load(expert_ptr + b).to(tl.int64)
            orow = tl.load(rows_ptr + b * BLOCK_M + (pid % SUBS) * MB + mm).to(tl.int64)
            m_ok = (orow < M) & (e >= 0)
        xrow = orow // X_DIV
        e = tl.maximum(e, 0)
    else:
        e = tl.zeros([], dtype=tl.int64)
        orow = (pid * MB + mm).to(tl.int64)
        m_ok = orow < M
        xrow = orow
    return e, orow, xrow, m_ok


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
def _window_code(w, J: tl.constexpr, BITS: tl.constexpr, LOW: tl.constexpr, ZC: tl.constexpr):
    """Code ``J`` of words ``w`` (``BITS``-bit codes, a power-of-two count per word) read in place: ``(f, xs)``
    with ``f = (q - ZC) * 2^SH`` exactly in float32 and ``xs = 2^-SH``, so ``f * (x * xs) = (q - ZC) * x``.
    ``(w & (mask << SH)) | bits(2^23)`` is the float ``2^23 + q * 2^SH`` while the code lies below bit 23 (slots
    below ``LOW``; one AND-OR and one subtraction, no shift); later slots are read from the word shifted right by
    ``BITS * LOW``. Measured on an H200 (benchmarks/gemv_variants.py): int4 4096x14336 at batch 1 in 21.7 us
    against 29.8 us for the shift-and-convert loop."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if J < LOW:
        f = ((w & (MASK << (BITS * J))) | 0x4B000000).to(tl.float32, bitcast=True) - \
            (8388608.0 + ZC * (1 << (BITS * J)))
        xs = 1.0 / (1 << (BITS * J))
    else:
        f = (((w >> (BITS * LOW)) & (MASK << (BITS * (J - LOW)))) | 0x4B000000).to(tl.float32, bitcast=True) - \
            (8388608.0 + ZC * (1 << (BITS * (J - LOW))))
        xs = 1.0 / (1 << (BITS * (J - LOW)))
    return f, xs


@triton.jit
def _zload(ptr, mask, ZERO_DIV: tl.constexpr):
    """Zero points as float32: the stored bytes divided by ``ZERO_DIV`` (1: integer zeros; ``2^f``: the -fz codecs'
    fractional zeros, an exact power-of-two division)."""
    z = tl.load(ptr, mask=mask, other=0).to(tl.float32)
    if ZERO_DIV > 1:
        z = z / ZERO_DIV
    return z


@triton.jit
def _scale_zero3(scale_ptr, zero_ptr, srow, u, n_ok, G, k0, KSTEP: tl.constexpr, GROUP: tl.constexpr,
                 SLOTS: tl.constexpr, SP2: tl.constexpr, SCALE_MODE: tl.constexpr, ZERO_DIV: tl.constexpr,
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
        if ZERO_DIV:
            z = _zload(zero_ptr + srow + g, n_ok, ZERO_DIV)[:, :, None]
        else:
            z = tl.zeros_like(s) + ZC
    elif SCALE_MODE == 0:  # a unit never straddles a group: one load per unit
        g = (u * SLOTS) // GROUP
        m = n_ok & (g < G)
        s = tl.load(scale_ptr + srow + g, mask=m, other=0.0).to(tl.float32)[:, :, None]
        if ZERO_DIV:
            z = _zload(zero_ptr + srow + g, m, ZERO_DIV)[:, :, None]
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
        if ZERO_DIV:
            z = tl.where(lo, _zload(zero_ptr + srow + g, m0, ZERO_DIV)[:, :, None],
                         _zload(zero_ptr + srow + g + 1, m1, ZERO_DIV)[:, :, None])
        else:
            z = tl.zeros_like(s) + ZC
    else:  # groups smaller than a unit: per element
        j = tl.arange(0, SP2)[None, None, :]
        g = ((u * SLOTS)[:, :, None] + j) // GROUP
        m = n_ok[:, :, None] & (g < G)
        s = tl.load(scale_ptr + srow[:, :, None] + g, mask=m, other=0.0).to(tl.float32)
        if ZERO_DIV:
            z = _zload(zero_ptr + srow[:, :, None] + g, m, ZERO_DIV)
        else:
            z = tl.zeros_like(s) + ZC
    return s, z


@triton.jit
def _weights3(q, s, z, DOT: tl.constexpr, FRAC: tl.constexpr):
    """``(q - z) * s`` in the dot dtype, rounded once from the exact value (as the reference rounds). ``FRAC``:
    fractional zeros (``z + 1024`` would lose their fraction in float16; ``q - z`` has at most 8 significant bits,
    exact in float16 from float32)."""
    if DOT == tl.float16 and FRAC:
        w = (_as_f32(q) - z).to(tl.float16) * s.to(tl.float16)
    elif DOT == tl.float16:
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


# -------------------------------------------------------------------------------- host code: codec geometry
def decoder_batch(m: int) -> int:
    """Activation rows per program of the row-walking decoders' plain products (1..16)."""
    return min(16, triton.next_power_of_2(max(1, m)))


def decoder_route(route) -> tuple:
    """``(rows, experts, MB, SUBS, programs)`` of a row-walking decoder's grouped launch over a `MoeRoute`."""
    R, bm = route.num_rows, route.block_m
    if bm == 1:
        return route.block_expert, route.block_expert, 1, 1, R
    mb = min(16, bm)
    return route.sorted_rows, route.block_expert, mb, bm // mb, route.num_blocks * (bm // mb)


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a jitted function: microseconds per host call)."""
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """How a codec's rows are read: ``SLOTS`` codes per storage unit (``SP2``: padded to a power of two),
    ``ZC`` the implied zero (symmetric int ``2^(b-1)``; ternary2 stores ``t + 2``; base 3 decodes ``t + 1``)."""

    BITS: int
    KIND: int
    SLOTS: int
    SP2: int
    ZC: int
    ZDIV: int = 1  # stored zero points per unit of zero (2^f for the -fz codecs' fractional zeros)


def supported(bits: int, ternary: bool, base3: bool) -> bool:
    """Whether the kernels implement this codec (every registered codec; not e.g. 5-7 bit codes)."""
    return base3 or bits in (1, 2, 3, 4, 8)


@functools.lru_cache(maxsize=None)  # a frozen value, asked for on every launch
def geometry(bits: int, ternary: bool, base3: bool, zero_frac: int = 0) -> Geometry:
    if zero_frac and (ternary or base3):
        raise ValueError("fractional zero points are for integer codecs")
    if base3:
        return Geometry(8, BASE3, 5, 8, 1)
    if not supported(bits, ternary, base3):
        raise ValueError(f"no Triton kernel for {bits}-bit codes")
    slots = 32 if bits == 3 else 32 // bits
    return Geometry(bits, TERNARY2 if ternary else INT, slots, slots, 2 if ternary else 2 ** (bits - 1), 2 ** zero_frac)


def _group_args(K: int, G: int, slots: int) -> tuple[int, int]:
    """``(GROUP, SCALE_MODE)`` (compile-time constants): ``GROUP = 0`` means one group per row."""
    if G == 1:
        return 0, 0
    group = K // G
    if group % slots == 0:
        return group, 0
    return group, (1 if slots < group else 2)
