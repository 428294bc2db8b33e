"""MagR proxy (stop 29): does l-infinity magnitude reduction before GPTQ lower the Hessian-weighted error at W3 /
W2 g128?

MagR (Zhang et al. 2024, arXiv:2406.00800) shrinks each group's largest weights along directions the layer's
inputs barely excite, by proximal gradient on ``1/2 tr((W'-W) H (W'-W)^T) + alpha * sum_g ||w'_g||_inf``; GPTQ
then quantizes ``W'``. Real Hessians: the bundled calibration text (16 windows per task) through the demo model,
the attention's q and o projections of the first two layers. Prints, per linear and width, the error of GPTQ on
MagR's weights (measured against the original ``W``) over plain GPTQ's, for three penalties (in units of the mean
weight times the Hessian's mean diagonal), with MagR's own error and its largest weight over the original's.

    python benchmarks/magr_proxy.py [MODEL_DIR] > benchmarks/results/stop29/magr_proxy.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.calib.data import TaskData, bundled_tasks, task_windows

DEMO = Path(__file__).resolve().parents[1] / "moecompress" / "assets" / "demo-moe"
LINEARS = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")]


def hessians(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({name: H [C, C]}, {name: W [O, C]})`` for `LINEARS`, from the bundled calibration text."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    X = torch.cat(list(task_windows(tok, [TaskData(t) for t in bundled_tasks()], "calib", 256, 16, 0).values()))
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return keep

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in LINEARS]
    with torch.no_grad():
        for i in range(0, len(X), 8):
            model(X[i:i + 8])
    for h in handles:
        h.remove()
    return {n: sums[n] / X.numel() for n in LINEARS}, {n: mods[n].weight.detach().float() for n in LINEARS}


def err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    return float(torch.einsum("oc,cd,od->", D, H, D))


def magr(W: torch.Tensor, H: torch.Tensor, alpha: float, iters: int = 150, gs: int = 128) -> torch.Tensor:
    """Proximal gradient for ``min 1/2 tr((V-W) H (V-W)^T) + alpha * sum_g ||v_g||_inf`` (``W [O, C]``, groups of
    ``gs`` columns). The prox of ``t ||.||_inf`` is ``z - proj_{l1 ball of radius t}(z)`` (Moreau)."""
    eta = 1.0 / float(torch.linalg.eigvalsh(H).max())
    W0 = W.double()
    V = W0.clone()
    O, C = W.shape
    r = eta * alpha
    k = torch.arange(1, gs + 1, dtype=torch.float64)
    for _ in range(iters):
        Z = (V - eta * (V - W0) @ H).view(O, C // gs, gs)
        a = Z.abs()
        s = a.sort(-1, descending=True).values
        cs = s.cumsum(-1)
        rho = (s - (cs - r) / k > 0).sum(-1, keepdim=True).clamp(min=1)
        theta = ((cs.gather(-1, rho - 1) - r) / rho).clamp(min=0)
        P = torch.where(a.sum(-1, keepdim=True) <= r, Z, Z.sign() * (a - theta).clamp(min=0))
        V = (Z - P).view(O, C)
    return V.float()


def main() -> None:
    torch.manual_seed(0)
    Hs, Ws = hessians(sys.argv[1] if len(sys.argv) > 1 else str(DEMO))
    for name in LINEARS:
        H, W = Hs[name], Ws[name]
        unit = float(H.diagonal().mean()) * float(W.abs().mean())
        for bits in (3, 2):
            grid = QuantGrid(bits, 128, clip_floor=0.8 if bits == 2 else 0.2)
            base = err(W, gptq_quantize(W[None], H.float()[None], grid).weight[0], H)
            row = [f"{name} W{bits}: gptq {base:.4g}"]
            for rel in (1e-2, 1e-1, 1.0):
                Wm = magr(W, H, rel * unit)
                q = gptq_quantize(Wm[None], H.float()[None], grid).weight[0]
                peak = float(Wm.abs().amax()) / float(W.abs().amax())
                row.append(f"a{rel:g}: {err(W, q, H) / base:.3f} (pre {err(W, Wm, H) / base:.3f}, max {peak:.2f})")
            print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
