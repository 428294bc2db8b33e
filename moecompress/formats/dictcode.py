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

import heapq
import math

import torch

from moecompress.kernels.reference import dict_decode, dict_entry_lengths

__all__ = ["MAX_PAIRS", "build_dictionary", "check_stream", "dict_decode", "encode_rows", "pair_symbols",
           "pick_and_encode"]

MAX_PAIRS = 14  # pairs per codeword (28 trits: two 32-bit words of 2-bit digits after a 4-bit length)
SIZES = (1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16)


def pair_symbols(t: torch.Tensor) -> torch.Tensor:
    """Ternary ``t [R, C]`` in {-1, 0, 1} -> pair symbols ``[R, ceil(C / 2)]`` int64 in 0..8."""
    t = t.to(torch.int64)
    d = torch.where(t > 0, 2, torch.where(t < 0, 1, 0))
    if d.shape[1] % 2:
        d = torch.cat([d, d.new_zeros(d.shape[0], 1)], dim=1)
    return d[:, 0::2] + 3 * d[:, 1::2]


def build_dictionary(counts: torch.Tensor, size: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` most probable pair sequences for symbol ``counts [9]`` (best-first; ties by sequence).

    Returns ``(dec [size, 2] int32, parent [size] int64)``: the decode table and each entry's trie parent (-1 for a
    single pair); entries are in expansion order, so the first ``n`` of them are the dictionary of size ``n``."""
    if not 9 <= size <= 1 << 16:
        raise ValueError(f"a dictionary holds 9 .. 65536 entries, not {size}")
    c = counts.double().cpu() + 0.5  # every symbol possible (a row may hold any)
    logp = (c / c.sum()).log().tolist()
    # heap items (-log p, parent entry, symbol): deterministic ties; the 9 single pairs come first
    singles = sorted((-logp[s], -1, s) for s in range(9))
    heap: list = []
    parents, w0, w1, lens = [], [], [], []
    while len(parents) < size:
        nlp, parent, sym = singles.pop(0) if singles else heapq.heappop(heap)
        if parent < 0:
            a, b, n = 0, 0, 0
        else:
            a, b, n = w0[parent], w1[parent], lens[parent]
        for j, d in enumerate((sym % 3, sym // 3)):
            t = 2 * n + j
            if t < 14:
                a |= d << (4 + 2 * t)
            else:
                b |= d << (4 + 2 * (t - 14))
        me = len(parents)
        parents.append(parent)
        w0.append(a)
        w1.append(b)
        lens.append(n + 1)
        if n + 1 < MAX_PAIRS:
            for s in range(9):
                heapq.heappush(heap, (nlp - logp[s], me, s))
    L = torch.tensor(lens, dtype=torch.int64)
    dec = torch.stack([torch.tensor(w0, dtype=torch.int64) | L, torch.tensor(w1, dtype=torch.int64) | L], dim=1)
    dec = torch.where(dec >= 1 << 31, dec - (1 << 32), dec).to(torch.int32)
    return dec, torch.tensor(parents, dtype=torch.int64)


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


def pick_and_encode(t: torch.Tensor, sizes=SIZES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ternary rows ``t [R, C]`` with the dictionary size (among ``sizes``) that gives the fewest bytes
    (2 per codeword, 8 per dictionary entry). Returns ``(dict [N, 2] int32, codewords [n] uint16,
    row_index [R + 1] int32)``."""
    pairs = pair_symbols(t)
    counts = torch.bincount(pairs.reshape(-1), minlength=9)
    # a dictionary of 8 N bytes never pays beyond about a quarter of the weight's bits at 1 bit per weight
    limit = max(min(sizes), t.numel() // 32)
    sizes = [n for n in sizes if n <= limit] or [min(sizes)]
    biggest = max(sizes)
    dec, parent = build_dictionary(counts, biggest)
    nxt = _transitions(dec, parent)
    R = pairs.shape[0]
    sample = pairs[torch.linspace(0, R - 1, min(R, 256)).round().long()] if R > 256 else pairs
    best = None
    for n in sorted(sizes):  # the size is chosen on up to 256 evenly spaced rows, then the whole weight encoded
        codes, _ = encode_rows(sample, nxt, n)
        cost = 2 * codes.numel() * R / sample.shape[0] + 8 * n
        if best is None or cost < best[0]:
            best = (cost, n)
        elif cost > best[0] * 1.05:  # larger tables only cost more from here on
            break
    n = best[1]
    codes, row_index = encode_rows(pairs, nxt, n)
    if row_index[-1] >= 1 << 31:
        raise ValueError("more than 2^31 codewords in one weight; split it")
    return dec[:n].clone(), codes.to(torch.uint16), row_index.to(torch.int32)


def check_stream(codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor, rows: int,
                 columns: int) -> str | None:
    """What is wrong with a dictionary-coded weight read from disk (None: nothing): the row index must have
    ``rows + 1`` non-decreasing entries from 0 to the number of codewords, every codeword must name a dictionary
    entry, and every row must decode to exactly ``ceil(columns / 2)`` pairs."""
    if dec.dim() != 2 or dec.shape[1] != 2 or not 9 <= dec.shape[0] <= 1 << 16:
        return f"the dictionary has shape {list(dec.shape)}, not [9..65536, 2]"
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
