"""Routing statistics per window: expert-count histograms, used to tell tasks apart by routing alone."""

from __future__ import annotations

import torch

from moecompress.models.base import MoEArch
from moecompress.runtime.hooks import capture_routing

__all__ = ["histograms_from_traces", "nearest_centroid_accuracy", "routing_histograms"]


def histograms_from_traces(traces: dict, num_windows: int, num_experts: int) -> torch.Tensor:
    """``[N, L, E]`` from captured routing of ``N`` equal-length windows (run in order): each window's,
    each MoE layer's share of top-k picks per expert (rows sum to 1)."""
    layers = sorted(traces)
    hist = torch.zeros(num_windows, len(layers), num_experts)
    for j, layer in enumerate(layers):
        index = torch.cat(traces[layer].index)  # [N*S, K]
        idx = index.view(num_windows, -1)  # [N, S*K]
        hist[:, j] = hist[:, j].scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
    return hist / hist.sum(dim=-1, keepdim=True)


@torch.no_grad()
def routing_histograms(model, arch: MoEArch, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[N, L, E]`` routing histograms of ``windows [N, S]`` (see `histograms_from_traces`)."""
    with capture_routing(model, arch) as traces:
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i:i + batch_size])
    return histograms_from_traces(traces, len(windows), arch.num_experts(model.config))


def nearest_centroid_accuracy(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> dict[str, float]:
    """Classify each test histogram ``[N, L, E]`` by the nearest (L1) task centroid of ``train``.

    Returns accuracy per task and ``"all"`` (pooled over windows).
    """
    tasks = list(train)
    centroids = torch.stack([train[t].flatten(1).mean(0) for t in tasks])  # [tasks, L*E]
    acc, hits, total = {}, 0, 0
    for t, h in test.items():
        d = torch.cdist(h.flatten(1), centroids, p=1)  # [N, tasks]
        pred = d.argmin(dim=1)
        ok = int((pred == tasks.index(t)).sum())
        acc[t] = ok / len(h)
        hits, total = hits + ok, total + len(h)
    acc["all"] = hits / max(1, total)
    return acc
