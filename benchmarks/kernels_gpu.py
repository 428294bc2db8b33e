#!/usr/bin/env python
"""GPU benchmark of the Triton kernels against an fp16 matmul and the memory-bandwidth roofline.

Needs a CUDA GPU (the Triton interpreter measures Python, not kernels). For each codec and shape it times
(CUDA events, median of 50 after 10 warm-ups):

* ``dequant``: packed -> fp32 dense, reported as GB/s of packed bytes read + dense bytes written;
* ``fused``: ``x [M, K] @ W^T`` dequantizing inside the kernel, for decode (M = 1..16) and prefill (M = 512),
  reported as tokens/s, effective GB/s of packed weight bytes, and the share of the roofline
  (``--bandwidth`` GB/s, default: the H100 SXM's 3350);
* ``grouped``: the MoE variant, T tokens x top-k over E experts in one launch;
* the same products with an fp16 ``torch.matmul`` on the dense weight, for comparison.

Usage (on a GPU)::

    python benchmarks/kernels_gpu.py --json benchmarks/results/kernels_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

CODECS = [("int8", True), ("int4", True), ("int3", False), ("int2", False), ("ternary2", True), ("ternary-b3", True)]
SHAPES = [(4096, 14336), (14336, 4096), (2048, 768), (768, 2048)]  # (K, N): Mixtral-8x7B and Qwen3-30B experts


def timed(fn, reps=50, warm=10) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", type=float, default=3350.0, help="memory bandwidth roofline, GB/s")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark measures GPU kernels (run the CPU tests with TRITON_INTERPRET=1)")
        return 2
    from moecompress.formats.codecs import CODECS as REG
    from moecompress.formats.codecs import encode
    from moecompress.kernels import triton_dequant as td

    dev = "cuda"
    rows = []
    for K, N in SHAPES:
        dense = torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02
        for codec, sym in CODECS:
            c = REG.get(codec)
            top = 2 if c.ternary else 2 ** c.bits - 1
            codes = torch.randint(0, top + 1, (1, N, K))
            scale = torch.rand(1, N, K // 128).half().float() * 0.01
            zero = torch.full_like(scale, 1.0 if c.ternary else float(2 ** (c.bits - 1)))
            t = {k: v.to(dev) for k, v in encode(codec, codes.to(torch.uint8), scale, zero, sym).items()}
            data = t["trits"] if c.base3 else t["packed"]
            packed_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if k != "shape")
            s = timed(lambda: td.dequantize(c.bits, c.ternary, c.base3, data, t["scale"], t.get("zero"), K))
            rows.append({"kind": "dequant", "codec": codec, "K": K, "N": N, "seconds": s,
                         "GB/s": (packed_bytes + 4 * N * K) / s / 1e9})
            for M in (1, 4, 16, 512):
                x = torch.randn(M, K, device=dev, dtype=torch.float16)
                s = timed(lambda: td.packed_matmul(x, c.bits, c.ternary, c.base3, data, t["scale"], t.get("zero"), K,
                                                   block=(16, 64, 64)))
                s16 = timed(lambda: x @ dense.T)
                rows.append({"kind": "fused", "codec": codec, "K": K, "N": N, "M": M, "seconds": s,
                             "fp16_seconds": s16, "speedup_vs_fp16": s16 / s, "tokens/s": M / s,
                             "weight_GB/s": packed_bytes / s / 1e9,
                             "roofline_share": packed_bytes / s / 1e9 / args.bandwidth})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
