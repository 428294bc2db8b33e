"""Per-expert routing statistics and the expert-importance scores derived from them.

Statistics are sums over tokens, collected once and independent of any budget; every score is a
function of them:

* frequency: routed-token share ``count_e / T`` (sums to K per layer).
* TCESS (PreMoe, Pei et al. 2025, arXiv:2505.17639, as its released code computes it): for each token,
  take the top-``k`` experts by raw router logit, softmax those ``k`` logits, keep the experts whose
  share is at least ``r``, and add their raw logit to their score; TCESS = sum / T (all task tokens).
  ``tcess_prob`` is the softmax-safe variant that adds the routing probability instead of the logit:
  softmax routers' logits are shift-invariant and can be negative, so raw-logit TCESS can rank a
  frequently chosen expert with negative logits below a rarely chosen one.
* REAP (Lasby et al. 2025, arXiv:2510.13999, Eq. 9): mean over the expert's routed tokens of
  ``g_e(x) * ||f_e(x)||_2`` with ``g`` the weight the family really combines the expert with.
* reap_freq: REAP weighted by the task's routing frequency, ``REAP_e * count_e / T = sum over routed tokens
  of g_e(x) * ||f_e(x)||_2 / T``: the expected routed output norm per task token. REAP averages over the
  expert's own tokens, so it ignores how often the task routes there; task-specific pruning wants both
  (EASY-EP, Dong et al. 2025, arXiv:2504.06792, sums ``g * ||f||`` over the task's tokens the same way,
  before its token-contribution factor; REAP's observer calls it ``weighted_ean_sum``).
* EAN: sum over routed tokens of ``||f_e(x)||_2``. gate: ``sum g_e(x) / T``.
* consensus: a Borda count, each expert's rank within its layer (0 = lowest) averaged over tcess, frequency,
  reap, reap_freq and ean (ties ranked by expert index). The scores disagree most on the experts at the keep
  boundary, and which one is right changes with the model; ranks put them on one scale, so no score's units
  dominate. A candidate of ``prune --score auto`` (measured: it ties reap_freq on two Mixtral-style models and
  is the best single score on one task of a Qwen3-MoE-style one).
* Super experts (Su et al. 2025, arXiv:2507.23279; after REAP's guard): experts whose largest activation
  exceeds ``max(ratio * median of the per-expert maxima, global max / 10)``, looked for in the first 75 %
  of MoE layers. REAP compares with the 99.5th percentile of all activations; we keep one maximum per
  expert, and with a few dozen experts a percentile of maxima is the maximum itself, so the median ratio
  is the robust equivalent.
"""

from __future__ import annotations

import torch

__all__ = ["SCORES", "STATS", "expert_scores", "js_divergence", "routing_statistics", "super_experts"]

STATS = ("count", "top1", "gate_sum", "tcess_logit", "tcess_prob", "reap_sum", "ean_sum", "act_max", "out_max",
         "logit_sum")
SCORES = ("tcess", "tcess_prob", "frequency", "reap", "reap_freq", "ean", "gate", "consensus", "random")
CONSENSUS = ("tcess", "frequency", "reap", "reap_freq", "ean")  # the scores whose ranks `consensus` averages


def _scatter_sum(index: torch.Tensor, values: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros(E, dtype=torch.float64, device=index.device).index_add_(0, index.reshape(-1),
                                                                           values.reshape(-1).double())


def _scatter_max(index: torch.Tensor, values: torch.Tensor, E: int) -> torch.Tensor:
    out = torch.zeros(E, dtype=torch.float64, device=index.device)
    return out.scatter_reduce_(0, index.reshape(-1), values.reshape(-1).double(), reduce="amax", include_self=True)


def routing_statistics(
    logits: torch.Tensor,
    probs: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    out_norm: torch.Tensor,
    act_max: torch.Tensor,
    out_max: torch.Tensor,
    tcess_k: int,
    tcess_r: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Sums over ``T`` tokens of one MoE layer, per expert ``[E]`` (float64).

    Args:
        logits: ``[T, E]`` raw router logits. probs: ``[T, E]`` routing probabilities (softmax, or
            sigmoid for sigmoid routers). index / weights: ``[T, K]`` the experts used and the weights
            they were combined with. out_norm / act_max / out_max: ``[T, K]`` per routed (token, slot):
            ``||f_e(x)||_2``, ``max |act(gate) * up|`` and ``max |f_e(x)|``.
        tcess_k, tcess_r: TCESS's top-k and confidence threshold.
    """
    T, E = logits.shape
    top1 = index.gather(1, weights.argmax(dim=1, keepdim=True))  # [T, 1]
    vals, idx = logits.float().topk(tcess_k, dim=-1)  # [T, k]
    confident = (vals.softmax(dim=-1) >= tcess_r).double()
    return {
        "count": _scatter_sum(index, torch.ones_like(weights), E),
        "top1": _scatter_sum(top1, torch.ones(T, 1, device=top1.device), E),
        "gate_sum": _scatter_sum(index, weights, E),
        "tcess_logit": _scatter_sum(idx, vals.double() * confident, E),
        "tcess_prob": _scatter_sum(idx, probs.gather(1, idx).double() * confident, E),
        "reap_sum": _scatter_sum(index, weights.double() * out_norm.double(), E),
        "ean_sum": _scatter_sum(index, out_norm, E),
        "act_max": _scatter_max(index, act_max, E),
        "out_max": _scatter_max(index, out_max, E),
        "logit_sum": logits.double().sum(0),  # mean router logits = a task's routing signature (TAER)
    }


def expert_scores(stats: dict[str, torch.Tensor], tokens: int, score: str, seed: int = 0) -> torch.Tensor:
    """Importance ``[L, E]`` (higher = keep) from summed statistics over ``tokens`` tokens."""
    count = stats["count"]
    if score == "frequency":
        return count / tokens
    if score == "tcess":
        return stats["tcess_logit"] / tokens
    if score == "tcess_prob":
        return stats["tcess_prob"] / tokens
    if score == "reap":
        return torch.where(count > 0, stats["reap_sum"] / count.clamp(min=1), torch.zeros_like(count))
    if score == "reap_freq":  # = reap * frequency
        return stats["reap_sum"] / tokens
    if score == "ean":
        return stats["ean_sum"].clone()
    if score == "gate":
        return stats["gate_sum"] / tokens
    if score == "consensus":  # Borda count: each expert's rank per layer, averaged over the scores
        ranks = [expert_scores(stats, tokens, c).double().argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
                 for c in CONSENSUS]
        return torch.stack(ranks).double().mean(0)
    if score == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(count.shape, generator=g, dtype=torch.float64).to(count.device)
    raise ValueError(f"unknown score {score!r}; use one of {SCORES}")


def super_experts(act_max: torch.Tensor, ratio: float = 4.0, share_of_max: float = 0.1,
                  layer_fraction: float = 0.75) -> torch.Tensor:
    """``[L, E]`` bool: experts with outlier activations, in the first ``layer_fraction`` of MoE layers."""
    flat = act_max.flatten().double()
    thr = max(ratio * float(flat.median()), float(flat.max()) * share_of_max)
    flags = act_max > thr
    flags[max(1, int(round(layer_fraction * act_max.shape[0]))):] = False
    return flags


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last axis (0 = same, 1 = disjoint)."""
    p = p.double() / p.double().sum(-1, keepdim=True)
    q = q.double() / q.double().sum(-1, keepdim=True)
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b.clamp(min=1e-300)).log2(), torch.zeros_like(a)).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2
