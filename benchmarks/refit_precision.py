#!/usr/bin/env python
"""The scale/zero refit with float32 products (the default, float64 where a row's decision is close) against
float64 throughout (``exact=True``): wall time, the share of rows redone in float64, and the Hessian-weighted
error after each, per expert projection at Mixtral-like width.

Shapes: one expert's gate/up (5632 x 2048) and down (2048 x 5632) projections, Gaussian weights with a few
outlier input channels, a Hessian from 4,096 correlated tokens (seeded), GPTQ at W2/W3/W4 group 128 first
(asymmetric, clip search), the CPU's default threads; each refit timed after a warm-up run.

Usage::

    python benchmarks/refit_precision.py     # writes benchmarks/results/refit_precision.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.algorithms.refit import refit_groups, row_errors

ROOT = Path(__file__).resolve().parents[1]


def problem(O: int, C: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(1, O, C, generator=g) * 0.02
    mix = torch.randn(C, C // 8, generator=g) / (C // 8) ** 0.5  # correlated inputs (low-rank + noise)
    X = torch.randn(4096, C // 8, generator=g) @ mix.T + 0.3 * torch.randn(4096, C, generator=g)
    X[:, torch.randperm(C, generator=g)[:8]] *= 20  # a few outlier channels
    return W, (X.T @ X)[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "refit_precision.json")
    args = ap.parse_args()
    rows = []
    for name, (O, C) in {"gate/up 5632x2048": (5632, 2048), "down 2048x5632": (2048, 5632)}.items():
        W, H = problem(O, C)
        for bits in map(int, args.bits.split(",")):
            grid = QuantGrid(bits, 128)
            res = gptq_quantize(W, H, grid)
            row = {"weight": name, "bits": bits, "error_gptq": float(row_errors(W, res.weight, H).sum())}
            for label, exact in (("float64", True), ("float32+verify", False)):
                refit_groups(W[:, :64], H, type(res)(*(t[:, :64] for t in (res.weight, res.codes, res.scales,
                                                                           res.zeros)), res.loss), False, exact=exact)
                t0 = time.perf_counter()
                out, info = refit_groups(W, H, res, False, exact=exact)
                row[label] = {"seconds": round(time.perf_counter() - t0, 3),
                              "error_after": float(row_errors(W, out.weight, H).sum()),
                              "rows_changed": round(info["rows_changed"], 4),
                              "rows_verified": round(info["rows_verified"], 4)}
                row[label]["_weight"] = out.weight
            a, b = row["float64"].pop("_weight"), row["float32+verify"].pop("_weight")
            row["rows_identical"] = float((a == b).all(-1).float().mean())
            row["speedup"] = round(row["float64"]["seconds"] / row["float32+verify"]["seconds"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
