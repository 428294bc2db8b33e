"""Per-group scale and zero refit after GPTQ, with the codes fixed.

GPTQ (Frantar et al. 2022, arXiv:2210.17323) fixes each group's scale and zero from the original weights
before any error feedback ("static groups"), then chooses the codes. With the codes ``q`` fixed, every
dequantized row ``w_hat = sum_g (s_g q_g + m_g 1_g)`` is linear in the group parameters, so the
Hessian-weighted error ``(w - w_hat) H (w - w_hat)^T`` (the GPTQ objective) has a closed-form least-squares
minimiser per row; the same refit of quantization parameters after rounding appears in GPTVQ's codebook
update (van Baalen et al. 2024, arXiv:2402.15319) and in OmniQuant/AWQ-style scale searches, here in closed
form. Zero points must stay integers (they are stored as uint8): the joint fit of ``(s, m)`` proposes a
zero ``z = round(-m / s)``, then the scales are refit with the zero fixed; symmetric grids keep their zero.
A row takes the candidate with the least error and keeps GPTQ's parameters unless one is strictly better,
so the refit never increases the Hessian-weighted error.

Shapes: E experts, O output rows, C input columns, G groups of ``gs = C / G`` columns.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.quant_grid import QuantResult, dequantize, storable

__all__ = ["refit_groups", "row_errors"]

CHUNK_BYTES = 256 << 20  # rows are refit in chunks whose float64 systems fit this


def row_errors(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(w - w_hat) H (w - w_hat)^T`` per row, float64: ``[E, O, C], [E, O, C], [E, C, C] -> [E, O]``."""
    D = (W - Wq).double()
    return torch.einsum("eoc,eoc->eo", torch.bmm(D, H.double()), D)


def _gram(A: torch.Tensor, Hb: torch.Tensor) -> torch.Tensor:
    """``M[e, r, g, h] = A[e, r, g] . Hb[e, g, :, h, :] . A[e, r, h]``: ``[E, R, G, gs], [E, G, gs, G, gs] -> [E, R, G, G]``."""
    E, R, G, gs = A.shape
    step = max(1, CHUNK_BYTES // (8 * E * G * G * gs))
    out = []
    for a in range(0, R, step):
        part = A[:, a:a + step]
        T = torch.einsum("ergi,egihj->erghj", part, Hb)  # [E, r, G, G, gs]
        out.append(torch.einsum("erghj,erhj->ergh", T, part))
    return torch.cat(out, 1)


def _solve(M: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Least squares ``M p = r`` per row, ``[E, O, n, n], [E, O, n] -> [E, O, n]`` (a tiny ridge keeps singular
    systems, e.g. a group whose codes are all equal, solvable; rows that still fail give NaN and are rejected)."""
    n = M.shape[-1]
    ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-30)
    M = M + ridge[..., None, None] * torch.eye(n, dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M)
    p = torch.cholesky_solve(r[..., None], L)[..., 0]
    return torch.where((info == 0)[..., None], p, torch.full_like(p, float("nan")))


@torch.no_grad()
def refit_groups(W: torch.Tensor, H: torch.Tensor, res: QuantResult, symmetric: bool, damp: float = 0.01,
                 zero_max: int = 255) -> tuple[QuantResult, dict[str, float]]:
    """Refit the scales (and zeros, asymmetric grids) of ``res`` for ``W [E, O, C]`` and Hessians ``H [E, C, C]``
    with ``res.codes`` fixed; returns the new result and ``{"rows_changed", "error_before", "error_after"}``.

    ``H`` is the Hessian GPTQ used (an all-zero one, an expert without tokens, counts as the identity: plain
    squared error). The normal equations are solved on ``H`` plus ``damp`` times its mean diagonal (as GPTQ
    damps); rows are accepted on the undamped error only. Rows are independent: they are refit in chunks whose
    float64 systems fit `CHUNK_BYTES`."""
    E, O, C = W.shape
    G = res.scales.shape[-1]
    H = H.detach().double().clone()
    empty = H.diagonal(dim1=1, dim2=2).sum(-1) == 0
    H[empty] = torch.eye(C, dtype=H.dtype, device=H.device)
    Hs = H + damp * H.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(C, dtype=H.dtype, device=H.device)
    step = max(1, CHUNK_BYTES // (8 * E * (4 * G * G + 4 * C)))
    parts = [_refit_rows(W[:, a:a + step].detach().double(), H, Hs, res.codes[:, a:a + step],
                         res.scales[:, a:a + step].double(), res.zeros[:, a:a + step].double(),
                         res.weight[:, a:a + step].float(), symmetric, zero_max) for a in range(0, O, step)]
    scale, zero, Wq, before, best = (torch.cat([p[i] for p in parts], 1) for i in range(5))
    changed = (scale != res.scales.double()).any(-1) | (zero != res.zeros.double()).any(-1)
    out = QuantResult(Wq, res.codes, scale.float(), zero.float(), res.loss)
    return out, {"rows_changed": float(changed.double().mean()), "error_before": float(before.sum()),
                 "error_after": float(best.sum())}


def _refit_rows(W: torch.Tensor, H: torch.Tensor, Hs: torch.Tensor, codes: torch.Tensor, scale0: torch.Tensor,
                zero0: torch.Tensor, Wq: torch.Tensor, symmetric: bool, zero_max: int) -> tuple[torch.Tensor, ...]:
    """`refit_groups` on rows ``[E, R, C]``: ``(scale, zero, weight, error before, error after)``."""
    E, R, C = W.shape
    G = scale0.shape[-1]
    gs = C // G
    Hb = Hs.view(E, G, gs, G, gs)
    q = codes.double().view(E, R, G, gs)
    v = torch.bmm(W, Hs).view(E, R, G, gs)  # w H: the right-hand sides are its group sums against the columns

    def scales_for(zero: torch.Tensor) -> torch.Tensor:  # zero fixed: w_hat = sum_g s_g (q_g - z_g)
        a = q - zero[..., None]
        s = _solve(_gram(a, Hb), (a * v).sum(-1))
        return storable(torch.where(torch.isfinite(s) & (s > 0), s, scale0).float()).double()

    cands_s, cands_z = [scales_for(zero0)], [zero0]
    if not symmetric:  # joint fit of (s, m = -s z): the zero it implies, rounded, then the scales again
        ones = torch.ones(E, 1, G, gs, dtype=q.dtype, device=q.device)
        Mqq, M11 = _gram(q, Hb), _gram(ones, Hb).expand(E, R, G, G)
        Mq1 = torch.einsum("eogi,egih->eogh", q, Hb.sum(-1))  # Hb.sum(-1) [E, G, gs, G]: H_gh 1
        M = torch.cat([torch.cat([Mqq, Mq1], -1), torch.cat([Mq1.transpose(-1, -2), M11], -1)], -2)
        p = _solve(M, torch.cat([(q * v).sum(-1), v.sum(-1)], -1))
        s, m = p[..., :G], p[..., G:]
        z = torch.round(-m / s).clamp(0, zero_max)
        z = torch.where(torch.isfinite(z) & (s > 0), z, zero0)
        cands_s.append(scales_for(z))
        cands_z.append(z)
    qf = q.float()
    best = row_errors(W, Wq, H)
    before = best.clone()
    scale, zero = scale0.clone(), zero0.clone()
    for s, z in zip(cands_s, cands_z):
        cand = dequantize(qf, s.float()[..., None], z.float()[..., None]).view(E, R, C)  # as dequantized downstream
        err = row_errors(W, cand, H)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better[..., None], s, scale)
        zero = torch.where(better[..., None], z, zero)
        Wq = torch.where(better[..., None], cand, Wq)
    return scale, zero, Wq, before, best
