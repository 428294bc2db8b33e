"""A linear's target once the linears before it were quantized (asymmetric calibration); the down projection first.

Plain GPTQ quantizes an expert's down projection ``W [H, I]`` to keep ``W h`` on the intermediates ``h`` of the
*full-precision* gate/up projections. But at inference the down projection reads the intermediates of the
*quantized* gate/up, ``h_q = h + e``, so the error it should minimise is ``sum_t g_t |W h_t - Q h_q,t|^2``
(``g_t`` the token's gate weight): the output of the full-precision expert from the quantized one. GPTAQ
(Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", arXiv:2504.02692)
adds that input mismatch to GPTQ's update; for one linear it has a closed form that leaves GPTQ itself
unchanged. With ``H_q = sum g h_q h_q^T`` and ``C = sum g h h_q^T``, the least-squares weight on the quantized
inputs is ``W' = W C H_q^{-1}``, and because the residual ``W h - W' h_q`` is orthogonal to ``h_q``::

    sum_t g_t |W h_t - Q h_q,t|^2 = sum_t g_t |(W' - Q) h_q,t|^2 + const

so GPTQ on ``W'`` with the Hessian ``H_q`` minimises exactly the error above (the down projection takes up
what it can of the gate/up error: a Wiener-style correction). The same holds for any linear whose inputs
changed because linears before it were quantized (`runtime.paired`): an attention output projection after
the query/key/value projections, an expert's gate/up after the attention, with ``x`` in place of ``h``. With few tokens per expert ``W'`` is shrunk
toward ``W``: ``W' = W (C + l I)(H_q + l I)^{-1}`` minimises the error plus ``l |W' - W|^2`` and equals ``W`` when
nothing was quantized (``C = H_q``).

Shapes: E experts (or 1), H outputs (hidden, for the down projection), I inputs (expert width).
"""

from __future__ import annotations

import torch

__all__ = ["corrected_weight"]


@torch.no_grad()
def corrected_weight(W: torch.Tensor, C: torch.Tensor, Hq: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``W' = W (C + l I)(H_q + l I)^{-1}`` per expert (float32 ``[E, H, I]``), ``l = damp * mean(diag H_q)``.

    ``W [E, H, I]`` the weights (down projections), ``C [E, I, I]`` the gate-weighted cross moments ``sum g h h_q^T`` of
    the full-precision and quantized intermediates, ``Hq [E, I, I]`` the quantized intermediates' ``sum g h_q
    h_q^T``. An expert whose ``Hq`` is all zero (no token) keeps ``W``. Solved in float64 by Cholesky
    (``H_q + l I`` is positive definite for ``l > 0``)."""
    E, _, I = W.shape
    out = W.float().clone()
    eye = torch.eye(I, dtype=torch.float64, device=W.device)
    for e in range(E):
        Hd = Hq[e].double()
        lam = damp * float(Hd.diagonal().mean())
        if not lam > 0:
            continue
        L = torch.linalg.cholesky(Hd + lam * eye)
        # W' (H_q + l I) = W (C + l I)  <=>  (H_q + l I) W'^T = (C + l I)^T W^T
        rhs = (C[e].double() + lam * eye).T @ W[e].double().T  # [I, H]
        out[e] = torch.cholesky_solve(rhs, L).T.float()
    return out
