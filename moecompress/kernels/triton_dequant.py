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
  (``acc += p * s``), not once per element, and an asymmetric zero point is folded in as ``- z * sum(x)``
  (``ZERO_DIV``: 0 no stored zero, 1 integer zeros, ``2^f`` the -fz codecs' bytes divided exactly).
  No tensor-core padding, no layout shuffles, weights read exactly once. On an H200 this loop is bound by
  instructions, not bandwidth (every codec near cuBLAS's fp16 time at batch 1), so two changes cut them
  (`triton_common._window_code`, `benchmarks/gemv_variants.py`): codes with a power-of-two count per word are
  read in place (``(w & (mask << b*j)) | bits(2^23)`` is ``2^23 + q * 2^(b*j)`` while the code lies below bit
  23: an AND-OR and a subtraction, the activation pre-scaled by ``2^-(b*j)``), and rows are addressed through
  ``W_ROW``, an unspecialized copy of the row stride, so Triton gives each thread one word column of several rows
  (one activation load per slot serves them all) instead of a vector of one row's words.
* **Prefill / small batches (``BLOCK_M >= 16``).** A tiled GEMM on tensor cores: the [BLOCK_N, BU, SLOTS]
  code tile is dequantized to the activation dtype (fp16: ``(1024 + q) - (1024 + z)`` then ``* s`` in fp16,
  which rounds exactly as the reference does; fractional zeros and bf16: ``q - z`` in fp32, exact in the
  activation dtype, then ``* s`` with one rounding), reshaped to
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

Layout: `triton_common` holds the device helpers that every kernel calls (storage units, codes, scales, stores)
and the codec geometry; `triton_matmul` the fused matmul kernel, its configurations and autotuning; this module
the dequantization and MoE alignment kernels and every host launcher: the public API (the rest of moecompress
imports from here) and the one launch point, `_launch`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moecompress.kernels.routing import MoeRoute, grouped_block_m, max_blocks
from moecompress.kernels.triton_common import (Geometry, _as_f32, _cdiv, _codes3, _group_args, _load_units,
                                               _scale_zero3, geometry, supported)
from moecompress.kernels.triton_matmul import (DECODE_CONFIGS, GEMM_CONFIGS, GROUPED_CONFIGS, INTERPRET_CONFIGS,
                                               _packed_mm_kernel, _tuned, plain_tuner)

__all__ = ["DECODE_CONFIGS", "GEMM_CONFIGS", "GROUPED_CONFIGS", "INTERPRET", "MoeRoute", "align_arguments",
           "dequant_arguments", "dequantize", "geometry", "grouped_block_m", "grouped_matmul", "mm_arguments",
           "moe_align", "packed_matmul", "plain_tuner", "supported"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by @triton.jit at import, as here


# ----------------------------------------------------------------------------------------------- device code
@triton.jit
def _dequant_kernel(data_ptr, scale_ptr, zero_ptr, out_ptr, R, C, W, G, GROUP: tl.constexpr,
                    BITS: tl.constexpr, KIND: tl.constexpr, ZERO_DIV: tl.constexpr, SCALE_MODE: tl.constexpr,
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
                        SLOTS, SP2, SCALE_MODE, ZERO_DIV, ZC)
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
                rows_ptr=rows, expert_ptr=experts, M=M, N=N, K=K, W=W, G=G, GROUP=group, X_DIV=x_div, W_ROW=W,
                stride_e_data=stride_e[0], stride_e_scale=stride_e[1], M_BUCKET=_bucket(M),
                BITS=geo.BITS, KIND=geo.KIND, ZERO_DIV=0 if zero is None else geo.ZDIV, SCALE_MODE=mode,
                SLOTS=geo.SLOTS, SP2=geo.SP2, ZC=geo.ZC, GROUPED=grouped, DOT=_dot_dtype(dot_dtype or x.dtype))


_TUNED_CONFIGS: dict = {}  # launch key -> the configuration the autotuner chose for it


def _tuning_key(tuner, values: dict, extra: dict) -> tuple:
    """What decides the autotuner's choice (its key and the tensors' dtypes), plus the tuner and the device."""
    x, data = values["x_ptr"], values["data_ptr"]
    return (id(tuner), values["M_BUCKET"], values["N"], values["K"], values["G"], values["BITS"], values["KIND"],
            values["ZERO_DIV"], values["SCALE_MODE"], values["GROUPED"], extra.get("BLOCK_M"), x.dtype, data.dtype,
            x.device)


def _mm(values: dict, config: dict | None, tuner, grid_m, **extra) -> None:
    """Launch the fused kernel: with ``config``, that tile; else the autotuner on a launch key's first call and,
    from then on, the tile it chose as a fixed configuration. Bypassing the autotuner's Python on every call cut
    a decode GEMV's eager cost on an H200 from 115 to 83 us per call (benchmarks/gemv_variants.py)."""
    N = values["N"]
    if config is None:
        key = _tuning_key(tuner, values, extra)
        config = _TUNED_CONFIGS.get(key)
        if config is None:
            cache = getattr(tuner, "cache", None)
            before = set(cache) if isinstance(cache, dict) else None
            _launch(tuner, lambda meta: (grid_m(meta), _cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]), **values,
                    **extra)
            new = [k for k in cache if k not in before] if before is not None else []
            if len(new) == 1:  # the tuner benchmarked this key just now: remember its choice
                c = cache[new[0]]
                _TUNED_CONFIGS[key] = {**extra, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            return
    config = dict(config)
    opts = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    if config.get("SPLIT_K", 1) > 1:
        values["out_ptr"].zero_()
    grid = (grid_m(config), _cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
    _launch(_packed_mm_kernel, grid, **values, **config, **opts)


def packed_matmul(x: torch.Tensor, bits: int, ternary: bool, base3: bool, data: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, columns: int, config: dict | None = None,
                  zero_frac: int = 0) -> torch.Tensor:
    """``x [M, K] @ W^T`` for one packed weight ``[1, N, W]`` -> ``[M, N]`` in ``x.dtype`` (float32 for bf16
    under the interpreter), dequantizing in the kernel. ``config``: a fixed kernel configuration
    (``BLOCK_M`` 1 = GEMV, else >= 16), bypassing the autotuner. ``zero_frac``: the zeros' fraction bits (-fz)."""
    M, K = x.shape
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    _, N, _ = data.shape
    geo = geometry(bits, ternary, base3, zero_frac)
    if config is not None and config["BLOCK_M"] != 1 and min(config["BLOCK_M"], config["BLOCK_N"]) < 16:
        raise ValueError("Triton block sizes must be at least 16 for tensor-core tiles")
    if config is None and INTERPRET:
        config = INTERPRET_CONFIGS["gemv" if M == 1 else "gemm"]
    out = torch.empty(M, N, dtype=_out_dtype(x.dtype), device=x.device)
    values = mm_arguments(x.contiguous(), data, scale, zero, out, out, out, M=M, N=N, K=K, W=data.shape[-1],
                          G=scale.shape[-1], x_div=1, stride_e=(0, 0), geo=geo, grouped=False)
    _mm(values, config, plain_tuner(M), lambda meta: _cdiv(M, meta["BLOCK_M"]))
    return out


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
                   config: dict | None = None, zero_frac: int = 0) -> torch.Tensor:
    """Row ``r`` of the result is ``x[r // x_div] @ W_{e(r)}^T`` (``[route.num_rows, N]``, ``x.dtype``); one launch
    for every expert. ``x_div``: the top-k when ``x`` holds one row per token, 1 when one row per (token, slot)."""
    K = x.shape[1]
    if K != columns:
        raise ValueError(f"x has {K} features, the weight {columns}")
    E, N, W = data.shape
    geo = geometry(bits, ternary, base3, zero_frac)
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
               zero: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32,
               zero_frac: int = 0) -> torch.Tensor:
    """``[E, O, C]`` weights from packed ``data [E, O, W]``, ``scale``/``zero [E, O, G]``."""
    E, O, W = data.shape
    R, G = E * O, scale.shape[-1]
    geo = geometry(bits, ternary, base3, zero_frac)
    out = torch.empty(R, columns, dtype=_out_dtype(dtype), device=data.device)
    values = dequant_arguments(data.contiguous().view(R, W), scale.contiguous().view(R, G),
                               None if zero is None else zero.contiguous(), out, R=R, C=columns, W=W, G=G, geo=geo)
    grid = (_cdiv(R, values["BLOCK_R"]),
            _cdiv(_cdiv(columns, geo.SLOTS), values["BLOCK_K"] // geo.SP2))
    _launch(_dequant_kernel, grid, **values)
    return out.view(E, O, columns).to(dtype)


def dequant_arguments(data, scale, zero, out, *, R: int, C: int, W: int, G: int, geo: Geometry) -> dict:
    """Every argument of `_dequant_kernel` by name (see `mm_arguments`)."""
    group, mode = _group_args(C, G, geo.SLOTS)
    BR, BK = (16, 64) if INTERPRET else (32, 256)
    return dict(data_ptr=data, scale_ptr=scale, zero_ptr=scale if zero is None else zero, out_ptr=out, R=R, C=C, W=W,
                G=G, GROUP=group, BITS=geo.BITS, KIND=geo.KIND, ZERO_DIV=0 if zero is None else geo.ZDIV,
                SCALE_MODE=mode, SLOTS=geo.SLOTS, SP2=geo.SP2, ZC=geo.ZC, BLOCK_R=BR, BLOCK_K=max(BK, geo.SP2))
