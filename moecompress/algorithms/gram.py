"""The Gram matrix ``X^T X`` of calibration inputs (every Hessian GPTQ uses, `runtime.calibration`,
`runtime.paired`), from the blocks on and above its diagonal: with ``b`` column blocks it takes
``(b + 1) / (2 b)`` of a full product's multiply-adds (5/8 at four blocks), the blocks below the diagonal being
transposed copies (a full product computes each of them again, as another sum). No BLAS ``syrk`` is reachable
from torch.

Shapes: T tokens, D input width.
"""

from __future__ import annotations

import torch

__all__ = ["gram", "routed_gram", "with_prior"]

BLOCK = 128  # columns per block: thin enough to skip most of the lower half, wide enough for an efficient product


def gram(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``x^T x`` for ``x [T, D]`` -> ``[D, D]``, in ``x``'s dtype and device."""
    D = x.shape[-1]
    if D <= block:
        return x.T @ x
    out = x.new_empty(D, D)
    for a in range(0, D, block):
        b = min(a + block, D)
        part = x[:, a:b].T @ x[:, a:]  # [b - a, D - a]: rows a..b, columns a..
        out[a:b, a:] = part
        out[b:, a:b] = part[:, b - a:].T
    return out


def with_prior(H: torch.Tensor, P: torch.Tensor, share: float) -> torch.Tensor:
    """``H + share * tr(H) / tr(P) * P`` (``[D, D]`` each; a new tensor): a Hessian smoothed toward a prior
    ``P`` of the same inputs at ``share`` of its own weight, whatever either's scale (``H`` unchanged when its
    trace or ``P``'s is zero). Add-alpha smoothing of a token distribution: with ``P`` the mean outer product over
    the vocabulary, every token counts as if seen ``share * tokens / vocabulary`` more times."""
    tp = float(P.diagonal().sum())
    th = float(H.diagonal().sum())
    if not (tp > 0 and th > 0):
        return H.clone()
    return H + (share * th / tp) * P.to(H.device, H.dtype)


def routed_gram(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s gate-weighted Gram matrix ``sum_t g_t x_t x_t^T`` over the tokens routed to it (``x [T, D]``,
    top-k ``index, weights [T, K]``, ``g_t`` the weight of ``e`` among token t's choices) -> ``[D, D]`` float32:
    how an expert's GPTQ Hessian weighs its routed tokens (`runtime.calibration`)."""
    g = (weights.float() * (index == e)).sum(1)
    sel = g > 0
    xe = x[sel].float() * g[sel].sqrt()[:, None]
    return gram(xe)
