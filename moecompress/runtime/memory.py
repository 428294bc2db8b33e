"""Peak memory of this process, as the operating system measured it (and the GPU's allocator, on a GPU)."""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["memory_report", "peak_rss_bytes"]


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
