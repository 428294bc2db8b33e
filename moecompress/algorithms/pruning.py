"""Choosing which experts to keep per MoE layer from importance scores (PreMoe's PEP, Pei et al. 2025,
arXiv:2505.17639; cumulative coverage after DeepSeek's ESFT selection rule, arXiv:2407.01906), and choosing
among several scores' selections by their loss on held-out text (`pick_lowest`).

Scores are ``[L, E]`` (higher = more important). Selections are sorted original expert ids per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["cumulative_counts", "pick_lowest", "select_experts"]


def select_experts(
    scores: torch.Tensor,
    keep: int | Sequence[int],
    protect: torch.Tensor | None = None,
    n_group: int = 1,
) -> list[list[int]]:
    """Top-``keep`` experts per layer by score; ``protect`` ([L, E] bool) experts are taken first.

    With ``n_group > 1`` (group-limited routers) every contiguous group of ``E / n_group`` experts keeps
    ``keep / n_group`` experts, so the routing rule stays valid.
    """
    L, E = scores.shape
    counts = [keep] * L if isinstance(keep, int) else list(keep)
    out = []
    for j in range(L):
        n = counts[j]
        rank = scores[j].double().clone()
        if protect is not None:
            rank[protect[j]] = math.inf
        if n_group > 1:
            size, per = E // n_group, n // n_group
            ids = []
            for g in range(n_group):
                local = rank[g * size:(g + 1) * size]
                ids += (local.argsort(descending=True, stable=True)[:per] + g * size).tolist()
        else:
            ids = rank.argsort(descending=True, stable=True)[:n].tolist()
        out.append(sorted(ids))
    return out


def cumulative_counts(scores: torch.Tensor, share: float, min_keep: int) -> list[int]:
    """Per layer, the fewest experts whose scores cover ``share`` of the layer's total (at least ``min_keep``).

    Scores must be non-negative (a share of a sum is meaningless otherwise).
    """
    if torch.any(scores < 0):
        raise ValueError("cumulative coverage needs non-negative scores")
    counts = []
    for row in scores.double():
        total = float(row.sum())
        if total <= 0:
            counts.append(len(row))
            continue
        cum = row.sort(descending=True).values.cumsum(0) / total
        counts.append(max(min_keep, int((cum < share - 1e-12).sum()) + 1))
    return [min(c, scores.shape[1]) for c in counts]


def pick_lowest(losses: dict[str, float]) -> str:
    """The candidate with the lowest finite loss (the first listed among equals): the score that
    ``prune --score auto`` keeps. Like NAEE's subset search (Lu et al. 2024, arXiv:2402.14800) it judges
    expert sets by what they do to the model's output, here the next-token loss on held-out windows, but
    only among the few sets the importance scores propose."""
    finite = {k: v for k, v in losses.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("no candidate has a finite loss")
    best = min(finite.values())
    return next(k for k, v in finite.items() if v == best)
