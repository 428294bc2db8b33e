"""Several processes splitting each MoE layer's experts: ``torchrun --nproc-per-node N -m moecompress ...``.

Expert parallelism with torch.distributed collectives (NCCL between GPUs, gloo on CPUs), no scheduler of our
own. Every rank reads the model and runs every decoder layer's forward on every batch, so the hidden states
that feed the next layer are bitwise identical on all ranks; only the per-expert work is split: rank ``r`` of
``N`` computes statistics, Hessians and GPTQ for the contiguous experts ``experts(E)``, and the results are
gathered so that every rank holds all of them (the next layer's inputs need every expert's quantized weights).
Because each expert's numbers are computed exactly as a single process computes them, the output is the same
bytes. Rank 0 alone writes files and prints; the others wait for it where they must read what it wrote.
Multi-node runs need the model and the output directory on a filesystem every node sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError

__all__ = ["Dist", "init_dist", "single"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the collectives' device (cuda:LOCAL_RANK with NCCL, else the CPU)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes outputs and prints (rank 0)."""
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of ``n`` experts that ``rank`` (default: this one) computes: contiguous, sizes differing
        by at most one."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def experts(self, n: int) -> range:
        return range(*self.bounds(n))

    def check(self, n: int) -> None:
        if self.world > n:
            raise MoecompressError(f"{self.world} processes for {n} experts per layer: every process needs at least "
                                   "one expert", f"use --nproc-per-node {n} or fewer")

    def gather(self, mine: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's ``[hi - lo, ...]`` slice along dim 0, concatenated in expert order: ``[n, ...]`` on all
        ranks (a no-op in one process)."""
        if not self.active:
            return mine
        if mine.dtype in (torch.int16, torch.uint16):  # no collective of gloo or NCCL takes 16-bit integers
            return self.gather(mine.to(torch.int32), n).to(mine.dtype)
        import torch.distributed as dist

        size = max(hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.world)))
        dev = self.device or mine.device
        pad = torch.zeros((size, *mine.shape[1:]), dtype=mine.dtype, device=dev)
        pad[: mine.shape[0]] = mine.to(dev)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        out = [p[: hi - lo] for p, (lo, hi) in zip(parts, (self.bounds(n, r) for r in range(self.world)))]
        return torch.cat(out).to(mine.device)

    def gather_objects(self, obj):
        """Every rank's ``obj`` in rank order (a one-element list in one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (every rank fills disjoint entries and leaves zeros elsewhere, so the sum is
        exact: ``x + 0 == x``)."""
        if not self.active:
            return t
        import torch.distributed as dist

        dev = self.device or t.device
        buf = t.to(dev).clone()
        dist.all_reduce(buf)
        return buf.to(t.device)

    def agree(self, fn):
        """Run ``fn`` on rank 0 only and hand its result (or its one-line error) to every rank."""
        if not self.active:
            return fn()
        box = None
        if self.writer:
            try:
                box = ("ok", fn())
            except MoecompressError as e:
                box = ("error", e.problem, e.fix)
        box = self.broadcast_object(box)
        if box[0] == "error":
            raise MoecompressError(box[1], box[2])
        return box[1]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def single() -> Dist:
    return Dist()


def init_dist(device: torch.device) -> Dist:
    """This process's place in a ``torchrun`` group (``WORLD_SIZE`` > 1), initialising it once; `Dist()` alone.

    On GPUs each rank computes on ``cuda:LOCAL_RANK`` with NCCL; on CPUs the group uses gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MoecompressError(f"rank {rank} wants GPU {local}, but this machine has {torch.cuda.device_count()}",
                                   "start at most as many processes per node as there are GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device if device.type == "cuda" else torch.device("cpu"))
