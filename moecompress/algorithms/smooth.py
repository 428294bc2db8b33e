"""Expert-aware smoothing (EAQuant, Fu et al. 2025, arXiv:2506.13329) on top of SmoothQuant (Xiao et al.
2023, arXiv:2211.10438).

SmoothQuant moves activation outliers into the weights: with ``s_j = max|x_j|^a / max|W_j|^(1-a)``,
``x' = x / s`` and ``W' = W * s`` (columns) leave ``x W^T`` unchanged. In an MoE layer every expert and the
router read the same normalised input, so one vector must serve them all: EAQuant computes a vector per
expert from its *routed* tokens and aggregates them channel-wise (max by default), optionally with a
router term, then folds ``1 / s`` into the shared pre-MoE norm. Its down-projection step scales only
outlier channels of each expert's intermediate activation, folding ``1 / s`` into that expert's up rows.
"""

from __future__ import annotations

import torch

__all__ = ["aggregate_scales", "down_outlier_scales", "smooth_scales"]


def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, floor: float = 1e-5) -> torch.Tensor:
    """``s = act_max^alpha / w_max^(1 - alpha)`` elementwise (``[..., C]``), clamped at ``floor``; channels
    never seen by a token (act_max 0) get 1."""
    s = act_max.clamp(min=floor).pow(alpha) / w_max.clamp(min=floor).pow(1 - alpha)
    return torch.where(act_max > 0, s.clamp(min=floor), torch.ones_like(s))


def aggregate_scales(per_expert: torch.Tensor, how: str = "max", weights: torch.Tensor | None = None,
                     router: torch.Tensor | None = None) -> torch.Tensor:
    """One smoothing vector ``[C]`` from per-expert vectors ``[E, C]``.

    how: ``max`` (EAQuant default), ``freq`` or ``gate`` (a weighted mean with ``weights [E]``: routed-token
    counts or summed gate scores). ``router`` ``[C]`` is max-ed in when given.
    """
    if how == "max":
        s = per_expert.amax(dim=0)
    elif how in ("freq", "gate"):
        if weights is None:
            raise ValueError(f"aggregation {how!r} needs per-expert weights")
        w = weights.double() / weights.double().sum().clamp(min=1e-12)
        s = (per_expert.double() * w[:, None]).sum(0).to(per_expert.dtype)
    else:
        raise ValueError(f"unknown aggregation {how!r}; use max, freq or gate")
    return s if router is None else torch.maximum(s, router)


def down_outlier_scales(h_max: torch.Tensor, quantile: float = 0.65, power: float = 0.7) -> torch.Tensor:
    """Per expert ``[E, I]``: scale only outlier channels of the down-projection input.

    A channel is an outlier when its max |h| exceeds ``Q(q) + 1.5 * (Q(q) - Q(1 - q))`` of the expert's
    channel maxima (EAQuant's IQR rule); it gets ``s = (max_j / threshold)^power``, others 1.
    """
    hi = torch.quantile(h_max.float(), quantile, dim=1, keepdim=True)
    lo = torch.quantile(h_max.float(), 1 - quantile, dim=1, keepdim=True)
    thr = (hi + 1.5 * (hi - lo)).clamp(min=1e-8)
    return torch.where(h_max > thr, (h_max / thr).pow(power), torch.ones_like(h_max))
