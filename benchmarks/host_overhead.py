#!/usr/bin/env python
"""Host (Python) time of one packed MoE layer call on the Triton path, without a GPU: the kernel launches are
replaced by no-ops and the tensors are tiny, so what is timed is the Python and torch-dispatch work that an eager
decode step pays per layer on top of the kernels (on an H200 the grouped layer at T = 1 took 675 us eager
against 190 us in a CUDA graph, stop 33). Runs under ``TRITON_INTERPRET=1`` with ``MOECOMPRESS_KERNELS=triton``
(set here), the launch path otherwise as on a GPU.

    python benchmarks/host_overhead.py [--calls 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["MOECOMPRESS_KERNELS"] = "triton"

import torch  # noqa: E402

from moecompress.formats.spec import ModuleSpec  # noqa: E402
from moecompress.kernels import triton_dequant as td  # noqa: E402
from moecompress.nn.packed import PackedExperts  # noqa: E402
from moecompress.types import Activation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    td._launch = lambda *a, **k: None  # no kernel runs: host time only
    E, I, H = 8, 256, 256
    spec = ModuleSpec.experts((E, I, H), {"gate": "int4", "up": "int4", "down": "int4"}, 128, True, False,
                              Activation("glu", "silu"))
    layer = PackedExperts(spec)
    x, idx, w = torch.randn(1, H), torch.tensor([[1, 5]]), torch.tensor([[0.6, 0.4]])
    assert layer._backend(x.device) == "triton"
    for _ in range(50):
        layer(x, idx, w)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            layer(x, idx, w)
        best = min(best, (time.perf_counter() - t0) / args.calls)
    print(f"PackedExperts.forward, Triton path, launches stubbed: {best * 1e6:.1f} us per call (best of 3)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            layer(x, idx, w)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
