"""Per-token weights of the calibration batch a layer is running (output-sensitivity weighting of the Hessians).

While a `weighting` context is active, every Hessian and pairing statistic collected from the current layer call
(`runtime.calibration`, `runtime.paired`) weights token ``t`` by ``w[t]`` (``[T]``, the call's tokens flattened
in batch-major order), on top of any weight it already applies (the routing gate, a shared expert's gate).
None (the default) weights every token 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["current", "weighting"]

_STATE: dict[str, torch.Tensor | None] = {"w": None}


def current(device: torch.device | None = None) -> torch.Tensor | None:
    """The current call's token weights ``[T]`` (float32, on ``device``), or None."""
    w = _STATE["w"]
    return w if w is None or device is None else w.to(device)


@contextlib.contextmanager
def weighting(w: torch.Tensor | None) -> Iterator[None]:
    """Token weights ``w [T]`` for the statistics collected inside (None: none)."""
    prev = _STATE["w"]
    _STATE["w"] = None if w is None else w.reshape(-1).float()
    try:
        yield
    finally:
        _STATE["w"] = prev
