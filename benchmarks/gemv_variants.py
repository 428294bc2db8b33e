#!/usr/bin/env python
"""Decode (M = 1) packed GEMV designs side by side on a GPU: the product kernel (`_packed_mm_kernel`'s GEMV) and cuBLAS
against `_gemv_rows` below (codes read in place with `triton_common._window_code`, rows addressed through an
unspecialized stride so each thread holds one word column of several rows), over a sweep of tiles, plus the
Python launch overhead (autotuned call, fixed configuration, bare launch; ``--profile``: cProfile of the eager
call). Int codecs with power-of-two codes per word, symmetric, group 128. Stop 33 measured this on an H200 and
moved `_gemv_rows`' loop into the product kernel.

    python benchmarks/gemv_variants.py --out benchmarks/results/gemv_variants.json

Under ``TRITON_INTERPRET=1`` ``--check`` runs `_gemv_rows`' values against the torch reference on the CPU
(small shapes); without a GPU and without ``--check`` it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from moecompress.kernels.triton_common import _window_code  # noqa: E402  (the product's in-place code read)


@triton.jit(do_not_specialize=["W_ROW"])
def _gemv_rows(x_ptr, data_ptr, scale_ptr, out_ptr, N, K, W, G, W_ROW, GROUP: tl.constexpr, BITS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The product's GEMV loop with (1) rows addressed through ``W_ROW`` (= W, not specialized: the compiler
    cannot prove 16-byte row starts, so it does not vectorize along the words and gives each thread several rows
    of one word column: one activation load serves several rows) and (2) codes taken without a shift where they
    fit under the float's 23 mantissa bits: ``(w & (mask << b*j)) | bits(2^23)`` is ``2^23 + q * 2^(b*j)``
    exactly; the activation is pre-scaled by ``2^(-b*j)`` (exact) and ``2^23 + z * 2^(b*j)`` subtracted in one
    add. Slots past the 23-bit window use the word shifted once."""
    SLOTS: tl.constexpr = 32 // BITS
    BU: tl.constexpr = BLOCK_K // SLOTS
    LOW: tl.constexpr = (23 - BITS) // BITS + 1  # slots 0 .. LOW-1 fit under bit 23 unshifted
    ZC: tl.constexpr = 2 ** (BITS - 1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None]
    n64 = offs_n.to(tl.int64)[:, None]
    row_off = n64 * W_ROW
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT_K)
    t0 = tl.program_id(1) * per
    t1 = tl.minimum(t0 + per, tiles)
    acc = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
    for t in range(t0, t1):
        u = t * BU + tl.arange(0, BU)[None, :]
        w = tl.load(data_ptr + row_off + u, mask=n_ok & (u < W), other=0)
        kb = u * SLOTS
        p = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
        for j in tl.static_range(SLOTS):
            f, xs = _window_code(w, j, BITS, LOW, ZC)
            xj = tl.load(x_ptr + kb + j, mask=kb + j < K, other=0.0).to(tl.float32) * xs
            p += f * xj
        s = tl.load(scale_ptr + n64 * G + (t * BLOCK_K) // GROUP, mask=n_ok, other=0.0).to(tl.float32)
        acc += p * s
    r = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, r.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        tl.atomic_add(out_ptr + offs_n, r.to(out_ptr.dtype.element_ty), mask=offs_n < N, sem="relaxed")


def rows_gemv(x, data, scale, K, bits, group, BLOCK_N, BLOCK_K, SPLIT_K, num_warps=4, out=None):
    """`_gemv_rows` (tiles of at most one group: ``group % BLOCK_K == 0``)."""
    N, W = data.shape[-2:]
    G = scale.shape[-1]
    if out is None:
        out = torch.zeros(1, N, dtype=x.dtype, device=x.device)
    elif SPLIT_K > 1:
        out.zero_()
    _gemv_rows[(triton.cdiv(N, BLOCK_N), SPLIT_K)](x, data, scale, out, N, K, W, G, W, GROUP=group, BITS=bits,
                                                   BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K,
                                                   num_warps=num_warps)
    return out


def _reference(codes, scale, bits, group):
    """Float32 weights ``(q - 2^(bits-1)) * s`` [N, K]."""
    s = scale.float().repeat_interleave(group, dim=-1)[..., :codes.shape[-1]]
    return (codes.float() - 2 ** (bits - 1)) * s


def _pack(codes, bits):
    from moecompress.formats.bitpack import pack_bits

    return pack_bits(codes, bits)


def check(device: str) -> list[dict]:
    """Values of the tile kernel against the float reference (odd row counts, split K, several tiles)."""
    rows = []
    for bits in (4, 2, 8):
        for (N, K, group) in ((45, 512, 128), (64, 1024, 128)):
            g = torch.Generator().manual_seed(bits * 7 + N)
            codes = torch.randint(0, 2 ** bits, (N, K), generator=g)
            scale = (torch.rand(N, K // group, generator=g) * 0.02 + 0.005).half()
            data = _pack(codes, bits).to(device)
            x = torch.randn(1, K, generator=g).to(device)
            want = x.float() @ _reference(codes, scale, bits, group).to(device).T
            for (bn, bk, sk) in ((16, 128, 1), (32, 64, 2), (64, 128, 3)):
                got = rows_gemv(x, data, scale.to(device), K, bits, group, bn, bk, sk)
                err = float((got.float() - want).abs().max() / want.abs().max())
                rows.append({"kernel": "rows", "bits": bits, "N": N, "K": K, "tile": [bn, bk, sk], "rel_err": err,
                             "ok": err < 1e-4})
    return rows


def time_graph(fn, calls: int = 20, reps: int = 15) -> float:
    from kernels_gpu import time_graph as tg

    return tg(fn, calls, reps)


def time_eager(fn, calls: int = 20, reps: int = 10) -> float:
    from kernels_gpu import time_eager as te

    return te(fn, calls, reps)


SHAPES = {4: {"mixtral-w1": (4096, 14336), "mixtral-w2": (14336, 4096), "qwen3-w1": (2048, 768)},
          2: {"mixtral-w1": (4096, 14336)}}  # bits -> {name: (K, N)}
ROWS_TILES = [(bn, 128, sk, nw) for bn in (32, 64, 128) for sk in (1, 2) for nw in (4, 8)] + \
    [(64, 64, 1, 4), (128, 64, 1, 4)]  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps); BLOCK_K divides the group


def sweep(budget_s: float, out_path: str | None = None) -> dict:
    import kernels_gpu as kg

    k = kg.import_kernels()
    td = k.td
    t_end = time.time() + budget_s
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "rows": []}
    for bits, shapes in SHAPES.items():
        for sname, (K, N) in shapes.items():
            if time.time() > t_end:
                res["rows"].append({"bits": bits, "shape": sname, "skipped": "time budget"})
                continue
            g = torch.Generator().manual_seed(0)
            codes = torch.randint(0, 2 ** bits, (N, K), generator=g)
            scale = (torch.rand(N, K // 128, generator=g) * 0.02 + 0.005).half()
            data = _pack(codes, bits).cuda()
            sc = scale.cuda()
            w16 = _reference(codes, scale, bits, 128).half().cuda()
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            want = (x.float() @ w16.float().T)
            row = {"bits": bits, "shape": sname, "K": K, "N": N,
                   "cublas_fp16_graph": time_graph(lambda: x @ w16.T),
                   "cublas_fp16_eager": time_eager(lambda: x @ w16.T)}
            args = (bits, False, False, data[None], sc[None], None, K)
            prod = lambda: td.packed_matmul(x, *args)  # noqa: E731
            prod()
            best = td.plain_tuner(1).best_config
            fixed = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            row.update(product_graph=time_graph(prod), product_eager_autotuned=time_eager(prod),
                       product_eager_fixed=time_eager(lambda: td.packed_matmul(x, *args, config=fixed)),
                       product_config=str(best))
            out = torch.empty(1, N, dtype=torch.float16, device="cuda")
            tiles = []
            for (bn, bk, sk, nw) in ROWS_TILES:
                if time.time() > t_end:
                    break
                fn = lambda: rows_gemv(x, data, sc, K, bits, 128, bn, bk, sk, nw, out)  # noqa: E731
                try:
                    got = fn().float()
                    err = float((got - want).abs().max() / want.abs().max())
                    tiles.append({"tile": [bn, bk, sk, nw], "graph": time_graph(fn, reps=7), "rel_err": err})
                except Exception as e:  # resource limits of a tile
                    tiles.append({"tile": [bn, bk, sk, nw], "error": f"{type(e).__name__}: {str(e)[:120]}"})
            ok = [t for t in tiles if "graph" in t and t["rel_err"] < 5e-3]
            if ok:
                b = min(ok, key=lambda t: t["graph"])
                bn, bk, sk, nw = b["tile"]
                fn = lambda: rows_gemv(x, data, sc, K, bits, 128, bn, bk, sk, nw, out)  # noqa: E731
                row.update(rows_best=b, rows_best_eager_raw=time_eager(fn),
                           rows_vs_product=row["product_graph"] / b["graph"],
                           rows_vs_cublas=row["cublas_fp16_graph"] / b["graph"])
            row["product_vs_cublas"] = row["cublas_fp16_graph"] / row["product_graph"]
            row["tiles"] = sorted(tiles, key=lambda t: t.get("graph", 1e9))
            res["rows"].append(row)
            if out_path:  # partial results survive a timeout
                Path(out_path).write_text(json.dumps(res, indent=1, default=str))
            rb = row.get("rows_best") or {}
            print(f"int{bits} {sname}: cublas {row['cublas_fp16_graph'] * 1e6:.1f} us, product "
                  f"{row['product_graph'] * 1e6:.1f} us (eager {row['product_eager_autotuned'] * 1e6:.0f} autotuned / "
                  f"{row['product_eager_fixed'] * 1e6:.0f} fixed), rows best {rb.get('graph', float('nan')) * 1e6:.1f} us "
                  f"{rb.get('tile')} err {rb.get('rel_err')}, eager raw {row.get('rows_best_eager_raw', float('nan')) * 1e6:.0f}",
                  flush=True)
    return res


def host_profile(calls: int = 500) -> dict:
    """Where the Python time of an eager decode product goes (int4, Mixtral w1, fixed tile and autotuned):
    cProfile over ``calls`` back-to-back calls, the 15 largest entries by their own time."""
    import cProfile
    import io
    import pstats

    import kernels_gpu as kg

    td = kg.import_kernels().td
    K, N = 4096, 14336
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(0))
    data, sc = _pack(codes, 4).cuda()[None], torch.full((1, N, K // 128), 0.01, dtype=torch.float16).cuda()
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    args = (4, False, False, data, sc, None, K)
    td.packed_matmul(x, *args)
    best = td.plain_tuner(1).best_config
    fixed = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    out = {}
    for label, fn in (("autotuned", lambda: td.packed_matmul(x, *args)),
                      ("fixed", lambda: td.packed_matmul(x, *args, config=fixed))):
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        out[label] = {"us_per_call": (time.perf_counter() - t0) / calls * 1e6, "top": buf.getvalue()[-4000:]}
        print(f"host profile, {label}: {out[label]['us_per_call']:.1f} us per call\n{out[label]['top']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=80.0)
    ap.add_argument("--check", action="store_true", help="values only (the CPU under TRITON_INTERPRET=1 works)")
    ap.add_argument("--profile", action="store_true", help="also cProfile the eager decode product's host time")
    args = ap.parse_args()
    if args.check:
        rows = check("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("gemv_variants: needs a CUDA GPU (without the interpreter); --check runs the values anywhere")
        return 2
    res = sweep(args.budget, args.out)
    if args.profile:
        res["host_profile"] = host_profile()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
