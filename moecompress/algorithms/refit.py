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

Cost: everything is written as a change ``d = w_hat' - w_hat = sum_g (c_g q_g + d_g 1_g)`` from GPTQ's row,
so a candidate's error is ``e - 2 p.r + p^T M p`` with ``p = (c, d)``, ``r = (q_g . u_g, 1 . u_g)`` from the
residual product ``u = (w - w_hat) H`` and the ``2G x 2G`` Gram ``M`` of the basis ``(q_g, 1_g)``. Per row
that is two ``O(C^2)`` products (``u`` and the ``q``-Gram; the ``1``-Grams are per expert) instead of one per
candidate, and no cancellation: the improvement is computed directly, not as a difference of two errors.
A candidate is kept only if its improvement exceeds ``1e-9`` of the row's error (well above float64 rounding);
the two products run in float32 and a row near that threshold is redone in float64 (`refit_groups`).
Damping (the normal equations use ``H + damp * mean(diag H) I``, as GPTQ damps) enters as a diagonal term.

Shapes: E experts, O output rows (R in a chunk), C input columns, G groups of ``gs = C / G`` columns.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.quant_grid import QuantResult, dequantize, storable

__all__ = ["alternate", "refit_groups", "row_errors"]

CHUNK_BYTES = 256 << 20  # rows are refit in chunks whose Gram intermediates (sized as float64) fit this
ACCEPT = 1e-9  # a candidate must lower the row's error by more than this fraction of it
VERIFY = 1e-3  # float32 products: a row whose improvement is within this share of its magnitude is redone in float64
MIN_ROUND_GAIN = 0.005  # `alternate` stops once a round lowers the total error by less than this fraction


def row_errors(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(w - w_hat) H (w - w_hat)^T`` per row, float64: ``[E, O, C], [E, O, C], [E, C, C] -> [E, O]``."""
    D = (W - Wq).double()
    return torch.einsum("eoc,eoc->eo", torch.bmm(D, H.double()), D)


def _gram(A: torch.Tensor, Hb: torch.Tensor) -> torch.Tensor:
    """``M[b, r, g, h] = A[b, r, g] . Hb[b, g, :, h, :] . A[b, r, h]``: ``[B, R, G, gs], [B, G, gs, G, gs] ->
    [B, R, G, G]``, symmetric (``Hb`` is a symmetric matrix's blocks): the blocks ``h >= g`` only, ``R C^2 / 2``
    multiply-adds per expert."""
    B, R, G, gs = A.shape
    out = A.new_empty(B, R, G, G)
    for g in range(G):
        T = torch.bmm(A[:, :, g], Hb[:, g, :, g:].reshape(B, gs, (G - g) * gs))  # A[b, r, g] . Hb[b, g, :, h >= g]
        v = (T.view(B, R, G - g, gs) * A[:, :, g:]).sum(-1)  # [B, R, G - g]
        out[:, :, g, g:] = v
        out[:, :, g + 1:, g] = v[:, :, 1:]
    return out


def _solve(M: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Least squares ``M p = r`` per row, ``[R, n, n], [R, n] -> [R, n]`` (a tiny ridge keeps singular
    systems, e.g. a group whose codes are all equal, solvable; rows that still fail give NaN and are rejected)."""
    n = M.shape[-1]
    ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-30)
    M = M + ridge[..., None, None] * torch.eye(n, dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M)
    p = torch.cholesky_solve(r[..., None], L)[..., 0]
    return torch.where((info == 0)[..., None], p, torch.full_like(p, float("nan")))


@torch.no_grad()
def refit_groups(W: torch.Tensor, H: torch.Tensor, res: QuantResult, symmetric: bool, damp: float = 0.01,
                 zero_max: int = 255, exact: bool = False, zero_frac: int = 0) -> tuple[QuantResult, dict[str, float]]:
    """Refit the scales (and zeros, asymmetric grids) of ``res`` for ``W [E, O, C]`` and Hessians ``H [E, C, C]``
    with ``res.codes`` fixed; returns the new result and ``{"rows_changed", "rows_verified", "error_before",
    "error_after"}`` (rows_verified: the share of rows redone in float64).

    ``H`` is the Hessian GPTQ used (an all-zero one, an expert without tokens, counts as the identity: plain
    squared error). The normal equations are solved on ``H`` plus ``damp`` times its mean diagonal (as GPTQ
    damps); rows are accepted on the undamped error only. As many whole experts at once as fit `CHUNK_BYTES`
    (the demo's: all), else one expert's rows in chunks that fit it (rows are independent).

    Precision: the two ``O(C^2)`` products per row (the residual product and the code Gram) run in float32 (twice
    float64's speed on a CPU, and far more on GPUs with slow float64), the small ``2G x 2G`` solves in float64.
    A row whose float32 improvement is not clearly positive or clearly negative (within `VERIFY` of its own
    magnitude, about 100x float32's relative rounding of such sums: a margin, not a proof) is computed again
    entirely in float64. ``exact``: every product in float64 (the reference). ``zero_frac``: the zeros are stored
    with this many fraction bits (`quant_grid.fractional_zero_bits`): proposed zeros are rounded to steps of
    ``2^-zero_frac`` on ``[0, zero_max * 2^-zero_frac]`` (``zero_max``: the largest stored value)."""
    E, O, C = W.shape
    dt = torch.float64 if exact else torch.float32
    G = res.scales.shape[-1]
    step = max(1, CHUNK_BYTES // (8 * (G * C + 8 * G * G + 8 * C)))  # rows per chunk
    # whole experts together where they fit (fewer, larger products), else one expert's rows in chunks
    chunks = [(range(e, min(E, e + step // O)), slice(0, O)) for e in range(0, E, step // O)] if step >= O else \
        [(range(e, e + 1), slice(a, a + step)) for e in range(E) for a in range(0, O, step)]
    scales, zeros, weight = res.scales.clone(), res.zeros.clone(), res.weight.clone()
    before = after = changed = verified = 0.0
    for ex, rows in chunks:
        es = slice(ex.start, ex.stop)
        He = H[es].detach().to(dt)
        empty = He.diagonal(dim1=-2, dim2=-1).sum(-1) == 0
        if bool(empty.any()):
            He = torch.where(empty[:, None, None], torch.eye(C, dtype=He.dtype, device=He.device), He)
        args = (res.codes[es, rows], res.scales[es, rows].double(), res.zeros[es, rows].double(), symmetric, zero_max,
                zero_frac)
        s, z, b, imp, ok, sure = _refit_rows(W[es, rows].detach().to(dt), He, damp, *args)
        unsure = ~sure
        if bool(unsure.any()):  # float64 where float32 may have decided wrong: those rows of every expert at once
            js = unsure.any(-1).nonzero().flatten()  # [J] experts with such rows
            n = unsure[js].sum(-1)  # [J]
            m = int(n.max())
            verified += float(n.sum())
            first = torch.argsort(sure[js].to(torch.uint8), dim=1, stable=True)[:, :m]  # [J, m] unsure rows first
            valid = torch.arange(m, device=n.device)[None] < n[:, None]  # the rest pad with an unsure row
            idx = torch.where(valid, first, first[:, :1])

            def pick(t: torch.Tensor) -> torch.Tensor:  # [B, R, ...] -> [J, m, ...]
                return t[js].gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
            got = _refit_rows(pick(W[es, rows].detach()).double(), He[js].double(), damp, pick(args[0]),
                              pick(args[1]), pick(args[2]), symmetric, zero_max, zero_frac)
            jj, ii = js[:, None].expand_as(idx)[valid], idx[valid]
            for t, g in zip((s, z, b, imp, ok), got):
                t[jj, ii] = g[valid].to(t.dtype)
        before += float(b.sum())
        after += float((b - imp).sum())
        changed += float(ok.sum())
        if bool(ok.any()):
            scales[es, rows][ok], zeros[es, rows][ok] = s[ok].float(), z[ok].float()
            q = res.codes[es, rows][ok].float().view(-1, G, C // G)
            weight[es, rows][ok] = dequantize(q, s[ok].float()[..., None], z[ok].float()[..., None]).view(
                -1, C).to(weight.dtype)
    out = QuantResult(weight, res.codes, scales, zeros, res.loss)
    return out, {"rows_changed": changed / (E * O), "rows_verified": verified / (E * O), "error_before": before,
                 "error_after": after}


def _refit_rows(W: torch.Tensor, H: torch.Tensor, damp: float, codes: torch.Tensor, s0: torch.Tensor,
                z0: torch.Tensor, symmetric: bool, zero_max: int, zero_frac: int = 0) -> tuple[torch.Tensor, ...]:
    """`refit_groups` on rows ``W [B, R, C]`` of ``B`` experts with their ``H [B, C, C]``: ``(scale, zero, error
    before, improvement, accepted, sure)``, the last four ``[B, R]`` (improvement 0 where GPTQ's parameters are kept).
    The ``O(C^2)`` products run in ``W``'s dtype (float32 or float64), the rest in float64; ``sure``: whether the
    decision stands at that precision (always with float64)."""
    B, R, C = W.shape
    G = s0.shape[-1]
    gs = C // G
    dt = W.dtype
    Hb = H.view(B, G, gs, G, gs)
    q = codes.to(dt).view(B, R, G, gs)
    D = W - dequantize(q, s0.to(dt)[..., None], z0.to(dt)[..., None]).view(B, R, C)  # GPTQ's residual, exact in float32
    u = torch.bmm(D, H)
    err = (D * u).sum(-1).double()
    Dg, ug = D.view(B, R, G, gs), u.view(B, R, G, gs)
    H1 = Hb.sum(-1)  # [B, G, gs, G]: H_gh 1
    Mq1 = torch.einsum("brgi,bgih->brgh", q, H1).double()
    M11 = H1.sum(2).double()[:, None].expand(B, R, G, G)
    M = torch.cat([torch.cat([_gram(q, Hb).double(), Mq1], -1), torch.cat([Mq1.transpose(-1, -2), M11], -1)], -2)
    r = torch.cat([(q * ug).sum(-1), ug.sum(-1)], -1).double()  # [B, R, 2G]
    q, Dg = q.double(), Dg.double()
    # damping [B, 1, 1]: lam * I adds lam * (basis Gram) on each group's own block
    lam = damp * H.diagonal(dim1=-2, dim2=-1).double().mean(-1)[:, None, None]
    sq2, sq1 = (q * q).sum(-1), q.sum(-1)
    Ms = M + lam[..., None] * torch.cat([torch.cat([torch.diag_embed(sq2), torch.diag_embed(sq1)], -1),
                                         torch.cat([torch.diag_embed(sq1), torch.diag_embed(torch.full_like(sq1, gs))],
                                                   -1)], -2)
    rs = r + lam * torch.cat([(q * Dg).sum(-1), Dg.sum(-1)], -1)
    eye = torch.eye(G, dtype=torch.float64, device=W.device).expand(B, R, G, G)
    k = torch.cat([-s0, s0 * z0], -1)  # p = P s + k: c = s - s0, d = -s z + s0 z0

    def scales_for(z: torch.Tensor) -> torch.Tensor:  # zero fixed: least squares in the scales alone
        P = torch.cat([eye, -torch.diag_embed(z)], -2)  # [B, R, 2G, G]
        Pt = P.transpose(-1, -2)
        s = _solve(Pt @ Ms @ P, (Pt @ (rs - (Ms @ k[..., None])[..., 0])[..., None])[..., 0])
        return storable(torch.where(torch.isfinite(s) & (s > 0), s, s0).float()).double()

    cands = [(scales_for(z0), z0)]
    if not symmetric:  # joint fit of (c, d): the zero it implies, rounded, then the scales again
        p = _solve(Ms, rs)
        s = s0 + p[..., :G]
        unit = 2.0 ** zero_frac  # stored zero steps per grid step
        z = (torch.round((s0 * z0 - p[..., G:]) / s * unit) / unit).clamp(0, zero_max / unit)
        z = torch.where(torch.isfinite(z) & (s > 0), z, z0)
        cands.append((scales_for(z), z))
    best = torch.zeros_like(err)
    scale, zero = s0.clone(), z0.clone()
    sure = torch.ones_like(err, dtype=torch.bool)
    for s, z in cands:
        p = torch.cat([s - s0, s0 * z0 - s * z], -1)
        pr, pmp = 2 * (p * r).sum(-1), (p[..., None, :] @ M @ p[..., :, None])[..., 0, 0]
        imp = pr - pmp
        better = (imp > best) & (imp > ACCEPT * err)
        best = torch.where(better, imp, best)
        scale = torch.where(better[..., None], s, scale)
        zero = torch.where(better[..., None], z, zero)
        if dt != torch.float64:  # float32 products: is this candidate clearly better or clearly worse?
            margin = VERIFY * (pr.abs() + pmp.abs() + err)
            sure &= ((imp - ACCEPT * err).abs() > margin) & torch.isfinite(imp)
    return scale, zero, err, best, best > 0, sure


@torch.no_grad()
def alternate(W: torch.Tensor, H: torch.Tensor, res: QuantResult, requantize, rounds: int,
              min_gain: float = MIN_ROUND_GAIN) -> tuple[QuantResult, list[float]]:
    """Alternate GPTQ and the refit: each round quantizes ``W [E, O, C]`` again on ``res``'s (refit) scales and
    zeros (``requantize(W_rows, res_rows)``: GPTQ on those rows with their parameters, then the refit) and keeps,
    per output row, the result with the lower Hessian-weighted error (rows are independent in GPTQ's objective),
    so no round increases it.

    The refit moves each group's grid to the codes GPTQ chose; GPTQ on the moved grid then chooses codes for it:
    block coordinate descent between the grid and the codes, as GPTVQ alternates its codebook update with GPTQ
    (van Baalen et al. 2024, arXiv:2402.15319). At 2 bits the first grid (clip search on the original weights)
    is far from the one the codes want, and rounds lower the error by a few % each. Stops after ``rounds``, or
    once a round lowers the total error by less than ``min_gain`` of it. A row that a round left unchanged has
    the same weights and grid as before that round, so the next round would compute the same rejected result:
    only the rows changed by the previous round are quantized again (``R`` of them per expert, the most of any
    expert; the others padded with unchanged rows whose results are dropped). Returns the result and the total
    error before the first round and after each round run."""
    empty = (H.diagonal(dim1=1, dim2=2).sum(-1) == 0)[:, None]  # [E, 1]: no token, plain squared error
    E, O, C = W.shape

    def errors(Wr: torch.Tensor, Wq: torch.Tensor) -> torch.Tensor:  # [E, R], in H's precision (no float64 H)
        D = Wr - Wq.to(Wr.dtype)
        return torch.where(empty, D.square().sum(-1), (torch.bmm(D, H.to(Wr.dtype)) * D).sum(-1)).double()

    def rows_of(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:  # [E, O, ...] -> [E, R, ...]
        return None if t is None else t.gather(1, idx.view(E, -1, *([1] * (t.dim() - 2))).expand(
            -1, -1, *t.shape[2:]))

    err = errors(W, res.weight)
    history = [float(err.sum())]
    if rounds <= 0:
        return res, history
    fields = [res.weight.clone(), res.codes.clone(), res.scales.clone(),
              None if res.zeros is None else res.zeros.clone()]
    active = torch.ones(E, O, dtype=torch.bool, device=W.device)  # rows whose next round may differ
    for _ in range(rounds):
        R = int(active.sum(1).max())
        if R == 0:
            break
        idx = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :R]  # [E, R] changed rows first
        valid = active.gather(1, idx)
        sub = QuantResult(*(rows_of(t, idx) for t in fields), None)
        new = requantize(rows_of(W, idx), sub)
        new_err = errors(rows_of(W, idx), new.weight)
        take = valid & (new_err < err.gather(1, idx))  # [E, R]
        for t, n in zip(fields, (new.weight, new.codes, new.scales, new.zeros)):
            if t is not None:
                old = rows_of(t, idx)
                pick = torch.where(take.view(E, R, *([1] * (old.dim() - 2))), n.to(old.dtype), old)
                t.scatter_(1, idx.view(E, R, *([1] * (t.dim() - 2))).expand_as(old), pick)
        err.scatter_(1, idx, torch.where(take, new_err, err.gather(1, idx)))
        active = torch.zeros_like(active).scatter_(1, idx, take)
        history.append(float(err.sum()))
        if history[-2] - history[-1] <= min_gain * history[-2]:
            break
    return QuantResult(*fields, res.loss), history
