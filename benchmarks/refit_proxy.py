#!/usr/bin/env python
"""GPTQ's own objective (the Hessian-weighted error) after the refit and the code sweeps, on real weights.

The demo model's layer-1 experts' gate projections (8 x 256 x 256), a synthetic Hessian per expert (600
Gaussian tokens with per-channel scales |N(0, 2)| + 0.2, seeded), group 128, asymmetric grids with clip
search. Rows: GPTQ; + refit; + 2 (code sweep, refit) rounds as ``--code-sweeps 2``; + 4 rounds; each as a share of GPTQ's
error, with single-thread wall times of GPTQ and of one sweep.

Usage::

    python benchmarks/refit_proxy.py     # writes benchmarks/results/refit_proxy.json
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moecompress.algorithms.coord_descent import refine_codes
from moecompress.algorithms.gptq import gptq_quantize, proxy_loss
from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.algorithms.refit import refit_groups
from moecompress.io.model import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    sd = load_file(glob.glob(str(DEMO_MODEL / "*.safetensors"))[0])
    W = torch.stack([sd[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(8)]).float()
    g = torch.Generator().manual_seed(0)
    C = W.shape[2]
    X = torch.randn(8, 600, C, generator=g) * (torch.randn(C, generator=g).abs() * 2 + 0.2)
    H = torch.einsum("etc,etd->ecd", X, X)
    out = {}
    for bits in (2, 3):
        grid = QuantGrid(bits, 128, False, True)
        t = time.time()
        r = gptq_quantize(W, H, grid)
        t_gptq = time.time() - t
        base = float(proxy_loss(W, r.weight, H).sum())
        def sweep_refit(x):  # one code sweep, then the refit: what `--code-sweeps` repeats after the first refit
            return refit_groups(W, H, refine_codes(W, H, x, grid.maxq), False)[0]

        f1, _ = refit_groups(W, H, r, False)
        t = time.time()
        refine_codes(W, H, f1, grid.maxq)
        t_sweep = time.time() - t
        f2 = sweep_refit(sweep_refit(f1))
        f3 = sweep_refit(sweep_refit(f2))
        share = {name: float(proxy_loss(W, x.weight, H).sum()) / base
                 for name, x in (("refit", f1), ("2 sweeps + refit", f2), ("4 sweeps + refit", f3))}
        out[f"w{bits}"] = {"gptq_error": base, "share_of_gptq_error": share, "seconds_gptq": round(t_gptq, 2),
                           "seconds_one_sweep": round(t_sweep, 2)}
        print(bits, out[f"w{bits}"], flush=True)
    dest = ROOT / "benchmarks" / "results" / "refit_proxy.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
