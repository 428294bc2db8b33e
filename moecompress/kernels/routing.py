"""Device-side routing of a MoE layer's (token, slot) rows for the grouped kernels (no Triton needed here).

The layout is vLLM's fused-MoE one (``moe_align_block_size``): rows sorted by expert (stable), each expert's
segment padded to ``block_m`` with the sentinel ``num_rows``, and one expert id per block of ``block_m``
sorted rows (``-1`` for blocks past the used ones). The number of blocks is a static upper bound computed
from the shapes, so nothing is read back to the host and the shapes do not depend on the routing: a forward
pass that uses it can be captured in a CUDA graph. `torch_route` builds it with torch ops (the torch
backend, and the specification of the Triton ``moe_align`` kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MoeRoute", "grouped_block_m", "max_blocks", "torch_route"]


@dataclass(frozen=True)
class MoeRoute:
    """Where each (token, slot) row of a MoE layer goes, computed once per layer call, on the device.

    ``block_m == 1`` with ``sorted_rows is None``: ``block_expert`` is the row -> expert map itself (one program
    per row, no sorting). Otherwise ``sorted_rows [num_blocks * block_m]`` lists the rows grouped by expert,
    each expert's segment padded to ``block_m`` with ``num_rows``; ``block_expert [num_blocks]`` names each
    block's expert (``-1``: unused). ``backend``: which kernels the route was made for."""

    num_rows: int
    num_experts: int
    block_m: int
    block_expert: torch.Tensor
    sorted_rows: torch.Tensor | None
    backend: str = "triton"

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Blocks needed in the worst case: every active expert's segment padded by up to ``block_m - 1``."""
    return (num_rows + min(num_rows, num_experts) * (block_m - 1)) // block_m


# A sorted tensor-core block of an expert costs about as much as this many GEMV rows (H200, Mixtral-8x7B expert
# shape: a 16-row block 54.9 us against 21.7 us per GEMV row; the grouped layer's T = 1 and T = 2 timings fit it).
TC_BLOCK_IN_ROWS = 2.5
MAX_GEMV_ROWS = 64


def grouped_block_m(num_rows: int, num_experts: int) -> int:
    """``BLOCK_M`` of the grouped Triton kernel: 1 (a GEMV per row, no sorting) while that is cheaper than one
    tensor-core block per active expert, i.e. while the rows are fewer than ``TC_BLOCK_IN_ROWS`` times the
    experts they are expected to reach (uniform routing: ``E (1 - (1 - 1/E)^R)``; at most ``MAX_GEMV_ROWS``),
    else the rows per active expert rounded up to a tensor-core tile (16, 32 or 64). Mixtral (8 experts, top 2):
    GEMV up to 8 tokens; 128 experts, top 8: up to 8 tokens."""
    active = num_experts * (1.0 - (1.0 - 1.0 / max(num_experts, 1)) ** num_rows)
    if num_rows <= 2 or (num_rows <= MAX_GEMV_ROWS and num_rows <= TC_BLOCK_IN_ROWS * active):
        return 1
    per = num_rows / min(num_rows, num_experts)
    return 16 if per <= 16 else (32 if per <= 32 else 64)


def torch_route(rows_expert: torch.Tensor, num_experts: int, block_m: int | None = None,
                backend: str = "torch") -> MoeRoute:
    """The routing made with torch ops on ``rows_expert``'s device. Default ``block_m``: ``ceil(R / E)``, so
    that about ``2 * min(R, E)`` blocks are processed (the torch backend dequantizes one expert per block)."""
    R = rows_expert.numel()
    dev = rows_expert.device
    rows_expert = rows_expert.reshape(-1).to(torch.int64)
    bm = max(1, -(-R // num_experts)) if block_m is None else block_m
    nb = max_blocks(R, num_experts, bm)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, rows_expert, torch.ones_like(rows_expert))
    padded = (counts + bm - 1) // bm * bm
    end = torch.cumsum(padded, 0)
    order = torch.argsort(rows_expert, stable=True)
    sorted_e = rows_expert[order]
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    dest = (end - padded)[sorted_e] + torch.arange(R, device=dev) - first[sorted_e]
    sorted_rows = torch.full((nb * bm,), R, dtype=torch.int64, device=dev).scatter_(0, dest, order)
    block_expert = torch.searchsorted(end, torch.arange(nb, device=dev) * bm, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return MoeRoute(R, num_experts, bm, block_expert, sorted_rows, backend=backend)
