"""QMoE's dictionary code for sparse ternary rows (Frantar & Alistarh 2023, arXiv:2310.16795, "sub1"): fixed-length
uint16 codewords, each standing for a variable-length run of ternary weights.

* **Symbols** are pairs of adjacent trits: digit ``d`` = 0 for a zero, 1 for ``-1``, 2 for ``+1``; the pair of
  weights ``2i, 2i + 1`` is symbol ``d[2i] + 3 d[2i + 1]`` (9 symbols). A row of ``C`` weights is ``ceil(C / 2)``
  pairs (an odd row ends with a padding zero).
* **Dictionary**: the ``N <= 2^16`` most probable sequences of 1..14 pairs under an i.i.d. model with the pair
  frequencies *measured on the weight being encoded* (QMoE assumed fixed ones, P(0) = 0.885), found by best-first
  expansion from the 9 single pairs (always the first 9 entries): prefix-closed (every prefix of an entry is an entry), so every row is
  encodable and greedy longest match never runs past a row's end. ``N`` is picked per weight among 2^8 .. 2^16 as
  the smallest total of codewords plus dictionary (a small weight cannot amortise a 512 KiB table).
* **Decode table** ``dict`` int32 ``[N, 2]`` (QMoE's ``dec``): entry ``k`` is ``len | digits << 4`` with ``len``
  (1..14, pairs) in the low 4 bits of both words and trit ``t`` (0..27, weight order) at bits ``4 + 2 (t % 14)``
  of word ``t // 14``.
* **Stream**: each row encoded independently by greedy longest match; ``codewords`` uint16 ``[n]`` (all rows,
  row-major over ``E x O``) and ``row_index`` int32 ``[E O + 1]`` (row ``r``'s codewords are
  ``codewords[row_index[r]:row_index[r + 1]]``).

`kernels.reference.dict_decode` is the decoding specification; `check_stream` validates a stream read from disk.
"""

from __future__ import annotations

import functools
import math

import torch

from moecompress.kernels.reference import dict_decode, dict_entry_lengths

__all__ = ["MAX_PAIRS", "build_dictionary", "check_stream", "dict_decode", "dict_table", "encode_rows", "pair_symbols",
           "pick_and_encode", "symbol_costs"]

MAX_PAIRS = 14  # pairs per codeword (28 trits: two 32-bit words of 2-bit digits after a 4-bit length)
SIZES = (1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16)


def pair_symbols(t: torch.Tensor) -> torch.Tensor:
    """Ternary ``t [R, C]`` in {-1, 0, 1} -> pair symbols ``[R, ceil(C / 2)]`` int64 in 0..8."""
    t = t.to(torch.int64)
    d = torch.where(t > 0, 2, torch.where(t < 0, 1, 0))
    if d.shape[1] % 2:
        d = torch.cat([d, d.new_zeros(d.shape[0], 1)], dim=1)
    return d[:, 0::2] + 3 * d[:, 1::2]


def symbol_costs(counts: torch.Tensor) -> torch.Tensor:
    """Integer code lengths ``[9]`` int32 of the pair symbols in sixteenths of a bit: ``round(16 * -log2 p)``
    clamped to 1..1023, with ``p`` the measured frequencies (+0.5 each: every symbol possible). The checkpoint
    stores these nine integers; the dictionary is a function of them (`build_dictionary`), computed in integer
    arithmetic only, so every machine rebuilds the same table."""
    c = counts.double().cpu() + 0.5
    return (-(c / c.sum()).log2() * 16).round().clamp(1, 1023).to(torch.int32)


def _threshold(costs: torch.Tensor, need: int) -> tuple[int, int]:
    """``(T, room)``: the cost of the ``need``-th cheapest sequence of 2..14 pairs, and how many sequences costing
    exactly ``T`` are taken (counted exactly by dynamic programming over integer costs)."""
    top = int(costs.max()) * MAX_PAIRS + 1
    count = torch.zeros(top, dtype=torch.int64)
    count.index_add_(0, costs, torch.ones(9, dtype=torch.int64))  # length 1
    longer = torch.zeros(top, dtype=torch.int64)
    for _ in range(MAX_PAIRS - 1):
        nxt = torch.zeros(top, dtype=torch.int64)
        for c in costs.tolist():
            nxt[c:] += count[:top - c]
        count = nxt
        longer += count
    cum = longer.cumsum(0)
    T = int(torch.searchsorted(cum, torch.tensor([need]), right=False)[0])
    return T, need - (int(cum[T - 1]) if T > 0 else 0)


def build_dictionary(costs: torch.Tensor, size: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` cheapest pair sequences (1..14 pairs; sequence cost = the sum of its symbols' ``costs [9]``):
    the 9 single pairs, then the ``size - 9`` cheapest longer sequences, ties at the threshold broken by (length,
    parent, symbol). Every symbol costs at least 1, so a sequence costs more than its prefix and the set is
    prefix-closed.

    Returns ``(dec [size, 2] int32, parent [size] int64)``, entries level by level (by parent, then symbol); the
    parent of a single pair is -1. Integer arithmetic only: deterministic on every device and platform."""
    if not 9 <= size <= 1 << 16:
        raise ValueError(f"a dictionary holds 9 .. 65536 entries, not {size}")
    costs = costs.to(torch.int64).cpu().reshape(9)
    if bool((costs < 1).any()) or bool((costs > 1023).any()):
        raise ValueError("symbol costs must be 1..1023")
    need = size - 9
    T, room = _threshold(costs, need) if need else (-1, 0)
    levels = [(costs.clone(), torch.full((9,), -1, dtype=torch.int64), torch.arange(9))]
    for _ in range(MAX_PAIRS - 1 if need else 0):
        prev = levels[-1][0]
        cost = (prev[:, None] + costs[None, :]).reshape(-1)
        keep = cost <= T
        if not bool(keep.any()):
            break
        parent = torch.arange(prev.numel()).repeat_interleave(9)[keep]
        sym = torch.arange(9).repeat(prev.numel())[keep]
        levels.append((cost[keep], parent, sym))
    # every longer sequence below T, then ties at T in (level, parent, symbol) order
    words = [torch.zeros(9, 2, dtype=torch.int64)]
    d0, d1 = torch.arange(9) % 3, torch.arange(9) // 3
    words[0][:, 0] = 1 | (d0 << 4) | (d1 << 6)
    words[0][:, 1] = 1
    parents = [torch.full((9,), -1, dtype=torch.int64)]
    index = torch.arange(9)  # final index of each entry of the previous level (-1: not taken)
    offset = 9
    for L, (cost, parent, sym) in enumerate(levels[1:], start=2):
        take = (cost < T) & (index[parent] >= 0)
        tie = (cost == T) & (index[parent] >= 0)
        if room > 0:
            n_tie = torch.cumsum(tie.to(torch.int64), 0)
            take_tie = tie & (n_tie <= room)
            room -= int(take_tie.sum())
            take = take | take_tie
        # this level's entries in (parent final index, symbol) order
        p_final = index[parent]
        order = torch.argsort(p_final * 9 + sym)
        take_o = take[order]
        sel = order[take_o]
        new_index = torch.full((cost.numel(),), -1, dtype=torch.int64)
        new_index[sel] = torch.arange(offset, offset + sel.numel())
        pw = torch.cat(words)[p_final[sel]].clone()  # parent's words, extended by one pair
        for j, d in enumerate((sym[sel] % 3, sym[sel] // 3)):
            t = 2 * (L - 1) + j
            pw[:, t // 14] |= d << (4 + 2 * (t % 14))
        pw[:, 0] = (pw[:, 0] & ~15) | L
        pw[:, 1] = (pw[:, 1] & ~15) | L
        words.append(pw)
        parents.append(p_final[sel])
        offset += sel.numel()
        index = new_index
        if sel.numel() == 0:
            break
    dec = torch.cat(words)
    if dec.shape[0] != size:
        raise RuntimeError(f"dictionary construction gave {dec.shape[0]} entries, not {size}")
    dec = torch.where(dec >= 1 << 31, dec - (1 << 32), dec).to(torch.int32)
    return dec, torch.cat(parents)


def _transitions(dec: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Trie ``next [size + 1, 9]``: node 0 is the root, entry ``k`` is node ``k + 1``; -1 where no entry."""
    size = dec.shape[0]
    words = dec.to(torch.int64) & 0xFFFFFFFF
    length = words[:, 0] & 15
    last = length * 2 - 2  # first trit of the entry's last pair
    d0 = (words.gather(1, (last // 14)[:, None])[:, 0] >> (4 + 2 * (last % 14))) & 3
    d1 = (words.gather(1, ((last + 1) // 14)[:, None])[:, 0] >> (4 + 2 * ((last + 1) % 14))) & 3
    sym = d0 + 3 * d1
    nxt = torch.full((size + 1, 9), -1, dtype=torch.int64)
    nxt[parent + 1, sym] = torch.arange(1, size + 1)
    return nxt


def encode_rows(pairs: torch.Tensor, nxt: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy longest match of every row of ``pairs [R, L]`` through the trie, all rows in lock step, using only
    the first ``size`` entries. Returns ``(codewords [n] int64, row_index [R + 1] int64)``."""
    R, L = pairs.shape
    pos = torch.zeros(R, dtype=torch.int64)
    node = torch.zeros(R, dtype=torch.int64)
    rows_out, codes_out = [], []
    padded = torch.cat([pairs, pairs.new_zeros(R, 1)], dim=1)
    ar = torch.arange(R)
    while True:
        live = pos < L
        sym = padded[ar, pos]
        step = torch.where(live, nxt[node, sym], -1)
        ok = (step > 0) & (step <= size)
        emit = ~ok & (node > 0)
        if bool(emit.any()):
            rows_out.append(ar[emit])
            codes_out.append(node[emit] - 1)
        if not bool(ok.any()) and not bool(live.any()):
            break
        node = torch.where(ok, step, torch.zeros_like(node))
        pos = pos + ok.to(torch.int64)
    rows = torch.cat(rows_out) if rows_out else torch.zeros(0, dtype=torch.int64)
    codes = torch.cat(codes_out) if codes_out else torch.zeros(0, dtype=torch.int64)
    order = torch.sort(rows, stable=True).indices  # emission order within a row is the row's order
    counts = torch.bincount(rows, minlength=R)
    row_index = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return codes[order], row_index


@functools.lru_cache(maxsize=64)
def _table(key: tuple[int, ...]) -> torch.Tensor:
    return build_dictionary(torch.tensor(key[1:]), key[0])[0]


def dict_table(header: torch.Tensor) -> torch.Tensor:
    """The decode table ``[N, 2]`` int32 of a stored dictionary ``header`` (``dict`` int32 ``[10]``: ``N``, then the
    nine symbol costs), built on the CPU (cached) and returned on the header's device. Reads the header on the
    host."""
    key = tuple(int(v) for v in header.cpu().tolist())
    if len(key) != 10 or not 9 <= key[0] <= 1 << 16 or min(key[1:]) < 1:
        raise ValueError(f"a dictionary header is [entries 9..65536, nine positive costs], not {list(key)}")
    return _table(key).to(header.device)


def pick_and_encode(t: torch.Tensor, sizes=SIZES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ternary rows ``t [R, C]`` with the largest dictionary that pays (``sizes``: larger tables give
    longer codewords; the stored dictionary is 40 bytes whatever its size, so the largest is the smallest
    stream except on tiny weights, where it is chosen on the rows themselves). Returns ``(dict [10] int32 =
    (N, nine symbol costs), codewords [n] uint16, row_index [R + 1] int32)``."""
    pairs = pair_symbols(t)
    costs = symbol_costs(torch.bincount(pairs.reshape(-1), minlength=9))
    R = pairs.shape[0]
    sample = pairs[torch.linspace(0, R - 1, min(R, 64)).round().long()] if R > 64 else pairs
    best = None
    sizes = [n for n in sizes if n <= 4 * pairs.numel()] or [min(sizes)]  # no more entries than a weight can use
    for n in sorted(sizes, reverse=True)[:2]:
        dec, parent = _table_with_parents(costs, n)
        codes, _ = encode_rows(sample, _transitions(dec, parent), n)
        if best is None or codes.numel() < best[0]:
            best = (codes.numel(), n)
    n = best[1]
    dec, parent = _table_with_parents(costs, n)
    codes, row_index = encode_rows(pairs, _transitions(dec, parent), n)
    if row_index[-1] >= 1 << 31:
        raise ValueError("more than 2^31 codewords in one weight; split it")
    header = torch.cat([torch.tensor([n], dtype=torch.int32), costs])
    return header, codes.to(torch.uint16), row_index.to(torch.int32)


def _table_with_parents(costs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _cached_build(tuple(int(c) for c in costs.tolist()), n)


@functools.lru_cache(maxsize=16)
def _cached_build(costs: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return build_dictionary(torch.tensor(costs), n)


def check_stream(codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor, rows: int,
                 columns: int) -> str | None:
    """What is wrong with a dictionary-coded weight read from disk (None: nothing): the row index must have
    ``rows + 1`` non-decreasing entries from 0 to the number of codewords, every codeword must name a dictionary
    entry, and every row must decode to exactly ``ceil(columns / 2)`` pairs."""
    if dec.dim() != 2 or dec.shape[1] != 2 or not 9 <= dec.shape[0] <= 1 << 16:
        return f"the decode table has shape {list(dec.shape)}, not [9..65536, 2]"
    if row_index.dim() != 1 or row_index.numel() != rows + 1:
        return f"the row index has {row_index.numel()} entries, not {rows + 1} (truncated)"
    ri = row_index.to(torch.int64).cpu()
    n = codewords.numel()
    if int(ri[0]) != 0 or int(ri[-1]) != n or bool((ri[1:] < ri[:-1]).any()):
        return f"the row index does not run from 0 to the {n} codewords in order"
    cw = codewords.to(torch.int64).cpu() & 0xFFFF
    if n and int(cw.max()) >= dec.shape[0]:
        return f"codeword {int(cw.max())} is past the {dec.shape[0]}-entry dictionary (dictionary/codeword mismatch)"
    lengths = dict_entry_lengths(dec.cpu())
    if bool((lengths < 1).any()) or bool((lengths > MAX_PAIRS).any()):
        return "a dictionary entry has a length outside 1..14 pairs"
    per_row = torch.zeros(rows, dtype=torch.int64)
    if n:
        row_of = torch.repeat_interleave(torch.arange(rows), ri[1:] - ri[:-1])
        per_row.index_add_(0, row_of, lengths[cw])
    if bool((per_row != math.ceil(columns / 2)).any()):
        return f"a row decodes to a length other than {math.ceil(columns / 2)} pairs (dictionary/codeword mismatch)"
    return None
