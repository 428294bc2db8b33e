#!/usr/bin/env python
"""GPU measurements of the trellis code (`quantize --codec trellis`, QTIP's bitshift trellis; issue 12): what a
session lent a GPU has to answer before the code can become a default. About 1-2 minutes on an H100/H200.

    python benchmarks/trellis_gpu.py --out benchmarks/results/trellis_gpu.json [--budget 120]
    TRITON_INTERPRET=1 python benchmarks/trellis_gpu.py --device cpu   # a dry run of every code path, tiny shapes

Sections, in order (each records what it skipped once the time budget runs out):

1. ``product``: the fused decode + product (`triton_trellis.trellis_matmul`, trellis3) at Mixtral-8x7B expert
   shapes, M = 1 and 16 (CUDA graphs, median): against cuBLAS bf16 on the dense weight, the int3 kernel
   (`triton_dequant.packed_matmul`) and the bandwidth limit of its bytes; its error against
   `reference.trellis_dequantize` (bf16 activations; tolerance 1.5e-2 of the largest output, as kernels_gpu).
2. ``search``: the quantizer's tail-biting search (`triton_viterbi.tailbite_triton`, 10-bit states, 3 bits) for
   one GPTQ column at the row counts of Mixtral-8x7B's 8 experts (gate | up: 3,584 sequences of 64; down: 512),
   against the torch search (`algorithms.trellis.tailbite` on the same device) on the same costs: equal least
   costs, and the seconds of each.
3. ``gptq``: `gptq_quantize` of one MoE layer's expert weights ``[E, O, C]`` (default 8 x 14336 x 4096, the
   Mixtral w1 shape; random Hessians of 8,192 tokens) with the scalar int3 g128 grid against the trellis grid:
   seconds and the ratio (issue 12's target for the whole quantize: at most 2x plain GPTQ;
   `pipeline_gpu.py` measures the whole command on the demo).

Targets in ``targets``: product M=1 at least as fast as cuBLAS bf16 (the packed-checkpoint claim); the
Triton search equal to torch's; trellis GPTQ at most 2x scalar GPTQ. Imports torch, triton and moecompress's
kernel and algorithm modules only (not the package's ``__init__``: no transformers or pydantic needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from kernels_gpu import BANDWIDTH, TOL, Budget, import_kernels, random_packed, time_graph  # noqa: E402

BITS, L, SEQ, ZERO_FRAC = 3, 10, 64, 5
MIXTRAL = {"mixtral-w1": (4096, 14336), "mixtral-w2": (14336, 4096)}  # (K, N) of one expert's product
TINY = {"tiny-w1": (256, 512), "tiny-w2": (512, 256)}


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, dev: str, reps: int = 5) -> float:
    """Median wall seconds of ``fn()`` (synchronised; one warm-up call first)."""
    fn()
    sync(dev)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def random_trellis(E: int, N: int, K: int, dev: str, seed: int = 0) -> dict:
    """A trellis3 weight of random streams (every bit stream is a path of the bitshift trellis), a random row
    order, the shipped table and random group scales / zeros."""
    from moecompress.algorithms.trellis import trellis_table

    g = torch.Generator().manual_seed(seed)
    S = -(-N // SEQ)
    G = max(1, K // 128)
    return {"stream": torch.randint(-2 ** 31, 2 ** 31 - 1, (E, S, K, 2 * BITS), generator=g,
                                    dtype=torch.int32).to(dev),
            "order": torch.randperm(N, generator=g).to(torch.int32).to(dev),
            "table": trellis_table(L, BITS).to(dev),
            "scale": (torch.rand(E, N, G, generator=g) * 0.002 + 0.001).half().to(dev),
            "zero": torch.randint(96, 160, (E, N, G), generator=g, dtype=torch.int32).to(torch.uint8).to(dev)}


def product(k, budget: Budget, dev: str, shapes: dict, bandwidth: float) -> list[dict]:
    from moecompress.kernels import triton_trellis as tt

    timer = time_graph if dev.startswith("cuda") else (lambda fn: seconds(fn, dev, 1))
    rows = []
    for sname, (K, N) in shapes.items():
        t = random_trellis(1, N, K, dev)
        a = (t["stream"], t["order"], t["table"], t["scale"], t["zero"])
        wbf = k.reference.trellis_dequantize(*a, BITS, ZERO_FRAC, torch.float32)[0]
        want_w = wbf.clone()
        wbf = wbf.to(torch.bfloat16)
        i3 = random_packed(("int3", 3, False, False, False), 1, N, K, dev)
        trellis_bytes = sum(v.numel() * v.element_size() for v in t.values())
        for M in (1, 16):
            if not budget.ok(30):
                rows.append({"shape": sname, "M": M, "skipped": "time budget"})
                continue
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            fn = lambda: tt.trellis_matmul(x, *a, BITS, ZERO_FRAC)  # noqa: E731
            want = x.float() @ want_w.T
            err = float((fn() - want).abs().max() / want.abs().max())
            fn_i3 = lambda: k.td.packed_matmul(x, 3, False, False, i3["data"], i3["scale"], None, K)  # noqa: E731
            fn_i3()  # autotunes before any capture
            tg = {"trellis3": timer(fn), "int3": timer(fn_i3), "bf16": timer(lambda: x @ wbf.T)}
            limit = (trellis_bytes + 2 * (M * K + M * N)) / bandwidth / 1e9
            rows.append({"shape": sname, "K": K, "N": N, "M": M, "rel_err": err, "ok": err <= TOL["bf16"],
                         **{f"{n}_graph": v for n, v in tg.items()}, "bandwidth_limit": limit,
                         "trellis3_vs_bf16": tg["trellis3"] / tg["bf16"],
                         "trellis3_vs_int3": tg["trellis3"] / tg["int3"],
                         "of_bandwidth": limit / tg["trellis3"],
                         "bits_per_weight": 8 * trellis_bytes / (N * K)})
            print(f"  {sname} M={M}: trellis3 {tg['trellis3'] * 1e6:.1f} us, int3 {tg['int3'] * 1e6:.1f} us, "
                  f"bf16 {tg['bf16'] * 1e6:.1f} us, err {err:.1e}", flush=True)
    return rows


def search(budget: Budget, dev: str, counts: dict) -> list[dict]:
    from moecompress.algorithms.trellis import trellis_table, viterbi
    from moecompress.kernels import triton_viterbi as tv

    def tailbite(t, w, table, L, k):  # `trellis.tailbite`'s torch path (on a GPU it would ask the kernel)
        free = viterbi(t, w, table, L, k)
        return viterbi(t, w, table, L, k, tie=free[:, -1] & ((1 << (L - k)) - 1))

    table = trellis_table(L, BITS, dev)
    rows = []
    for name, n in counts.items():
        if not budget.ok(20):
            rows.append({"weight": name, "skipped": "time budget"})
            continue
        g = torch.Generator().manual_seed(n)
        t = (torch.randn(n, SEQ, generator=g) + 4).to(dev)
        w = (torch.rand(n, SEQ, generator=g) + 0.1).to(dev)
        got = tv.tailbite_triton(t, w, table, L, BITS)
        ref = tailbite(t, w, table, L, BITS)
        cost = [float((w * (t - table[s]) ** 2).sum()) for s in (got, ref)]
        lo = (1 << (L - BITS)) - 1
        path = bool(torch.equal(got[:, 1:] >> BITS, got[:, :-1] & lo)
                    and torch.equal(got[:, 0] >> BITS, got[:, -1] & lo))
        s_tr = seconds(lambda: tv.tailbite_triton(t, w, table, L, BITS), dev)
        s_torch = seconds(lambda: tailbite(t, w, table, L, BITS), dev, 2)
        rows.append({"weight": name, "sequences": n, "triton_seconds": s_tr, "torch_seconds": s_torch,
                     "triton_cost": cost[0], "torch_cost": cost[1], "paths": path,
                     "ok": path and cost[0] <= cost[1] * (1 + 1e-5) + 1e-6})
        print(f"  search {name} ({n} sequences): triton {s_tr * 1e3:.2f} ms, torch {s_torch * 1e3:.2f} ms, "
              f"costs {cost[0]:.4f} / {cost[1]:.4f}", flush=True)
    return rows


def gptq(budget: Budget, dev: str, E: int, O: int, C: int) -> dict:
    from moecompress.algorithms.gptq import gptq_quantize
    from moecompress.algorithms.quant_grid import QuantGrid
    from moecompress.algorithms.trellis import TrellisGrid

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(E, O, C, generator=g) * 0.02).to(dev)
    X = torch.randn(8192, C, generator=g).to(dev) * (torch.rand(C, generator=g).to(dev) + 0.5)
    H = (X.T @ X / X.shape[0]).expand(E, C, C).contiguous()
    del X
    out = {"E": E, "O": O, "C": C}
    for name, grid in (("scalar_int3", QuantGrid(3, 128)), ("trellis3", TrellisGrid(3, 128))):
        if not budget.ok(10):
            out[name] = "skipped: time budget"
            continue
        sync(dev)
        t0 = time.perf_counter()
        res = gptq_quantize(W, H, grid)
        sync(dev)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        D = (W - res.weight.to(W.dtype))
        out[f"{name}_error"] = float((torch.bmm(D, H) * D).sum())
        print(f"  gptq {name}: {out[f'{name}_seconds']:.2f} s, error {out[f'{name}_error']:.4e}", flush=True)
        del res, D
    if "trellis3_seconds" in out and "scalar_int3_seconds" in out:
        out["trellis_over_scalar"] = out["trellis3_seconds"] / out["scalar_int3_seconds"]
    return out


def targets(res: dict) -> dict:
    t = {}
    for r in res.get("product", []) if isinstance(res.get("product"), list) else []:
        if r.get("M") == 1 and "trellis3_vs_bf16" in r:
            t[f"trellis3_{r['shape']}_M1_<=1x_bf16"] = {"ratio": r["trellis3_vs_bf16"],
                                                        "pass": r["trellis3_vs_bf16"] <= 1.0 and r["ok"]}
    s = [r for r in res.get("search", []) if isinstance(r, dict) and "ok" in r] \
        if isinstance(res.get("search"), list) else []
    if s:
        t["search_equals_torch"] = {"pass": all(r["ok"] for r in s)}
    g = res.get("gptq")
    if isinstance(g, dict) and "trellis_over_scalar" in g:
        t["trellis_gptq_<=2x_scalar"] = {"ratio": g["trellis_over_scalar"], "pass": g["trellis_over_scalar"] <= 2}
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (tiny shapes, a dry run)")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds; later items are skipped past it")
    ap.add_argument("--gptq-shape", default="8,14336,4096", help="E,O,C of the gptq section")
    ap.add_argument("--sections", default="product,search,gptq")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("trellis_gpu: no CUDA GPU here (a dry run: TRITON_INTERPRET=1 ... --device cpu)")
        return 2
    if gpu == (os.environ.get("TRITON_INTERPRET") == "1"):
        print("trellis_gpu: TRITON_INTERPRET=1 is for --device cpu only (the interpreter measures Python)")
        return 2
    budget = Budget(args.budget)
    k = import_kernels()
    name = torch.cuda.get_device_name() if gpu else "cpu (interpreter: timings meaningless)"
    bw = next((v for key, v in BANDWIDTH.items() if key in name), 2000.0)
    shapes = MIXTRAL if gpu else TINY
    counts = {"gate_up (8 x 28672 rows)": 3584, "down (8 x 4096 rows)": 512} if gpu else {"tiny": 6}
    E, O, C = (int(v) for v in args.gptq_shape.split(",")) if gpu else (2, 128, 128)
    res = {"device": name, "bandwidth_GBps": bw, "torch": torch.__version__}
    sections = {"product": lambda: product(k, budget, args.device, shapes, bw),
                "search": lambda: search(budget, args.device, counts),
                "gptq": lambda: gptq(budget, args.device, E, O, C)}
    for sec in args.sections.split(","):
        print(f"[{sec}] ...", flush=True)
        t0 = time.time()
        try:
            res[sec] = sections[sec]()
        except Exception as e:  # keep the other sections' results
            import traceback

            res[sec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(res[sec]["traceback"], flush=True)
        res.setdefault("section_seconds", {})[sec] = round(time.time() - t0, 1)
        res["targets"] = targets(res)
        if args.out:  # partial results survive a later failure
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps(res["targets"], indent=1))
    failed = any(isinstance(res.get(s), dict) and "error" in res[s] for s in sections)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
