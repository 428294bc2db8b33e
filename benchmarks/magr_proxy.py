"""MagR proxy (stop 29): does l_inf magnitude reduction before GPTQ lower the Hessian-weighted error at W3 / W2
g128? MagR (Zhang et al. 2024, arXiv:2406.00800) shrinks each group's largest weight along directions the layer's
inputs barely excite, by proximal gradient on 1/2 tr((W'-W) H (W'-W)^T) + alpha * sum_g ||w'_g||_inf, then GPTQ
quantizes W'. Real Hessians: the bundled calibration text (16 windows per task) through the demo model, the
attention's q and o projections of the first two layers. Prints, per linear and width, the error of GPTQ on
MagR's weights (against the original W) over plain GPTQ's, for three penalties.

    python benchmarks/magr_proxy.py [MODEL_DIR] > benchmarks/results/stop29/magr_proxy.txt
"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moecompress.calib.data import TaskData, task_windows, bundled_tasks
from moecompress.algorithms.gptq import gptq_quantize
from moecompress.algorithms.quant_grid import QuantGrid
torch.manual_seed(0)
from pathlib import Path
path = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "moecompress/assets/demo-moe")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
wins = task_windows(tok, [TaskData(t) for t in bundled_tasks()], "calib", 256, 16, 0)
X = torch.cat(list(wins.values()))
caps = {}
names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")]
mods = dict(model.named_modules())
def hook(name):
    def f(m, a):
        x = a[0].reshape(-1, a[0].shape[-1]).double()
        caps[name] = caps.get(name, 0) + x.T @ x
    return f
hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
with torch.no_grad():
    for i in range(0, len(X), 8):
        model(X[i:i + 8])
for h in hs: h.remove()

def err(W, Q, H):
    D = (W - Q).double()
    return float(torch.einsum("oc,cd,od->", D, H, D))

def magr(W, H, alpha, iters=150, gs=128):
    """min 1/2 tr((W'-W) H (W'-W)^T) + alpha * sum_groups ||w'_g||_inf, proximal gradient (MagR, arXiv:2406.00800)."""
    L = float(torch.linalg.eigvalsh(H).max())
    eta = 1.0 / L
    W0 = W.double(); V = W0.clone()
    O, C = W.shape
    for _ in range(iters):
        Z = V - eta * (V - W0) @ H
        # prox of eta*alpha*||.||_inf per group: z - proj_{l1 ball radius eta*alpha}(z)
        Zg = Z.view(O, C // gs, gs)
        r = eta * alpha
        a = Zg.abs()
        s, _ = a.sort(-1, descending=True)
        cs = s.cumsum(-1)
        k = torch.arange(1, gs + 1, dtype=a.dtype)
        cond = s - (cs - r) / k > 0
        rho = cond.sum(-1, keepdim=True).clamp(min=1)
        theta = ((cs.gather(-1, rho - 1) - r) / rho).clamp(min=0)
        inball = a.sum(-1, keepdim=True) <= r
        P = torch.where(inball, Zg, Zg.sign() * (a - theta).clamp(min=0))
        V = (Zg - P).view(O, C)
    return V.float()

for name in names:
    H = caps[name] / len(X) / 256
    W = mods[name].weight.detach().float()
    tr = float(H.diagonal().mean())
    for bits in (3, 2):
        g = QuantGrid(bits, 128, clip_floor=0.8 if bits == 2 else 0.2)
        base = err(W, gptq_quantize(W[None], H.float()[None], g).weight[0], H)
        row = [f"{name} W{bits}: gptq {base:.4g}"]
        for alpha_rel in (1e-2, 1e-1, 1.0):
            alpha = alpha_rel * tr * float(W.abs().mean())  # units of w H
            Wm = magr(W, H, alpha)
            q = gptq_quantize(Wm[None], H.float()[None], g).weight[0]
            row.append(f"a{alpha_rel:g}: {err(W, q, H)/base:.3f} (pre {err(W, Wm, H)/base:.3f}, max {float(Wm.abs().amax())/float(W.abs().amax()):.2f})")
        print("  ".join(row), flush=True)
