#!/usr/bin/env python
"""Proxy: the experts' intermediates for the down projections' GPTAQ pairs computed in bf16 on the CPU (as a GPU
computes them for a bf16 model) instead of the CPU stream's float32, everything else the default.

On this CPU (AVX512-BF16) the intermediates are two-thirds of the down projections' pair products and run about
3x faster in bf16; the products themselves stay float32. This runs `quantize_demo.py`'s "all (default)" row of
``--scheme`` with `runtime.paired.expert_intermediate` computing in bf16 where the model computes in float32, and
writes a `quantize_demo.py` result (llm-compressor's rows read from ``--peer-from``) to compare window by window
with an earlier run of the default on the same model, seed and windows::

    python benchmarks/bf16_intermediates.py --scheme w2a16 --calib-seed 0 \\
        --peer-from benchmarks/results/fraczero/quantize_w2_demo_s0.json \\
        --out benchmarks/results/stop39/bf16_w2_demo_s0.json
    python benchmarks/rows_report.py --scheme w2a16 --row "all (default)" --reference-row "all with 2 GPTQ rounds" \\
        --run benchmarks/results/stop39/bf16_w2_demo_s0.json:benchmarks/results/stop37/rounds_w2_demo_s0.json ...

``--plain`` runs the unpatched default instead (to check that it reproduces the earlier run's windows exactly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_demo  # noqa: E402

import moecompress.runtime.paired as paired  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=quantize_demo.DEMO_MODEL)
    ap.add_argument("--scheme", default="w2a16")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", type=Path, default=None)
    ap.add_argument("--plain", action="store_true", help="the default unpatched (a reproduction check)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    original = paired.expert_intermediate

    def bf16(x, gate, up, gate_bias, up_bias, act, dtype):
        return original(x, gate, up, gate_bias, up_bias, act, torch.bfloat16 if dtype == torch.float32 else dtype)

    if not args.plain:
        paired.expert_intermediate = bf16
    try:
        note = None if args.plain else "experts' intermediates for the down projections' pairs in bf16 (proxy)"
        quantize_demo.run_rows(quantize_demo.PAIRED, args.model, args.scheme, args.calib_seed, args.out,
                               args.peer_from, note)
    finally:
        paired.expert_intermediate = original


if __name__ == "__main__":
    main()
