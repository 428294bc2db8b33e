"""Triton kernel for the trellis quantizer's search (`algorithms.trellis.tailbite`): one program per sequence runs
the free Viterbi pass, then the pass with both ends tied to its closure, then the backtrack, in one launch per
GPTQ column (the torch version is a Python loop of 2 x 64 steps of small ops per column).

Design: the ``2^L`` state costs live in registers as ``[2^k, 2^(L-k)]`` (flat state ``d 2^(L-k) + m``: the
predecessors of the successors ``m 2^k + c`` are column ``m``), so a step is a min / argmin over axis 0, the new
costs ``[2^(L-k), 2^k]`` (flat ``m 2^k + c``) and one reshape back. The argmins of the tied pass (``2^(L-k)``
bytes per step) go to global memory and the backtrack walks them from the best closing state. Equal costs may
pick another of the equally good paths than the torch search (its argmin takes the first); tests compare costs.
Portability as the other kernels: plain pointer arithmetic, int64 offsets; compiled for sm_80 / sm_90 in CI.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["tailbite_triton", "viterbi_arguments"]


@triton.jit
def _pass(t_ptr, w_ptr, v_lk, row, tie, back_ptr, brow, SEQ: tl.constexpr, L: tl.constexpr, KB: tl.constexpr,
          TIED: tl.constexpr):
    """One Viterbi pass over the sequence at ``row``; returns the final costs ``[2^k, 2^(L-k)]`` (flat state)."""
    LO: tl.constexpr = 1 << (L - KB)
    K: tl.constexpr = 1 << KB
    m = tl.arange(0, LO)
    t0 = tl.load(t_ptr + row)
    w0 = tl.load(w_ptr + row)
    cost = w0 * (t0 - v_lk) * (t0 - v_lk)  # [LO, K], flat m K + c
    if TIED:  # the first state's high bits (flat // K = m) equal the tie
        cost = tl.where((m == tie)[:, None], cost, float("inf"))
    cost = tl.reshape(cost, [K, LO])
    for i in range(1, SEQ):
        best = tl.min(cost, axis=0)  # [LO]: predecessors d LO + m of successors m K + c
        if TIED:
            arg = tl.argmin(cost, axis=0)
            tl.store(back_ptr + brow + i * LO + m, arg.to(tl.uint8))
        ti = tl.load(t_ptr + row + i)
        wi = tl.load(w_ptr + row + i)
        cost = tl.reshape(best[:, None] + wi * (ti - v_lk) * (ti - v_lk), [K, LO])
    if TIED:  # the last state's low bits (flat mod LO) equal the tie
        cost = tl.where((m == tie)[None, :], cost, float("inf"))
    return cost


@triton.jit
def _tailbite_kernel(t_ptr, w_ptr, table_ptr, back_ptr, out_ptr, SEQ: tl.constexpr, L: tl.constexpr,
                     KB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    LO: tl.constexpr = 1 << (L - KB)
    K: tl.constexpr = 1 << KB
    m = tl.arange(0, LO)
    c = tl.arange(0, K)
    v_lk = tl.load(table_ptr + m[:, None] * K + c[None, :])  # [LO, K]: the value of state m K + c
    row = pid * SEQ
    brow = pid * SEQ * LO
    flat = tl.arange(0, K)[:, None] * LO + m[None, :]  # [K, LO] flat state of each cost
    free = _pass(t_ptr, w_ptr, v_lk, row, 0, back_ptr, brow, SEQ, L, KB, False)
    end = tl.min(tl.where(free == tl.min(tl.min(free, axis=1), axis=0), flat, 1 << L), axis=1)
    tie = tl.min(end, axis=0) & (LO - 1)  # the free path's last state's low bits
    cost = _pass(t_ptr, w_ptr, v_lk, row, tie, back_ptr, brow, SEQ, L, KB, True)
    last = tl.min(tl.min(cost, axis=1), axis=0)
    s = tl.min(tl.min(tl.where(cost == last, flat, 1 << L), axis=1), axis=0)  # the first best closing state
    tl.store(out_ptr + row + SEQ - 1, s)
    for j in range(1, SEQ):
        i = SEQ - j
        mm = s >> KB
        d = tl.load(back_ptr + brow + i * LO + mm).to(tl.int32)
        s = d * LO + mm
        tl.store(out_ptr + row + i - 1, s)


def viterbi_arguments(t, w, table, back, out, *, seq: int, L: int, k: int) -> dict:
    """Every argument of `_tailbite_kernel` by name (the launch and `moecompress.kernels.aot` use it)."""
    return dict(t_ptr=t, w_ptr=w, table_ptr=table, back_ptr=back, out_ptr=out, SEQ=seq, L=L, KB=k, num_warps=4)


def tailbite_triton(t: torch.Tensor, w: torch.Tensor, table: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """`algorithms.trellis.tailbite` on the device: states ``[N, n]`` (int64) of ``t, w [N, n]`` float32."""
    N, n = t.shape
    if table.numel() != 1 << L or not 0 < k < L or L - k > 8:
        raise ValueError(f"no trellis search for L = {L}, k = {k} with a table of {table.numel()} values")
    t, w = t.float().contiguous(), w.float().contiguous()
    out = torch.empty(N, n, dtype=torch.int32, device=t.device)
    back = torch.empty(N, n, 1 << (L - k), dtype=torch.uint8, device=t.device)
    if N:
        values = viterbi_arguments(t, w, table.float().contiguous(), back, out, seq=n, L=L, k=k)
        _tailbite_kernel[(N,)](**values)
    return out.long()
