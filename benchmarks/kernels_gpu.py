#!/usr/bin/env python
"""GPU check and benchmark of the packed-weight Triton kernels: one command, about 5 minutes on an H100/H200.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_gpu.json [--quick] [--budget 290]

What it does, in order (each section records what it skipped if the time budget runs out):

1. **Precompile** every kernel specialization the run will launch, in parallel processes, into Triton's
   cache (`moecompress.kernels.aot`; the autotuner would otherwise compile its candidates one by one).
2. **Correctness without the interpreter**: every codec (int8, int4 sym/asym, int3, int2, int2-fz, ternary2,
   ternary-b3) x fp16/bf16 x M = 1, 4, 16, 128 x an odd and a real shape against the torch reference
   (dequantization exact; products within 5e-3 (fp16) / 1.5e-2 (bf16) of the largest output) with fixed
   configurations of every path, the grouped kernel with uneven routing, and the device-side MoE alignment
   against the torch routing. The timing section also checks each autotuned result (fp16, 5e-3).
3. **Kernel timings**, CUDA events, median: each packed product vs cuBLAS on the dense fp16 and bf16 weight
   and vs the memory-bandwidth limit of its bytes, at the expert shapes of Mixtral-8x7B (4096x14336,
   14336x4096), Qwen3-30B-A3B (2048x768, 768x2048) and DeepSeek-V3 (7168x2048, 2048x7168), M = 1, 4, 16,
   128, 512. Two numbers each: ``graph`` (20 calls captured in a CUDA graph: kernel time, no Python) and
   ``eager`` (20 back-to-back calls: what a Python caller sees). Targets use ``graph`` for both sides.
4. **Grouped MoE layer** (gate, up, GLU, down, top-k sum): 8 experts top-2 (Mixtral) and 128 experts
   top-8 (Qwen3-30B-A3B), T = 1..512 tokens, int4 and ternary-b3, against a bf16 per-expert loop (what
   transformers' eager experts do) and ``torch._grouped_mm`` (bf16; sm_90) when available.
5. **CUDA graph capture** of the packed MoE layer (Triton and torch backends, decode and sorted routing):
   captured after one warm-up call, replayed on new inputs, compared with eager.
6. **ternary-dict** (QMoE's sub-1-bit code): the fused decoder vs the base-3 kernel vs cuBLAS bf16 at
   Mixtral-8x7B expert shapes, batch 1 (target: within 1.5x of base 3), and its error against the reference.
7. **End to end**: decode tokens/s of a synthetic Mixtral-shaped model (transformers, random weights,
   ``--e2e-layers`` layers) in bf16 and with its experts packed (int4, ``PackedExperts``), batch 1.

Targets reported pass/fail in ``targets``: decode M=1 4096x14336 int4 >= 2.5x faster than fp16 cuBLAS;
int2 / int2-fz / ternary2 / ternary-b3 >= 4x; prefill M=512 within 1.3x of cuBLAS; grouped 8 experts top-2, T = 1..16,
>= 2x faster than the bf16 per-expert loop; graph capture works; correctness passes.

Without a GPU it prints one line and exits 2. It imports only torch, triton and moecompress's kernel
modules (not the package's ``__init__``, so neither transformers nor pydantic is needed) until the
end-to-end section, which needs transformers and is skipped, with the reason, if that import fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (name, bits, ternary, base3, asymmetric[, zero fraction bits])
CODECS = [("int8", 8, False, False, False), ("int4", 4, False, False, False), ("int4-asym", 4, False, False, True),
          ("int3", 3, False, False, False), ("int2", 2, False, False, False), ("ternary2", 2, True, False, False),
          ("ternary-b3", 8, True, True, False), ("int2-fz", 2, False, False, True, 6)]
SHAPES = {"mixtral-w1": (4096, 14336), "mixtral-w2": (14336, 4096), "qwen3-w1": (2048, 768),
          "qwen3-w2": (768, 2048), "dsv3-w1": (7168, 2048), "dsv3-w2": (2048, 7168)}  # (K, N)
GEMM_CODECS = list(CODECS)  # the gemm section's codecs (--codecs)
MS = (1, 4, 16, 128, 512)
GROUP = 128
BANDWIDTH = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0, "RTX 4090": 1008.0}
MOES = {"mixtral-8e-top2": (8, 2, 4096, 14336), "qwen3-128e-top8": (128, 8, 2048, 768)}  # E, K, H, I
# Relative to the largest reference output: fp16 weights round as the reference's, the output is rounded to
# fp16 (2^-11) and accumulation order differs; bf16 output rounding is 2^-9.
TOL = {"fp16": 5e-3, "bf16": 1.5e-2}


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def ok(self, reserve: float = 0.0) -> bool:
        return self.left() > reserve


def import_kernels():
    """moecompress's kernel modules without running ``moecompress/__init__`` (which loads transformers)."""
    sys.path.insert(0, str(ROOT))
    for name, sub in (("moecompress", ""), ("moecompress.formats", "formats")):
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [str(ROOT / "moecompress" / sub)]
            sys.modules[name] = m
    from moecompress.formats import bitpack, dictcode
    from moecompress.kernels import aot, dispatch, reference, routing
    from moecompress.kernels import triton_dequant as td
    from moecompress.kernels import triton_dict

    return types.SimpleNamespace(td=td, dispatch=dispatch, reference=reference, routing=routing, aot=aot,
                                 bitpack=bitpack, dictcode=dictcode, tdict=triton_dict)


# ------------------------------------------------------------------------------------------------- timing
def time_graph(fn, calls: int = 20, reps: int = 15) -> float:
    """Seconds per call, kernels only: ``calls`` calls captured in one CUDA graph, median over ``reps``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    del g
    return statistics.median(times)


def time_eager(fn, calls: int = 20, reps: int = 10) -> float:
    """Seconds per call as a Python caller sees it: ``calls`` back-to-back calls between two events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- data
def random_packed(codec, E: int, N: int, K: int, dev, seed: int = 0) -> dict:
    """Random packed tensors of the right shapes and dtypes (any bit pattern decodes; for timing)."""
    _, bits, ternary, base3, asym, *_ = codec
    g = torch.Generator(device=dev).manual_seed(seed)
    G = max(1, K // GROUP)
    W = (K + 4) // 5 if base3 else (K * bits + 31) // 32
    if base3:
        data = torch.randint(0, 243, (E, N, W), device=dev, generator=g, dtype=torch.int32).to(torch.uint8)
    else:
        data = torch.randint(-2 ** 31, 2 ** 31 - 1, (E, N, W), device=dev, generator=g, dtype=torch.int32)
    scale = (torch.rand(E, N, G, device=dev, generator=g) * 0.002 + 0.001).half()
    zero = torch.randint(0, 2 ** bits, (E, N, G), device=dev, generator=g, dtype=torch.int32).to(torch.uint8) \
        if asym else None
    return {"data": data, "scale": scale, "zero": zero}


def exact_packed(k, codec, E: int, N: int, K: int, group: int, seed: int = 0):
    """Valid codes packed with the project's packers (CPU), moved to the GPU; also the float32 weights."""
    _, bits, ternary, base3, asym, *frac = codec
    g = torch.Generator().manual_seed(seed)
    top = 2 if ternary else 2 ** bits - 1
    codes = torch.randint(0, top + 1, (E, N, K), generator=g)
    G = max(1, K // group)
    scale = (torch.rand(E, N, G, generator=g) * 0.02 + 0.005).half().float()
    if ternary:
        zero = torch.ones_like(scale)
    elif asym and frac:  # fractional zeros: every storable byte
        zero = torch.randint(0, 256, scale.shape, generator=g).float() / 2 ** frac[0]
    elif asym:
        zero = torch.randint(0, top + 1, scale.shape, generator=g).float()
    else:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    if base3:
        data = k.bitpack.pack_trits(codes - 1)
    elif ternary:
        data = k.bitpack.pack_bits(codes + 1, 2)  # t + 2
    else:
        data = k.bitpack.pack_bits(codes, bits)
    ref = k.reference.dequantize(codes, scale, zero)
    stored = zero * 2 ** (frac[0] if frac else 0)
    zero_bytes = stored.to(torch.uint8).cuda() if asym else None
    return ({"data": data.cuda(), "scale": scale.half().cuda(), "zero": zero_bytes},
            ref.cuda())


def args_of(codec, t, K):
    _, bits, ternary, base3, *_ = codec
    return bits, ternary, base3, t["data"], t["scale"], t["zero"], K


def zf(codec) -> dict:
    """The kernels' ``zero_frac`` keyword of a codec (fractional zeros: the -fz codecs)."""
    return {"zero_frac": codec[5] if len(codec) > 5 else 0}


def packed_bytes(t) -> int:
    return sum(v.numel() * v.element_size() for v in t.values() if v is not None)


# ------------------------------------------------------------------------------------------------- sections
CHECK_SHAPES = ((333, 768, 128), (1024, 2048, 128), (96, 160, 32))  # (N, K, group): odd, real, small groups


def check_configs(td) -> dict:
    """Fixed configurations of the correctness checks (GEMV, split-K GEMV, tensor-core decode with split-K,
    prefill tile); the timing section checks whatever the autotuner picks."""
    def first(cfgs, bm, split):
        return next(c for c in cfgs if (c.kwargs["BLOCK_M"] == 1) == (bm == 1) and (c.kwargs["SPLIT_K"] > 1) == split)

    return {1: first(td.DECODE_CONFIGS, 1, False), 2: first(td.DECODE_CONFIGS, 1, True),
            4: first(td.DECODE_CONFIGS, 16, False), 16: first(td.DECODE_CONFIGS, 16, True), 128: td.GEMM_CONFIGS[0]}


def _cfg(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def precompile(k, arch: int, jobs: int, quick: bool, shapes, ms, wanted=None) -> dict:
    """Specs of every launch the run makes (all autotune candidates), compiled in parallel."""
    td, aot = k.td, k.aot
    specs = []
    check = wanted is None or "correctness" in wanted
    for codec in CODECS:
        c4 = codec[1:]
        for (N, K, group) in CHECK_SHAPES if check else ():
            for dt in ("fp16", "bf16"):
                for M, cfg in check_configs(td).items():
                    specs.append(aot.mm_spec(c4, dt, N, K, group, M, cfg))
            specs.append(aot.KernelSpec("dequant", c4, "fp32", N, K, group))
        for K, N in shapes.values() if codec in GEMM_CODECS else ():
            specs.append(aot.KernelSpec("dequant", c4, "fp32", N, K, GROUP))
        for T in (1, 3, 40) if check else ():
            bm = k.routing.grouped_block_m(2 * T, 6)
            specs.append(aot.mm_spec(c4, "bf16", 160, 256, 128, 2 * T, td.GROUPED_CONFIGS[bm][0], True, bm, 2))
    for codec in GEMM_CODECS if wanted is None or "gemm" in wanted else ():
        c4 = codec[1:]
        for K, N in shapes.values():
            for M in ms:
                for cfg in td.plain_tuner(M).configs:
                    if 1 <= cfg.kwargs["BLOCK_K"] // td.geometry(*c4[:3]).SP2 <= 256:
                        specs.append(aot.mm_spec(c4, "fp16", N, K, GROUP, M, cfg))
    moes = {**MOES, "graph-check": (8, 2, 1024, 512)}
    ts = (1, 2, 4, 8, 16, 64, 512)  # a superset of --quick's
    if wanted is not None and not {"grouped", "graph_capture"} & wanted:
        # the end-to-end model's layers only (int4, Mixtral width, decode and a 32-token prompt)
        moes, ts = ({"mixtral-8e-top2": MOES["mixtral-8e-top2"]}, (1, 32)) if "e2e" in wanted else ({}, ())
    for name, (E, top, H, I) in moes.items():
        for codec in (CODECS[1], CODECS[6]):
            c4 = codec[1:]
            for T in ts:
                R = T * top
                bms = {k.routing.grouped_block_m(R, E), *((1, 16) if 2 <= T <= 16 else ())}  # the comparison too
                for bm in bms:
                    for cfg in td.GROUPED_CONFIGS[bm]:
                        for (N, K, xdiv) in ((I, H, top), (H, I, 1)):
                            specs.append(aot.mm_spec(c4, "bf16", N, K, GROUP, R, cfg, True, bm, xdiv))
    t0 = time.time()
    distinct = len({aot.specialization_key(s) for s in set(specs)})
    errors = aot.precompile(specs, arch, jobs)
    return {"launches": len(set(specs)), "specializations": distinct, "seconds": round(time.time() - t0, 1),
            "errors": errors[:20]}


def correctness(k, budget: Budget) -> list[dict]:
    td = k.td
    rows = []
    for codec in CODECS:
        for (N, K, group) in ((333, 768, 128), (1024, 2048, 128), (96, 160, 32)):
            t, ref = exact_packed(k, codec, 1, N, K, group)
            a = args_of(codec, t, K)
            deq = td.dequantize(*a, **zf(codec))
            rows.append({"check": "dequant", "codec": codec[0], "N": N, "K": K, "ok": bool(torch.equal(deq, ref))})
            for dtype, tol in ((torch.float16, TOL["fp16"]), (torch.bfloat16, TOL["bf16"])):
                for M, cfg in check_configs(td).items():
                    x = torch.randn(M, K, device="cuda").to(dtype)
                    want = x.float() @ ref[0].T
                    got = td.packed_matmul(x, *a, config=_cfg(cfg), **zf(codec)).float()
                    err = float((got - want).abs().max() / want.abs().max())
                    rows.append({"check": "matmul", "codec": codec[0], "dtype": str(dtype)[6:], "M": M, "N": N,
                                 "K": K, "group": group, "config": str(cfg), "rel_err": err, "tol": tol,
                                 "ok": err <= tol})
        # grouped, uneven routing with an unused expert
        E, top = 6, 2
        t, ref = exact_packed(k, codec, E, 160, 256, 128, seed=3)
        for T in (1, 3, 40):
            g = torch.Generator().manual_seed(T)
            idx = torch.stack([torch.randperm(E - 1, generator=g)[:top] for _ in range(T)])
            idx[idx == 2] = E - 1
            idx = idx.cuda()
            x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
            route = td.moe_align(idx.reshape(-1), E)
            cfg = {k_: v for k_, v in _cfg(td.GROUPED_CONFIGS[route.block_m][0]).items() if k_ != "BLOCK_M"}
            got = td.grouped_matmul(x, route, top, *args_of(codec, t, 256), config=cfg, **zf(codec)).float()
            flat = idx.reshape(-1)
            want = torch.einsum("rk,rnk->rn", x.float()[torch.arange(T * top, device="cuda") // top], ref[flat])
            err = float((got - want).abs().max() / want.abs().max())
            rows.append({"check": "grouped", "codec": codec[0], "T": T, "block_m": route.block_m, "rel_err": err,
                         "ok": err <= TOL["bf16"]})
    for R, E, bm in ((1, 8, 16), (37, 8, 16), (4096, 128, 16), (1024, 256, 64)):
        ex = torch.randint(0, E, (R,), device="cuda")
        a = td.moe_align(ex, E, block_m=bm)
        b = k.routing.torch_route(ex, E, block_m=bm)
        rows.append({"check": "moe_align", "R": R, "E": E, "block_m": bm,
                     "ok": bool(torch.equal(a.sorted_rows.long(), b.sorted_rows)
                                and torch.equal(a.block_expert.long(), b.block_expert))})
    return rows


def gemm_timings(k, budget: Budget, bandwidth: float, shapes, ms) -> list[dict]:
    td = k.td
    rows = []
    for sname, (K, N) in shapes.items():
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        wbf = w16.to(torch.bfloat16)
        packed = {c[0]: random_packed(c, 1, N, K, "cuda") for c in GEMM_CODECS}
        dense = {c[0]: td.dequantize(*args_of(c, packed[c[0]], K), **zf(c))[0] for c in GEMM_CODECS}  # exact
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            base = {"shape": sname, "K": K, "N": N, "M": M}
            dense_bytes = 2 * (N * K + M * K + M * N)
            cub = {"fp16_graph": time_graph(lambda: x @ w16.T), "fp16_eager": time_eager(lambda: x @ w16.T),
                   "bf16_graph": time_graph(lambda: xb @ wbf.T)}
            rows.append({**base, "kernel": "cublas", **cub, "bandwidth_limit": dense_bytes / bandwidth / 1e9})
            for codec in GEMM_CODECS:
                if not budget.ok(120):
                    rows.append({**base, "codec": codec[0], "skipped": "time budget"})
                    continue
                t = packed[codec[0]]
                a = args_of(codec, t, K)
                fn = lambda: td.packed_matmul(x, *a, **zf(codec))  # noqa: E731
                got = fn().float()  # autotunes (synchronises) before any graph capture
                want = x.float() @ dense[codec[0]].T
                err = float((got - want).abs().max() / want.abs().max())
                g, e = time_graph(fn), time_eager(fn)
                limit = (packed_bytes(t) + 2 * (M * K + M * N)) / bandwidth / 1e9
                best = td.plain_tuner(M).best_config
                rows.append({**base, "kernel": "packed", "codec": codec[0], "graph": g, "eager": e,
                             "rel_err": err, "ok": err <= TOL["fp16"],
                             "bandwidth_limit": limit, "speedup_vs_fp16": cub["fp16_graph"] / g,
                             "speedup_vs_fp16_eager": cub["fp16_eager"] / e, "of_bandwidth": limit / g,
                             "config": str(best)})
            print(f"  {sname} M={M}: " + ", ".join(f"{r['codec']} {r['speedup_vs_fp16']:.2f}x" for r in rows
                                                   if r.get("shape") == sname and r.get("M") == M and "graph" in r),
                  flush=True)
        del w16, wbf, packed, dense
    return rows


def dict_timings(k, budget: Budget, bandwidth: float) -> list[dict]:
    """The fused ternary-dict decoder (QMoE's code; 88.5 % zeros, two fp16 scales per row) against the base-3
    kernel (symmetric, one scale per row) and cuBLAS bf16, Mixtral-8x7B expert shapes, batch 1 (CUDA graphs);
    also its error against the torch reference."""
    rows = []
    for sname, (K, N) in (("mixtral-w1", (4096, 14336)), ("mixtral-w2", (14336, 4096))):
        if not budget.ok(60):
            rows.append({"shape": sname, "skipped": "time budget"})
            continue
        g = torch.Generator().manual_seed(0)
        u = torch.rand(N, K, generator=g)
        t = torch.where(u < 0.885, 0, torch.where(u < 0.9425, -1, 1))
        t0 = time.time()
        header, cw, ri = k.dictcode.pick_and_encode(t)
        enc_s = time.time() - t0
        dec = k.dictcode.dict_table(header).cuda()
        cw, ri = cw.cuda(), ri.cuda()
        s = (torch.rand(1, N, 1, generator=g) * 0.02 + 0.005).half().cuda()
        sn = (torch.rand(1, N, 1, generator=g) * 0.02 + 0.005).half().cuda()
        trits = k.bitpack.pack_trits(t)[None].cuda()
        wbf = k.reference.dict_dequantize(cw, ri, dec, s, sn, K, torch.bfloat16)[0]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        fn_dict = lambda: k.tdict.dict_matmul(x, cw, ri, dec, s, sn, K)  # noqa: E731
        fn_b3 = lambda: k.td.packed_matmul(x, 8, True, True, trits, s, None, K)  # noqa: E731
        want = x.float() @ wbf.float().T
        got = fn_dict()
        err = float((got - want).abs().max() / want.abs().max())
        fn_b3()  # autotunes before capture
        tg = {"dict": time_graph(fn_dict), "b3": time_graph(fn_b3), "bf16": time_graph(lambda: x @ wbf.T)}
        dict_bytes = cw.numel() * 2 + ri.numel() * 4 + 2 * 2 * N
        rows.append({"shape": sname, "K": K, "N": N, "M": 1, "encode_seconds": round(enc_s, 1),
                     "dict_bits_per_weight": 8 * (dict_bytes + 40) / (N * K),
                     "b3_bits_per_weight": 8 * (trits.numel() + 2 * N) / (N * K), "rel_err": err,
                     "ok": err <= TOL["bf16"], **{f"{n}_graph": v for n, v in tg.items()},
                     "dict_vs_b3": tg["dict"] / tg["b3"], "dict_vs_bf16": tg["dict"] / tg["bf16"],
                     "dict_bandwidth_limit": dict_bytes / bandwidth / 1e9})
        print(f"  ternary-dict {sname}: {tg['dict'] * 1e6:.1f} us, base 3 {tg['b3'] * 1e6:.1f} us, "
              f"bf16 {tg['bf16'] * 1e6:.1f} us, err {err:.1e}", flush=True)
    return rows


def _packed_layer(k, E, H, I, codec, seed=0):
    return {p: random_packed(codec, E, *shape, "cuda", seed=i)
            for i, (p, shape) in enumerate((("gate", (I, H)), ("up", (I, H)), ("down", (H, I))))}


def packed_moe(k, layer, codec, x, idx, w, backend=None, block_m=None):
    """The packed MoE layer exactly as ``PackedExperts.forward`` computes it (one routing, three grouped
    products, SiLU GLU, weighted top-k sum). ``block_m``: force the Triton routing's block size (1: a GEMV per
    row, no sorting) instead of `grouped_block_m`'s choice."""
    d = k.dispatch
    T, top = idx.shape
    E = layer["gate"]["data"].shape[0]
    H, I = x.shape[1], layer["gate"]["data"].shape[1]
    if block_m is None:
        route = d.moe_route(idx.reshape(-1), E, backend)
    else:
        route = k.td.moe_align(idx.reshape(-1), E, block_m=block_m)
    gate = d.grouped_linear(x, route, *args_of(codec, layer["gate"], H), backend=backend, x_div=top)
    up = d.grouped_linear(x, route, *args_of(codec, layer["up"], H), backend=backend, x_div=top)
    h = torch.nn.functional.silu(gate) * up
    y = d.grouped_linear(h, route, *args_of(codec, layer["down"], I), backend=backend, x_div=1)
    return (y.view(T, top, -1) * w[..., None].to(y.dtype)).sum(1)


def loop_moe(x, idx, w, wg, wu, wd):
    """bf16 per-expert loop (transformers' eager experts): one small matmul chain per active expert."""
    out = torch.zeros_like(x)
    flat = idx.reshape(-1)
    top = idx.shape[1]
    for e in torch.unique(flat).tolist():
        pos = (flat == e).nonzero().squeeze(-1)
        tok = pos // top
        h = torch.nn.functional.silu(x[tok] @ wg[e].T) * (x[tok] @ wu[e].T)
        out.index_add_(0, tok, (h @ wd[e].T) * w.reshape(-1)[pos, None].to(x.dtype))
    return out


def grouped_mm_moe(x, idx, w, wgu_t, wd_t):
    """``torch._grouped_mm`` (bf16): rows sorted by expert, offsets from a device-side cumulative count."""
    T, top = idx.shape
    E = wgu_t.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat,
                                                                                                     dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // top]
    gu = torch._grouped_mm(xs, wgu_t, offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(g) * u, wd_t, offs=offs)
    out = torch.empty_like(y)
    out[order] = y
    return (out.view(T, top, -1) * w[..., None].to(y.dtype)).sum(1)


def grouped_timings(k, budget: Budget, quick: bool) -> list[dict]:
    rows = []
    has_gmm = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0)
    for name, (E, top, H, I) in MOES.items():
        wg = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * 0.02
        wu = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * 0.02
        wd = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
        # [E, K, N] operands as transposed views of the [E, N, K] weights (column-major, as _grouped_mm wants)
        wgu_t = torch.cat([wg, wu], 1).transpose(1, 2) if has_gmm else None
        wd_t = wd.transpose(1, 2) if has_gmm else None
        for codec in ((CODECS[1], CODECS[6]) if not quick else (CODECS[1],)):
            layer = _packed_layer(k, E, H, I, codec)
            for T in ((1, 2, 4, 8, 16, 64, 512) if not quick else (1, 2, 4, 16, 512)):
                if not budget.ok(60):
                    rows.append({"moe": name, "codec": codec[0], "T": T, "skipped": "time budget"})
                    continue
                g = torch.Generator(device="cuda").manual_seed(T)
                idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:top] for _ in range(T)])
                w = torch.softmax(torch.randn(T, top, device="cuda", generator=g), -1)
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                fn = lambda: packed_moe(k, layer, codec, x, idx, w)  # noqa: E731
                fn()
                r = {"moe": name, "codec": codec[0], "T": T,
                     "block_m": k.routing.grouped_block_m(T * top, E) if k.dispatch.triton_usable(x.device)[0] else None,
                     "packed_graph": time_graph(fn), "packed_eager": time_eager(fn),
                     "bf16_loop_eager": time_eager(lambda: loop_moe(x, idx, w, wg, wu, wd), reps=5)}
                if has_gmm:
                    try:
                        gm = lambda: grouped_mm_moe(x, idx, w, wgu_t, wd_t)  # noqa: E731
                        gm()
                        r["bf16_grouped_mm_graph"] = time_graph(gm)
                        r["bf16_grouped_mm_eager"] = time_eager(gm)
                    except Exception as e:  # API differences between torch versions
                        r["bf16_grouped_mm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if r["block_m"] is not None and 2 <= T <= 16:
                    # the other path (per-row GEMV against sorted 16-row tensor-core blocks): which is faster at a
                    # few rows per expert checks `routing.grouped_block_m`'s threshold (TC_BLOCK_IN_ROWS)
                    alt = 16 if r["block_m"] == 1 else 1
                    g1 = lambda: packed_moe(k, layer, codec, x, idx, w, block_m=alt)  # noqa: E731
                    g1()
                    r["alt_block_m"], r["alt_graph"], r["alt_eager"] = alt, time_graph(g1), time_eager(g1)
                r["speedup_vs_loop_eager"] = r["bf16_loop_eager"] / r["packed_eager"]
                rows.append(r)
                print(f"  {name} {codec[0]} T={T}: packed {r['packed_eager'] * 1e6:.0f} us eager / "
                      f"{r['packed_graph'] * 1e6:.0f} us graph (block_m {r['block_m']}), bf16 loop "
                      f"{r['bf16_loop_eager'] * 1e6:.0f} us" + (f", block_m {r['alt_block_m']}: {r['alt_graph'] * 1e6:.0f} us graph"
                                                             if 'alt_graph' in r else ""), flush=True)
            del layer
        del wg, wu, wd, wgu_t, wd_t
    return rows


def graph_capture(k) -> list[dict]:
    """Capture the packed MoE layer in a CUDA graph after one warm-up call; replay on new inputs."""
    rows = []
    E, top, H, I = 8, 2, 1024, 512
    codec = CODECS[6]
    layer = _packed_layer(k, E, H, I, codec)
    for backend in ("triton", "torch"):
        for T in (1, 16):
            r = {"backend": backend, "T": T}
            try:
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                idx = torch.stack([torch.randperm(E, device="cuda")[:top] for _ in range(T)])
                w = torch.softmax(torch.randn(T, top, device="cuda"), -1)
                packed_moe(k, layer, codec, x, idx, w, backend)  # warm-up: autotune, allocator
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = packed_moe(k, layer, codec, x, idx, w, backend)
                for seed in range(3):
                    gen = torch.Generator(device="cuda").manual_seed(seed)
                    x.copy_(torch.randn(T, H, device="cuda", generator=gen))
                    idx.copy_(torch.stack([torch.randperm(E, device="cuda", generator=gen)[:top] for _ in range(T)]))
                    w.copy_(torch.softmax(torch.randn(T, top, device="cuda", generator=gen), -1))
                    g.replay()
                    want = packed_moe(k, layer, codec, x, idx, w, backend)
                    err = float((y.float() - want.float()).abs().max() / want.float().abs().max())
                    r.setdefault("rel_err", []).append(err)
                r["ok"] = max(r["rel_err"]) <= 1e-2
            except Exception as e:
                r.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            rows.append(r)
    return rows


def end_to_end(k, budget: Budget, layers: int, new_tokens: int) -> dict:
    """Decode tokens/s of a synthetic Mixtral-shaped model, bf16 vs experts packed int4 (PackedExperts)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from moecompress.formats.spec import ModuleSpec
        from moecompress.nn.packed import PackedExperts
        from moecompress.types import Activation
    except Exception as e:
        return {"skipped": f"cannot import transformers / moecompress.nn.packed: {type(e).__name__}: {e}"}
    if not budget.ok(45):
        return {"skipped": "time budget"}
    cfg = AutoConfig.for_model("mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                               num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    prompt = torch.randint(0, 32000, (1, 32), device="cuda")

    def decode_tps():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            t0 = time.time()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            return new_tokens / (time.time() - t0)

    out = {"layers": layers, "new_tokens": new_tokens, "bf16_tokens_per_s": decode_tps()}
    with torch.no_grad():
        ref_logits = model(prompt).logits[0, -1].float()
    swapped, expert_bytes, packed_b = 0, 0, 0
    for name, mod in list(model.named_modules()):
        if not (hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj")) or isinstance(mod, PackedExperts):
            continue
        gu, dn = mod.gate_up_proj.data, mod.down_proj.data  # [E, 2I, H], [E, H, I]
        E, I2, H = gu.shape
        if dn.shape != (E, H, I2 // 2):
            return {**out, "skipped": f"unexpected expert layout {tuple(gu.shape)} / {tuple(dn.shape)}"}
        I = I2 // 2
        spec = ModuleSpec.experts((E, I, H), {"gate": "int4", "up": "int4", "down": "int4"}, GROUP, True, False,
                                  Activation("glu", "silu"))
        with torch.device("cuda"):
            pe = PackedExperts(spec)
        for proj, wt in (("gate", gu[:, :I]), ("up", gu[:, I:]), ("down", dn)):
            for e in range(E):  # one expert at a time: small temporaries
                q, s = _rtn_int4(wt[e].float())
                getattr(pe, f"{proj}_packed")[e].copy_(pack_int4(q))
                getattr(pe, f"{proj}_scale")[e].copy_(s.half())
        expert_bytes += (gu.numel() + dn.numel()) * 2
        packed_b += sum(b.numel() * b.element_size() for b in pe.buffers())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, pe)
        swapped += 1
    if not swapped:
        return {**out, "skipped": "no fused experts module (gate_up_proj/down_proj) found in this transformers"}
    torch.cuda.empty_cache()
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].float()
    out.update(packed_tokens_per_s=decode_tps(), experts_swapped=swapped, expert_bytes_bf16=expert_bytes,
               expert_bytes_packed=packed_b,
               logits_rel_err=float((logits - ref_logits).abs().max() / ref_logits.abs().max()))
    out["speedup"] = out["packed_tokens_per_s"] / out["bf16_tokens_per_s"]
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[.., C]`` codes 0..15 -> ``[.., C/8]`` int32, LSB-first (`moecompress.formats.bitpack.pack_bits`'s
    layout for 4 bits), on the codes' device."""
    *lead, C = q.shape
    shifts = 4 * torch.arange(8, device=q.device, dtype=torch.int64)
    v = (q.to(torch.int64).view(*lead, C // 8, 8) << shifts).sum(-1)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def _rtn_int4(w):
    """Round-to-nearest symmetric int4 per group of 128: codes [.., C] in 0..15 and scales [.., G]."""
    *lead, C = w.shape
    wg = w.reshape(*lead, C // GROUP, GROUP)
    s = (wg.abs().amax(-1) / 7).clamp(min=1e-8).half().float()
    q = torch.clamp(torch.round(wg / s[..., None]), -8, 7) + 8
    return q.reshape(*lead, C).to(torch.int64), s


# ------------------------------------------------------------------------------------------------- targets
def targets(res: dict) -> dict:
    t = {}
    gemm = [r for r in res.get("gemm", []) if r.get("kernel") == "packed"]

    def find(codec, shape, M):
        return next((r for r in gemm if r["codec"] == codec and r["shape"] == shape and r["M"] == M), None)

    r = find("int4", "mixtral-w1", 1)
    t["decode_int4_4096x14336_M1_>=2.5x_fp16"] = None if r is None else {
        "speedup": r["speedup_vs_fp16"], "pass": r["speedup_vs_fp16"] >= 2.5}
    for c in ("int2", "int2-fz", "ternary2", "ternary-b3"):
        r = find(c, "mixtral-w1", 1)
        t[f"decode_{c}_4096x14336_M1_>=4x_fp16"] = None if r is None else {
            "speedup": r["speedup_vs_fp16"], "pass": r["speedup_vs_fp16"] >= 4.0}
    for c in [c[0] for c in CODECS]:
        r = find(c, "mixtral-w1", 512)
        if r is not None:
            t[f"prefill_{c}_M512_within_1.3x_cublas"] = {"ratio": 1 / r["speedup_vs_fp16"],
                                                         "pass": r["speedup_vs_fp16"] >= 1 / 1.3}
    g = [r for r in res.get("grouped", []) if r.get("moe") == "mixtral-8e-top2" and r.get("codec") == "int4"
         and r.get("T", 99) <= 16 and "speedup_vs_loop_eager" in r]
    if g:
        t["grouped_8e_top2_T1-16_>=2x_bf16_loop"] = {"speedups": {r["T"]: r["speedup_vs_loop_eager"] for r in g},
                                                     "pass": all(r["speedup_vs_loop_eager"] >= 2 for r in g)}
    for r in res.get("ternary_dict", []) if isinstance(res.get("ternary_dict"), list) else []:
        if "dict_vs_b3" in r:
            t[f"ternary_dict_{r['shape']}_M1_within_1.5x_base3"] = {"ratio": r["dict_vs_b3"],
                                                                   "pass": r["dict_vs_b3"] <= 1.5 and r["ok"]}
    if res.get("graph_capture"):
        t["cuda_graph_capture"] = {"pass": all(r.get("ok") for r in res["graph_capture"])}
    if res.get("correctness"):
        rows = res["correctness"] if isinstance(res["correctness"], list) else []
        bad = [r for r in rows if isinstance(r, dict) and r.get("ok") is False]
        bad += [r for r in gemm if r.get("ok") is False]  # the autotuned configurations, at the timed shapes
        checked = sum(1 for r in rows if isinstance(r, dict) and "ok" in r)
        # a section that failed or checked nothing passes nothing
        t["correctness"] = {"pass": (not bad) if checked else None, "checked": checked, "failures": bad[:10]}
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth, GB/s (default: by GPU name)")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds; later items are skipped past it")
    ap.add_argument("--quick", action="store_true", help="Mixtral shapes, M = 1, 16, 512, int4 grouped only")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel precompile processes")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--e2e-layers", type=int, default=4)
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--sections", default="correctness,gemm,grouped,graph_capture,ternary_dict,e2e",
                    help="comma-separated sections to run (precompilation covers only these)")
    ap.add_argument("--codecs", default=None, help="comma-separated codec names for the gemm section (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA GPU here; this measures GPU kernels (CPU checks: pytest tests/kernels)")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels_gpu: unset TRITON_INTERPRET (the interpreter measures Python, not kernels)")
        return 2
    budget = Budget(args.budget)
    import triton

    wanted = set(args.sections.split(","))
    if args.codecs:
        keep = set(args.codecs.split(","))
        GEMM_CODECS[:] = [c for c in CODECS if c[0] in keep]
    k = import_kernels()
    name = torch.cuda.get_device_name()
    cc = torch.cuda.get_device_capability()
    bw = args.bandwidth or next((v for key, v in BANDWIDTH.items() if key in name), 2000.0)
    shapes = {n: s for n, s in SHAPES.items() if not args.quick or n.startswith("mixtral")}
    ms = (1, 16, 512) if args.quick else MS
    res = {"device": name, "capability": list(cc), "bandwidth_GBps": bw, "torch": torch.__version__,
           "triton": triton.__version__, "quick": args.quick, "backend_usable": k.dispatch.triton_usable(
               torch.device("cuda"))}
    print(json.dumps(res), flush=True)
    if not args.no_precompile:
        try:
            res["precompile"] = precompile(k, cc[0] * 10 + cc[1], args.jobs, args.quick, shapes, ms, wanted)
        except Exception as e:  # e.g. a triton without native_specialize_impl: the JIT compiles on demand
            res["precompile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("precompile:", json.dumps(res["precompile"])[:400], flush=True)
    sections = [("correctness", lambda: correctness(k, budget)),
                ("gemm", lambda: gemm_timings(k, budget, bw, shapes, ms)),
                ("grouped", lambda: grouped_timings(k, budget, args.quick)),
                ("graph_capture", lambda: graph_capture(k)),
                ("ternary_dict", lambda: dict_timings(k, budget, bw))]
    if not args.skip_e2e:
        sections.append(("e2e", lambda: end_to_end(k, budget, args.e2e_layers, args.e2e_tokens)))
    order = args.sections.split(",")
    sections = sorted((sf for sf in sections if sf[0] in wanted), key=lambda sf: order.index(sf[0]))
    for sec, fn in sections:
        t0 = time.time()
        print(f"[{sec}] ...", flush=True)
        try:
            res[sec] = fn()
        except Exception as e:  # keep the other sections' results
            import traceback

            res[sec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res.setdefault("section_seconds", {})[sec] = round(time.time() - t0, 1)
        if args.out:  # partial results survive a later failure
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**res, "targets": targets(res)}, indent=1, default=str))
    res["targets"] = targets(res)
    res["seconds"] = round(time.time() - budget.t0, 1)
    print(json.dumps(res["targets"], indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    ok = all(v.get("pass", True) for v in res["targets"].values() if isinstance(v, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
