"""Peak memory of this process, as the operating system measured it (and the GPU's allocator, on a GPU)."""

from __future__ import annotations

import os
import resource
import sys

import torch

__all__ = ["device_bytes", "expert_chunk", "memory_report", "peak_rss_bytes"]

# share of the device's memory the routed experts' statistics of one chunk may take (`expert_chunk`)
EXPERT_SHARE = 0.4


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_report() -> dict[str, int | None]:
    """``{"peak_rss_bytes": ..., "peak_gpu_bytes": ...}`` (``None`` without a GPU in use)."""
    gpu = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = max(int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count()))
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu}


def device_bytes(device: torch.device) -> int | None:
    """Total memory of ``device``: a GPU's, or the host's physical memory for the CPU (None when unknown). The
    total, not what is free now, so that the same command on the same machine makes the same choices."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def expert_chunk(per_expert: int, experts: int, device: torch.device, processes: int = 1,
                 share: float = EXPERT_SHARE) -> int:
    """How many experts' statistics of ``per_expert`` bytes each fit in ``share`` of ``device``'s memory (the host's
    split among ``processes`` on the CPU), at least 1 and at most ``experts`` (all of them when unknown)."""
    total = device_bytes(device)
    if total is None or per_expert <= 0:
        return experts
    if device.type == "cpu":
        total //= max(1, processes)
    return max(1, min(experts, int(share * total) // per_expert))
