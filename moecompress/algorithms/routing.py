"""Top-k routing rules of the MoE families in transformers 5.x, as one pure function.

Covers softmax-then-top-k (Mixtral, Qwen, OLMoE, HunYuan; Ernie with a score-correction bias),
sigmoid with a correction bias and group-limited top-k (DeepSeek-V3, GLM-4-MoE; Liu et al. 2024,
arXiv:2412.19437), group-limited greedy on softmax scores (DeepSeek-V2, arXiv:2405.04434),
top-k-then-softmax (gpt-oss, Granite) and PhiMoE's SparseMixer (Liu et al. 2024, arXiv:2409.12136).
"""

from __future__ import annotations

import torch

from moecompress.types import Routing

__all__ = ["route", "routing_scores"]


def routing_scores(logits: torch.Tensor, rule: Routing) -> torch.Tensor:
    """The per-expert scores the rule turns logits into before selection. ``[T, E] -> [T, E]``.

    softmax/sparsemixer: probabilities; sigmoid: sigmoid; topk_softmax: the raw logits.
    """
    logits = logits.float()
    if rule.score == "sigmoid":
        return logits.sigmoid()
    if rule.score in ("softmax", "sparsemixer"):
        return logits.softmax(dim=-1)
    return logits


def _group_mask(choice: torch.Tensor, rule: Routing) -> torch.Tensor:
    """``[T, E]`` bool mask of experts inside each token's ``topk_group`` best groups."""
    T, E = choice.shape
    grouped = choice.view(T, rule.n_group, E // rule.n_group)  # [T, G, E/G]
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    group_idx = group_scores.topk(rule.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand(T, rule.n_group, E // rule.n_group).reshape(T, E)


def _sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's eval-mode SparseMixer: two argmax picks, each weighted by a softmax over the logits
    within a relative margin ``2 * eps`` of that pick (the first pick is removed before the second)."""

    def pick(masked_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        threshold, idx = masked_scores.max(dim=-1, keepdim=True)  # [T, 1]
        factor = scores.abs().clamp(min=threshold)
        far = ((threshold - scores) / factor) > (2 * eps)
        weight = masked_scores.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, idx)
        return weight, idx

    w1, i1 = pick(scores)
    w2, i2 = pick(scores.scatter(-1, i1, float("-inf")))
    return torch.cat([w1, w2], dim=-1), torch.cat([i1, i2], dim=-1)


def route(
    logits: torch.Tensor, rule: Routing, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a family's routing rule.

    Args:
        logits: ``[T, E]`` raw router output (including any router bias).
        rule: the layer's `Routing`.
        correction_bias: ``[E]`` added to the scores for the *choice* only (DeepSeek-V3, Ernie 4.5).

    Returns:
        ``(weights [T, K] float32, index [T, K] int64)``: what the experts module receives.
    """
    logits = logits.float()
    if rule.score == "sparsemixer":
        return _sparsemixer(logits, rule.jitter_eps)
    scores = routing_scores(logits, rule)  # [T, E]
    if rule.score == "topk_softmax":
        top, index = scores.topk(rule.top_k, dim=-1)
        return top.softmax(dim=-1), index
    choice = scores if correction_bias is None else scores + correction_bias.float().reshape(1, -1)
    if rule.group_score is not None and rule.n_group > 1:
        keep = _group_mask(choice, rule)
        fill = 0.0 if rule.group_score == "max" else float("-inf")
        choice = choice.masked_fill(~keep, fill)
    index = choice.topk(rule.top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(-1, index)
    if rule.renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total.clamp(min=rule.renorm_min) if rule.renorm_min is not None else total + rule.renorm_eps)
    return weights * rule.scaling, index
