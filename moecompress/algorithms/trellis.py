"""Bitshift-trellis coded quantization: QTIP's code (Tseng et al. 2024, arXiv:2406.11235) as GPTQ's quantizer.

A weight's value is ``scale * (table[state] - zero)``. The ``state`` is an ``L``-bit window of a bitstream that
advances ``k`` bits per weight (``k`` = the scheme's width), so a sequence of ``n`` weights costs exactly ``n k``
bits while each weight picks among ``2^L`` table values: the window of weight ``p`` is stream bits
``[k p + k - L, k p + k)``, the earliest bit most significant, i.e. ``s_p = (s_{p-1} << k | b_p) mod 2^L``.
Sequences are tail-biting (the stream is circular: ``s_0``'s high ``L - k`` bits are ``s_{n-1}``'s low ones),
found by QTIP's two-pass approximation (a free Viterbi pass, then one with both ends fixed to its closure).
``table`` holds ``2^L`` values learned once on N(0, 1) samples (Lloyd iterations over Viterbi paths, seeded;
shipped in ``assets/trellis_tables.safetensors``) plus `ZERO_SHIFT`, so zeros are non-negative and stored in a
byte with `ZERO_FRAC` fraction bits (steps of 1/32 on [0, 8)); scales are float16, one (scale, zero) per group of
``group_size`` input columns as our integer grids: the same size as int<k> g128 with a byte zero.

Where the sequences run: along the output rows of one input column (``n = SEQ`` rows), over a fixed seeded
permutation of each weight's rows. GPTQ visits one column at a time and its objective for that column is the
squared error of the column's rows (weighted by their group scales), so the Viterbi search over a column is
exactly GPTQ's step with the whole column chosen jointly; the error is spread over later columns as GPTQ does.
Neighbouring rows (one head's channels) are not put in one sequence: a path correlates its weights' errors, which
GPTQ's row-separable objective cannot see and which cost end to end (docs/BENCHMARKS.md, stop 34).

Shapes: ``E`` experts, ``O`` rows, ``C`` columns, ``N`` sequences, ``n`` weights per sequence, ``S = 2^L``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moecompress.algorithms.quant_grid import QuantResult, storable
from moecompress.algorithms.refit import refit_groups, row_errors
from moecompress.kernels.dispatch import trellis_search

__all__ = ["SEQ", "STATE_BITS", "TrellisGrid", "ZERO_FRAC", "ZERO_SHIFT", "refit_trellis", "row_layout", "row_order",
           "row_sequences", "tailbite", "train_table", "trellis_rounds", "trellis_table", "viterbi"]

SEQ = 64  # weights per sequence (rows of one column)
STATE_BITS = 10  # L
ZERO_SHIFT = 4.0  # added to the learned table: values in about [0.5, 7.5], zeros in [0, 8)
ZERO_FRAC = 5  # fraction bits of a stored zero (byte = zero * 32)
ORDER_SEED = 0
TABLES = Path(__file__).resolve().parents[1] / "assets" / "trellis_tables.safetensors"


CHUNK = 64  # sequences searched at a time: their per-step costs (n x CHUNK x 2^L float32) are kept for the backtrack


def viterbi(t: torch.Tensor, w: torch.Tensor, table: torch.Tensor, L: int, k: int,
            tie: torch.Tensor | None = None) -> torch.Tensor:
    """States ``[N, n]`` (int64) of the path minimising ``sum_p w_p (t_p - table[s_p])^2``, ``t, w [N, n]``.
    ``tie [N]`` (``L - k`` bits): the first state's high bits and the last state's low bits are fixed to it.

    Each step keeps the cost of every state; the backtrack re-derives each predecessor from the stored costs
    (a predecessor's cost is exactly what the step added to: the first of equal minima is taken), which is
    several times faster on a CPU than recording argmins (a strided ``amin`` against a ``min`` with indices).
    Every step's own costs are computed first, for all steps in three vectorised operations, so a step is an
    ``amin`` and an ``add`` (the same float operations in the same order as step by step: the same bytes)."""
    if t.shape[0] > CHUNK:
        return torch.cat([viterbi(t[a:a + CHUNK], w[a:a + CHUNK], table, L, k,
                                  None if tie is None else tie[a:a + CHUNK]) for a in range(0, t.shape[0], CHUNK)])
    N, n = t.shape
    S, Lo, K = 1 << L, 1 << (L - k), 1 << k
    v = table.to(t.dtype).view(1, Lo, K)  # state m K + c: successor c of the states whose low bits are m
    costs = t.new_empty(n, N, Lo, K)
    torch.sub(t.T[:, :, None, None], v[None], out=costs).square_().mul_(w.T[:, :, None, None])
    if tie is not None:
        high = torch.arange(S, device=t.device).view(Lo, K) >> k
        costs[0].masked_fill_(high[None] != tie[:, None, None], float("inf"))
    for i in range(1, n):
        best = costs[i - 1].view(N, K, Lo).amin(1)  # [N, Lo]: the predecessors of m K + c are d Lo + m
        costs[i].add_(best[..., None])
    last = costs[-1].view(N, S)
    if tie is not None:
        low = torch.arange(S, device=t.device) & (Lo - 1)
        last = last.masked_fill(low[None] != tie[:, None], float("inf"))
    s = last.argmin(1)
    states = torch.empty(N, n, dtype=torch.long, device=t.device)
    states[:, -1] = s
    for i in range(n - 1, 0, -1):
        m = s >> k
        d = costs[i - 1].view(N, K, Lo).gather(2, m[:, None, None].expand(N, K, 1))[..., 0].argmin(1)
        s = (d << (L - k)) | m
        states[:, i - 1] = s
    return states


def tailbite(t: torch.Tensor, w: torch.Tensor, table: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """`viterbi` on circular streams of ``n k`` bits: a free pass, then one with the start's high bits and the
    end's low bits fixed to the free path's last state's low bits (QTIP's approximation). On a GPU with Triton one
    kernel launch does both passes for every sequence (`kernels.triton_viterbi`)."""
    got = trellis_search(t, w, table, L, k)
    if got is not None:
        return got
    free = viterbi(t, w, table, L, k)
    return viterbi(t, w, table, L, k, tie=free[:, -1] & ((1 << (L - k)) - 1))


def train_table(L: int, k: int, seed: int = 0, n: int = 128, rows: int = 2048, iters: int = 4) -> torch.Tensor:
    """``2^L`` values for N(0, 1) weights (float32, centred): the successors of a state (same high ``L - k``
    bits) start as a ``2^k``-level Gaussian quantizer dithered by a per-set offset, then Lloyd iterations (each value
    the mean of the samples the tail-biting Viterbi paths assign to it)."""
    g = torch.Generator().manual_seed(seed)
    Lo, K = 1 << (L - k), 1 << k
    u = (torch.randperm(Lo, generator=g).double() + 0.5) / Lo
    p = ((torch.arange(K).double()[None, :] + u[:, None]) / K).clamp(1e-4, 1 - 1e-4)  # [Lo, K]: state m K + c
    table = torch.distributions.Normal(0.0, 1.0).icdf(p).reshape(-1).float()
    t = torch.randn(rows, n, generator=g)
    w = torch.ones_like(t)
    for _ in range(iters):
        st = tailbite(t, w, table, L, k).reshape(-1)
        tot = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, t.reshape(-1).double())
        cnt = torch.zeros(1 << L, dtype=torch.float64).index_add_(0, st, torch.ones(st.numel(), dtype=torch.float64))
        table = torch.where(cnt > 0, tot / cnt.clamp(min=1), table.double()).float()
    return table


@functools.lru_cache(maxsize=None)
def _shipped(L: int, k: int) -> torch.Tensor:
    from safetensors.torch import load_file

    tables = load_file(str(TABLES)) if TABLES.is_file() else {}
    got = tables.get(f"L{L}_k{k}")
    return got if got is not None else train_table(L, k)


@functools.lru_cache(maxsize=64)
def _table_on(L: int, k: int, device: torch.device) -> torch.Tensor:
    return (_shipped(L, k) + ZERO_SHIFT).to(device)


def trellis_table(L: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The code's table (centred values + `ZERO_SHIFT`, float32 ``[2^L]``) on ``device`` (do not modify it)."""
    return _table_on(L, k, torch.device(device))


def row_order(rows: int, seed: int = ORDER_SEED) -> torch.Tensor:
    """The fixed order in which a weight's ``rows`` fill its sequences (int64 ``[rows]``: position -> row)."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed), device="cpu")


@functools.lru_cache(maxsize=256)
def row_layout(blocks: tuple[int, ...], seq: int = SEQ, seed: int = ORDER_SEED,
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Sequence positions of rows split into ``blocks`` (each block, e.g. a stored weight of a fused matrix, has
    its own sequences): int64 ``[P]`` with ``P = sum ceil(b / seq) seq``, the row at each position (-1: padding),
    on ``device``. Cached (GPTQ asks once per column): do not modify the result."""
    parts, start = [], 0
    for b in blocks:
        pad = -(-b // seq) * seq - b
        parts += [row_order(b, seed) + start, torch.full((pad,), -1, dtype=torch.long, device="cpu")]
        start += b
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device="cpu")).to(device)


@dataclass(frozen=True)
class TrellisGrid:
    """The trellis code as a GPTQ grid (`gptq.gptq_quantize` calls ``params``, ``codes`` per column, ``dequant``).
    ``blocks``: row counts of the separately stored weights in the matrix (gate | up; q | k | v), () for one."""

    bits: int
    group_size: int = 128
    state_bits: int = STATE_BITS
    seq: int = SEQ
    blocks: tuple[int, ...] = ()
    symmetric: bool = False
    zero_frac: int = ZERO_FRAC
    code_dtype: torch.dtype = torch.int16

    def groups(self, columns: int) -> int:
        return 1 if self.group_size in (-1, 0) or self.group_size >= columns else columns // self.group_size

    def size(self, columns: int) -> int:
        return columns if self.group_size in (-1, 0) else min(self.group_size, columns)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return trellis_table(self.state_bits, self.bits, device)

    def layout(self, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
        blocks = self.blocks or (rows,)
        if sum(blocks) != rows:
            raise ValueError(f"trellis blocks {blocks} do not add up to {rows} rows")
        return row_layout(blocks, self.seq, device=torch.device(device))

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` ``[..., 1]`` of groups ``w [..., n]``: the group's standard deviation (the table is
        for unit variance) and its mean as a zero on the stored grid."""
        w = w.float()
        s = storable(w.std(-1, unbiased=False, keepdim=True).clamp(min=1e-8))
        unit = 2.0 ** self.zero_frac
        z = (torch.round((ZERO_SHIFT - w.mean(-1, keepdim=True) / s) * unit) / unit).clamp(0, 255 / unit)
        return s, z

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """States ``[E, O]`` of one column ``w [E, O]`` with its rows' ``scale, zero [E, O]``: each sequence's
        squared error in weight units, ``scale^2 (w / scale + zero - table[s])^2``, minimised."""
        E, O = w.shape
        idx = self.layout(O, w.device)
        real = idx >= 0
        at = idx.clamp(min=0)
        t = (w / scale + zero)[:, at]
        wt = (scale * scale)[:, at] * real
        st = tailbite(t.reshape(-1, self.seq), wt.reshape(-1, self.seq), self.table(w.device), self.state_bits,
                      self.bits).view(E, -1)
        out = torch.empty(E, O, dtype=self.code_dtype, device=w.device)
        out[:, idx[real]] = st[:, real].to(self.code_dtype)
        return out

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Table values (float32) of states ``codes``."""
        return self.table(codes.device)[codes.long()]

    def dequant(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return (self.values(q) - zero) * scale


def row_sequences(grid: TrellisGrid, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sequence each row belongs to (int64 ``[rows]``)."""
    idx = grid.layout(rows, device)
    real = idx >= 0
    seq = torch.empty(rows, dtype=torch.long, device=idx.device)
    seq[idx[real]] = torch.arange(idx.numel(), device=idx.device)[real] // grid.seq
    return seq


def refit_trellis(W: torch.Tensor, H: torch.Tensor, res: QuantResult, grid: TrellisGrid,
                  damp: float = 0.01) -> QuantResult:
    """`refit.refit_groups` with the states fixed: each row's group scales and zeros refit to the Hessian-weighted
    error on its table values (rows are free here: the paths, hence validity, do not change)."""
    out = refit_groups(W, H, replace(res, codes=grid.values(res.codes)), False, damp, zero_frac=grid.zero_frac)[0]
    return replace(out, codes=res.codes)


@torch.no_grad()
def trellis_rounds(W: torch.Tensor, H: torch.Tensor, res: QuantResult, grid: TrellisGrid,
                   requantize: Callable[[tuple[torch.Tensor, torch.Tensor]], QuantResult], rounds: int,
                   damp: float = 0.01, min_gain: float = 0.005) -> tuple[QuantResult, list[float]]:
    """The refit, then up to ``rounds`` times trellis GPTQ again on the refit scales and zeros
    (``requantize((scales, zeros))``) and the refit, each sequence keeping its result with the lower
    Hessian-weighted error (the unit `refit.alternate` keeps per row: a sequence's rows share one path). Stops
    once a round lowers the total error by less than ``min_gain`` of it. ``W [E, O, C]``, ``H [E, C, C]`` (an
    all-zero Hessian is plain squared error). Returns the result and the total error after the refit and after
    each round."""
    E, O, C = W.shape
    empty = H.diagonal(dim1=1, dim2=2).sum(-1) == 0
    Hs = torch.where(empty[:, None, None], torch.eye(C, device=H.device, dtype=H.dtype), H)
    seq = row_sequences(grid, O, W.device)
    nseq = int(seq.max()) + 1 if O else 0

    def seq_errors(r: QuantResult) -> torch.Tensor:  # [E, nseq]
        return torch.zeros(E, nseq, dtype=torch.float64, device=W.device).index_add_(
            1, seq, row_errors(W, r.weight, Hs))

    res = refit_trellis(W, H, res, grid, damp)
    err = seq_errors(res)
    history = [float(err.sum())]
    for _ in range(rounds):
        new = refit_trellis(W, H, requantize((res.scales, res.zeros)), grid, damp)
        new_err = seq_errors(new)
        take = new_err < err
        rows = take[:, seq][..., None]  # [E, O, 1]
        res = QuantResult(torch.where(rows, new.weight, res.weight), torch.where(rows, new.codes, res.codes),
                          torch.where(rows, new.scales, res.scales), torch.where(rows, new.zeros, res.zeros), res.loss)
        err = torch.where(take, new_err, err)
        history.append(float(err.sum()))
        if history[-2] - history[-1] <= min_gain * history[-2]:
            break
    return res, history
