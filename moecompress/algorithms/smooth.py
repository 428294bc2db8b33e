"""Expert-aware smoothing (EAQuant, Fu et al. 2025, arXiv:2506.13329) on top of SmoothQuant (Xiao et al.
2023, arXiv:2211.10438).

SmoothQuant moves activation outliers into the weights: with ``s_j = max|x_j|^a / max|W_j|^(1-a)``,
``x' = x / s`` and ``W' = W * s`` (columns) leave ``x W^T`` unchanged. In an MoE layer every expert and the
router read the same normalised input, so one vector must serve them all: EAQuant computes a vector per
expert from its *routed* tokens and aggregates them channel-wise (max by default), optionally with a
router term, then folds ``1 / s`` into the shared pre-MoE norm. Its down-projection step scales only
outlier channels of each expert's intermediate activation, folding ``1 / s`` into that expert's up rows.

The folds are pure functions of tensors (the caller writes the results back into its modules); each keeps the
full-precision function exactly. Shapes: ``H`` hidden, ``I`` expert width, ``E`` experts, ``O``/``C`` rows and
columns of a weight; ``s [C]`` divides the input ``x [T, C]`` of every consumer, ``sd [E, I]`` each expert's
intermediate.
"""

from __future__ import annotations

import torch

__all__ = ["aggregate_scales", "down_outlier_scales", "fold_down", "fold_into_columns", "fold_into_norm",
           "moe_smooth_scales", "smooth_scales"]


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


def moe_smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, count: torch.Tensor, alpha: float,
                      how: str = "max", weights: torch.Tensor | None = None,
                      router_act_max: torch.Tensor | None = None,
                      router_w_max: torch.Tensor | None = None) -> torch.Tensor | None:
    """EAQuant's one vector ``s [H]`` for an MoE block's shared input, or None when no expert saw a token.

    ``act_max [E, H]``: per expert, max |x| over its routed tokens; ``w_max [E, H]``: column maxima of its
    gate and up weights; ``count [E]``: routed tokens (experts without tokens do not vote). The per-expert
    SmoothQuant vectors are aggregated (`aggregate_scales`, ``weights [E]`` for ``freq`` / ``gate``), with the
    router's own vector max-ed in when ``router_w_max [H]`` (its column maxima) is given; channels the router
    never saw (``router_act_max [H]`` = 0) keep 1.
    """
    per_expert = smooth_scales(act_max, w_max, alpha)  # [E, H]
    per_expert[count == 0] = 0
    if bool((count == 0).all()):
        return None
    rterm = smooth_scales(router_act_max, router_w_max, alpha) if router_w_max is not None else None
    s = aggregate_scales(per_expert, how, weights, rterm).clamp(min=1e-5)
    return torch.where(router_act_max > 0, s, torch.ones_like(s))


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                   s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm's affine ``weight [C]`` / ``bias [C]`` after its output is divided by ``s [C]``: both ``/ s``
    (in their own dtype)."""
    return weight / s.to(weight.dtype), (None if bias is None else bias / s.to(bias.dtype))


def fold_into_columns(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weights ``[..., O, C]`` whose input is divided by ``s [C]``: columns ``* s``, so ``(x / s) (W s)^T = x W^T``
    (the dtype of ``W`` is kept)."""
    return W * s.to(W.dtype)


def fold_down(up: torch.Tensor, down: torch.Tensor, sd: torch.Tensor,
              up_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per expert, divide the intermediate ``h = act(g) * u`` by ``sd [E, I]`` (a GLU is linear in ``u``): up rows
    ``/ sd`` (``up [E, I, H]``, ``up_bias [E, I]``) and down columns ``* sd`` (``down [E, H, I]``), so
    ``(h / sd) (W_down sd)^T`` is the expert's output unchanged (EAQuant's down-projection smoothing)."""
    bias = None if up_bias is None else up_bias / sd.to(up_bias.dtype)
    return up / sd[:, :, None], down * sd[:, None, :], bias
