#!/usr/bin/env python
"""Wall time of GPTQ and of the scale/zero refit after it, per expert projection, at Mixtral-like width.

One expert's gate/up shape (5632 x 2048) and down shape (2048 x 5632), Gaussian weights, a Hessian from 4,096
Gaussian tokens (seeded), W4 group 128, asymmetric with clip search, the CPU's default threads. Prints and
writes the seconds of `gptq_quantize` and of `refit_groups`, the refit's share of GPTQ, and the Hessian-weighted
error before and after the refit. For speed only (random weights); the quality of the refit is
`benchmarks/refit_proxy.py` and `benchmarks/quantize_demo.py`.

Usage::

    python benchmarks/refit_speed.py     # writes benchmarks/results/refit_speed.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.algorithms.refit import refit_groups

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = []
    for O, C in ((5632, 2048), (2048, 5632)):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(1, O, C, generator=g) * 0.02
        X = torch.randn(1, 4096, C, generator=g)
        H = torch.einsum("etc,etd->ecd", X, X)
        del X
        t = time.perf_counter()
        res = gptq_quantize(W, H, QuantGrid(4, 128))
        t_gptq = time.perf_counter() - t
        t = time.perf_counter()
        _, info = refit_groups(W, H, res, symmetric=False)
        t_refit = time.perf_counter() - t
        rows.append({"rows": O, "columns": C, "gptq_s": round(t_gptq, 2), "refit_s": round(t_refit, 2),
                     "refit_over_gptq": round(t_refit / t_gptq, 3), **info})
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results" / "refit_speed.json"
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
