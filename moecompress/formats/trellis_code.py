"""The packed form of trellis-coded weights (`algorithms.trellis`; decoding: `kernels.reference.trellis_states`).

A weight ``[E, O, C]`` is stored as ``stream`` int32 ``[E, S, C, W]``: for each column, ``S = ceil(O / n)``
circular bitstreams of ``n k = 32 W`` bits (``n`` weights of ``k`` bits; ``n = 64``: 6 words at 3 bits), one per
sequence of rows in ``order`` (int32 ``[O]``: the row at each position; the last sequence is padded past ``O``),
and ``table`` float32 ``[2^L]``. Only windows of real rows are ever read, so a padding position's bits are stored
where a real window covers them and as 0 elsewhere.
"""

from __future__ import annotations

import torch

from moecompress.kernels.reference import trellis_states

__all__ = ["COLUMNS_AT_ONCE", "trellis_stream"]

COLUMNS_AT_ONCE = 64  # columns encoded at a time (bounded int64 temporaries)


def trellis_stream(states: torch.Tensor, order: torch.Tensor, L: int, k: int, n: int) -> torch.Tensor:
    """``stream [E, S, C, W]`` int32 of states ``[E, O, C]`` whose rows, in ``order``, form tail-biting paths of
    ``n`` states (ValueError when they do not: a corrupt or foreign record)."""
    E, O, C = states.shape
    if (n * k) % 32 or n * k < L:
        raise ValueError(f"sequences of {n} weights of {k} bits do not fill whole int32 words")
    S, W, nk = -(-O // n), n * k // 32, n * k
    pos = torch.full((S * n,), -1, dtype=torch.int64)
    pos[:O] = order.to(torch.int64)
    real = (pos >= 0).view(S, n)
    start = (torch.arange(n) * k + (k - L)) % nk  # [n] first stream bit of each window
    shift = 31 - torch.arange(32, dtype=torch.int64)
    out = torch.empty(E, S, C, W, dtype=torch.int32)
    for c0 in range(0, C, COLUMNS_AT_ONCE):
        c1 = min(C, c0 + COLUMNS_AT_ONCE)
        st = states[:, pos.clamp(min=0), c0:c1].to(torch.int64).view(E, S, n, c1 - c0).transpose(2, 3)  # [E,S,c,n]
        bits = torch.zeros(E, S, c1 - c0, nk, dtype=torch.int64)
        for t in range(L):  # bit t of every window (most significant first); padding windows are skipped
            val = (st >> (L - 1 - t)) & 1
            at = (start + t) % nk
            cur = bits[..., at]
            bits[..., at] = torch.where(real[:, None, :], val, cur)
        words = (bits.view(E, S, c1 - c0, W, 32) << shift).sum(-1)  # [E, S, c, W] as unsigned 32-bit values
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        back = trellis_states(words, L, k)  # every real window must read back its state
        if not bool(((back == st) | ~real[:, None, :]).all()):
            raise ValueError("the trellis states do not form tail-biting paths along their rows' order")
        out[:, :, c0:c1] = words
    return out
