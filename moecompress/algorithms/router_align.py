"""Router-logit alignment for a quantized router (EAQuant's routing-consistency alignment, arXiv:2506.13329,
after OSTQuant's KL-Top loss, arXiv:2501.13987).

Quantizing the router changes which experts win. Each router row (expert) gets its own clipping ratio,
chosen by coordinate descent to minimise ``KL(p || q)`` restricted to the original top-k experts, where
``p`` and ``q`` are the routing probabilities of the original and quantized router on calibration
inputs (both over all experts, not renormalised on the top-k).

EAQuant's loss ``sum_{e in I} p_e log(p_e / q_e)`` (``objective="topk"``) is not a divergence: it goes
negative whenever the quantized router is *more* confident in the original top-k, so minimising it
rewards overshooting, and on held-out text it lowers top-k agreement at 6-8 bits (docs/BENCHMARKS.md).
The default ``objective="topk_rest"`` adds the term of the pooled remaining experts,
``(1 - P_I) log((1 - P_I) / (1 - Q_I))``: the KL between the distributions coarsened to {each top-k
expert, everything else}, which is non-negative, zero only when the top-k probabilities match, and still
ignores how the losing experts share their mass.
"""

from __future__ import annotations

import torch

from moecompress.algorithms.quant_grid import QuantGrid, dequantize, find_params, quantize_codes

__all__ = ["align_router", "topk_kl", "topk_agreement"]


def _probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    if score == "sigmoid":
        s = logits.float().sigmoid()
        return s / s.sum(-1, keepdim=True)
    return logits.float().softmax(-1)


def _kl_terms(pk: torch.Tensor, qk: torch.Tensor, objective: str) -> torch.Tensor:
    """Per-token loss ``[..., T]`` from the top-k probabilities ``pk, qk [..., T, K]``."""
    qk = qk.clamp(min=1e-12)
    loss = (pk * (pk.clamp(min=1e-12).log() - qk.log())).sum(-1)
    if objective == "topk_rest":
        pr, qr = (1 - pk.sum(-1)).clamp(min=1e-12), (1 - qk.sum(-1)).clamp(min=1e-12)
        loss = loss + pr * (pr.log() - qr.log())
    elif objective != "topk":
        raise ValueError(f"unknown router alignment objective {objective!r}: use 'topk_rest' or 'topk'")
    return loss


def topk_kl(ref_logits: torch.Tensor, logits: torch.Tensor, k: int, score: str = "softmax",
            objective: str = "topk") -> torch.Tensor:
    """Mean over tokens of ``sum_{e in topk(ref)} p_e (log p_e - log q_e)`` (plus the pooled rest's term for
    ``objective="topk_rest"``). ``[T, E]`` x ``[T, E]`` -> scalar."""
    p, q = _probs(ref_logits, score), _probs(logits, score)
    idx = ref_logits.topk(k, dim=-1).indices
    return _kl_terms(p.gather(-1, idx), q.gather(-1, idx), objective).mean()


def topk_agreement(ref_logits: torch.Tensor, logits: torch.Tensor, k: int) -> float:
    """Share of tokens whose top-k expert set is unchanged."""
    a = ref_logits.topk(k, dim=-1).indices.sort(-1).values
    b = logits.topk(k, dim=-1).indices.sort(-1).values
    return float((a == b).all(-1).float().mean())


@torch.no_grad()
def align_router(W: torch.Tensor, X: torch.Tensor, bits: int, k: int, score: str = "softmax",
                 bias: torch.Tensor | None = None, ratios: torch.Tensor | None = None,
                 sweeps: int = 2, min_gain: float = 0.01,
                 objective: str = "topk_rest") -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Quantize router ``W [E, H]`` per row (asymmetric, ``bits``) with a clip ratio per row minimising the
    top-k KL (``objective``, see the module docstring) on inputs ``X [T, H]``. A row's ratio moves off 1.0
    only for a relative KL gain of at least ``min_gain`` (at 8 bits the gains are within calibration noise
    and would not carry over to new text).
    Returns ``(W_hat [E, H], ratio per row [E], report)``."""
    E, H = W.shape
    ratios = ratios.to(W.device) if ratios is not None else torch.linspace(1.0, 0.35, 66, device=W.device)
    grid = QuantGrid(bits, -1, symmetric=False, clip_search=False)
    Wf, Xf = W.float(), X.float()
    ref = Xf @ Wf.T + (0 if bias is None else bias.float())

    def quant(r: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:  # clip ratio per row
        w = Wf if rows is None else Wf[rows]
        lo, hi = w.amin(1) * r, w.amax(1) * r
        scale, zero = find_params(torch.stack([lo, hi], dim=1), grid)  # range [r*min, r*max] per row
        return dequantize(quantize_codes(w, scale, zero, grid.maxq), scale, zero)

    p = _probs(ref, score)
    idx = ref.topk(k, dim=-1).indices  # [T, K]
    pk = p.gather(-1, idx)

    def divergence(lg: torch.Tensor) -> float:  # the objective for router logits [T, E]
        return float(_kl_terms(pk, _probs(lg, score).gather(-1, idx), objective).mean())

    best = torch.ones(E, device=W.device)
    Wq = quant(best)
    logits = Xf @ Wq.T + (0 if bias is None else bias.float())
    before = current = divergence(logits)
    agree_before = topk_agreement(ref, logits, k)
    for _ in range(sweeps):
        for e in range(E):
            losses = []
            for chunk in ratios.split(8):  # candidates [R, H] -> their logits with column e replaced [R, T, E]
                rows = quant(chunk, torch.full((len(chunk),), e, device=W.device))
                tries = logits.expand(len(chunk), *logits.shape).clone()
                tries[:, :, e] = (Xf @ rows.T).T + (0 if bias is None else bias[e].float())
                qk = _probs(tries, score).gather(-1, idx.expand(len(chunk), *idx.shape))
                losses.append(_kl_terms(pk, qk, objective).mean(-1))
            row_best, row_loss = best[e].item(), current
            for r, loss in zip(ratios.tolist(), torch.cat(losses).tolist()):
                if loss < row_loss * (1 - min_gain):
                    row_best, row_loss = r, loss
            best[e] = row_best
            Wq = quant(best)
            logits = Xf @ Wq.T + (0 if bias is None else bias.float())
            current = divergence(logits)
    return Wq.to(W.dtype), best, {"kl_before": before, "kl_after": current, "topk_agreement_before": agree_before,
                                  "topk_agreement_after": topk_agreement(ref, logits, k)}
