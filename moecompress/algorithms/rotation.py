"""Orthogonal matrices for residual-stream rotation (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456).

Rotating the residual stream by an orthogonal ``Q`` spreads activation outliers over all channels, so
per-token low-bit activation quantization loses less; EAQuant (arXiv:2506.13329) builds on the same idea
through DuQuant's rotations. A randomised Hadamard matrix is used when the width is a power of two,
otherwise a random orthogonal matrix (QR of a Gaussian); both are seeded.
"""

from __future__ import annotations

import torch

__all__ = ["random_orthogonal"]


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, n]`` float64 orthogonal matrix: ``diag(±1) H / sqrt(n)`` for powers of two, else QR of a Gaussian."""
    g = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * _hadamard(n) / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
