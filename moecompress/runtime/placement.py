"""Where a stream computes: the ``--device`` choice (`resolve_device`) and a stream's `Placement` (device,
compute dtype, hidden states offloaded to host memory between layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError

__all__ = ["Placement", "resolve_device"]


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (the first GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; one-line errors
    for a GPU that is not there."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise MoecompressError(f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise MoecompressError(f"--device {spec!r} is not supported", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MoecompressError(f"--device {spec} asks for a GPU, but torch sees none (CUDA build: "
                               f"{torch.version.cuda or 'no'})", "use --device cpu (or auto)")
    n = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise MoecompressError(f"--device {spec}: there is no GPU {index} (this machine has {n})",
                               f"use cuda:0 .. cuda:{n - 1}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Placement:
    """Where a stream computes: ``device``, compute ``dtype`` (None: float32 on the CPU, the stored dtype on a
    GPU), and whether the batches' hidden states wait in host memory between layers (``offload``)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    offload: bool = False

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if self.device.type == "cpu" else stored
