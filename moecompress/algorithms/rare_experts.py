"""Hessians for experts that saw too few calibration tokens, from the layer's other tokens.

An expert with few (or no) routed calibration tokens has a Hessian too poor for GPTQ; GPTQModel and this
project used to fall back to round-to-nearest for it. llm-compressor instead sends every calibration token
through every expert (``moe_calibrate_all_experts``), and EAQuant's calibration balance (arXiv:2506.13329)
falls back to all tokens for experts that see none. Here the expert keeps its own routed tokens and is topped
up to ``n_min`` tokens' worth with the layer's other tokens (the MoE block's inputs, any routing), pooled as
a per-token average and weighted by the layer's mean gate score, so its Hessian is a mix of what it saw and
what the layer sees (MoEQuant's gate-weighted Hessian, arXiv:2505.03804, for the routed part). The
down projection's Hessian is the expert's *own* intermediate on those tokens (each expert's intermediate
space is its own, so other experts' down Hessians cannot be pooled).

Shapes: T tokens, C (= H) hidden, I expert width, E experts.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.moe_math import glu
from moecompress.types import Activation

__all__ = ["pooled_hessians"]


@torch.no_grad()
def pooled_hessians(X: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Activation,
                    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                    chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average Hessians of the tokens ``X [T, C]`` for experts with weights ``gate, up [E, I, C]``
    (biases ``[E, I]``): ``(X^T X / T [C, C], h_e^T h_e / T [E, I, I])`` with ``h_e = glu(X gate_e^T, X up_e^T)``."""
    X = X.float()
    T = max(len(X), 1)
    E, I, _ = gate.shape
    Hd = torch.zeros(E, I, I, device=X.device)
    for a in range(0, len(X), chunk):
        x = X[a:a + chunk]
        g = torch.einsum("tc,eic->eti", x, gate.float())
        u = torch.einsum("tc,eic->eti", x, up.float())
        if gate_bias is not None:
            g = g + gate_bias.float()[:, None, :]
        if up_bias is not None:
            u = u + up_bias.float()[:, None, :]
        h = glu(g, u, act)  # [E, t, I]
        Hd += h.transpose(1, 2) @ h
    return X.T @ X / T, Hd / T
