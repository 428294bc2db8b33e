"""Pure-torch reference kernels: the specification of every codec's decoding, and the CPU path.

Bit layouts (docs/FORMAT.md): ``b``-bit codes are packed densely and LSB-first along the input features
into int32 words (code ``k`` at bits ``[k*b, k*b + b)`` of the row's little-endian bit stream, crossing word
boundaries when needed); ternary values may instead be packed five per byte in base 3 (GGUF TQ1_0: trit
``n`` of a byte is ``((byte * 3^n) mod 256) * 3 >> 8``, minus 1). A weight is ``(q - zero) * scale`` per
group of ``C / G`` input columns. Trellis-coded weights (QTIP's bitshift trellis) are circular bitstreams per
sequence of rows, a weight's state a window of the stream and its value a table entry (`trellis_states`).

Shapes: ``packed [E, O, W]`` int32 or ``trits [E, O, ceil(C/5)]`` uint8, ``scale``/``zero`` ``[E, O, G]``,
activations ``x [T, C]``.

Every function works on any device: tensors it makes are made on its input's device, and nothing reads a
device value back to the host (no ``.item()`` / ``.tolist()``), so the functions can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize", "dict_decode", "dict_dequantize", "dict_entry_lengths", "grouped_experts_matmul",
           "packed_matmul", "trellis_dequantize", "trellis_row_states", "trellis_states", "unpack_bits", "unpack_trits"]

def unpack_bits(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """``[..., W]`` int32 words -> ``[..., columns]`` uint8 codes."""
    *lead, W = packed.shape
    if W != (columns * bits + 31) // 32:
        raise ValueError(f"{W} words cannot hold {columns} {bits}-bit codes")
    if 32 % bits == 0:  # codes never straddle words: shift each word by every slot's offset
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.reshape(-1, W, 1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked
        return codes.to(torch.uint8).reshape(-1, W * per)[:, :columns].reshape(*lead, columns)
    words = packed.reshape(-1, W).to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, words.new_zeros(words.shape[0], 1)], dim=1)
    pos = torch.arange(columns, dtype=torch.int64, device=packed.device) * bits
    word, off = pos // 32, pos % 32
    lo = words[:, word] >> off
    hi = (words[:, word + 1] << (32 - off)) * (off + bits > 32)
    codes = (lo | hi) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, columns)


def unpack_trits(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """``[..., B]`` uint8 -> ``[..., columns]`` int8 trits in {-1, 0, 1}."""
    *lead, B = packed.shape
    if B != (columns + 4) // 5:
        raise ValueError(f"{B} bytes cannot hold {columns} trits")
    mul3 = 3 ** torch.arange(5, dtype=torch.int64, device=packed.device)  # 3^n, made where the data is
    q = (packed.to(torch.int64)[..., None] * mul3) & 255  # [..., B, 5]
    t = ((q * 3) >> 8) - 1
    return t.reshape(*lead, B * 5)[..., :columns].to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` per group: ``[E, O, C]`` codes, ``[E, O, G]`` parameters -> ``[E, O, C]``."""
    E, O, C = codes.shape
    G = scale.shape[-1]
    q = codes.to(torch.float32).view(E, O, G, C // G)
    return ((q - zero.float()[..., None]) * scale.float()[..., None]).view(E, O, C).to(dtype)


def packed_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x [T, C] @ W^T`` for one quantized weight ``[1, O, C]`` -> ``[T, O]`` (float32 accumulation)."""
    return x.float() @ dequantize(codes, scale, zero)[0].T


def grouped_experts_matmul(x: torch.Tensor, rows_expert: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                           zero: torch.Tensor) -> torch.Tensor:
    """Each row ``x[t]`` times its expert's weight: ``x [T, C]``, ``rows_expert [T]`` -> ``[T, O]`` (float32).

    The specification, not a fast path: it gathers one dense ``[O, C]`` weight per row."""
    w = dequantize(codes, scale, zero)  # [E, O, C]
    return torch.einsum("tc,toc->to", x.float(), w[rows_expert])


# ------------------------------------------------------------------------------ ternary-dict (QMoE's code)
def dict_entry_lengths(dec: torch.Tensor) -> torch.Tensor:
    """Pairs per dictionary entry: the low 4 bits of ``dec [N, 2]``'s first word -> ``[N]`` int64."""
    return dec[:, 0].to(torch.int64) & 15


def dict_decode(codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor, rows: int,
                columns: int) -> torch.Tensor:
    """Trits ``[rows, columns]`` int8 in {-1, 0, 1} from a dictionary-coded stream (formats/dictcode.py):
    codeword ``k`` of row ``r`` (``row_index[r] <= k < row_index[r + 1]``) expands to ``2 len_k`` trits, trit ``t``
    being digit ``(dec[c_k, t // 14] >> (4 + 2 (t % 14))) & 3`` (0: zero, 1: -1, 2: +1), placed after the trits of
    the row's earlier codewords. ``codewords [n]`` uint16, ``row_index [rows + 1]`` int32, ``dec [N, 2]`` int32.
    The stream must be valid (`formats.dictcode.check_stream`)."""
    dev = codewords.device
    n = codewords.numel()
    width = columns + (columns % 2)
    out = torch.zeros(rows, width + 2 * 14, dtype=torch.int8, device=dev)  # slack for the masked tail
    if n == 0:
        return out[:, :columns]
    cw = codewords.to(torch.int64) & 0xFFFF
    words = dec.to(torch.int64)[cw] & 0xFFFFFFFF  # [n, 2]
    trits = 2 * (words[:, 0] & 15)  # [n]
    ends = torch.cumsum(trits, 0)
    starts = ends - trits  # over the whole stream
    ri = row_index.to(torch.int64)
    row = torch.searchsorted(ri[1:], torch.arange(n, device=dev), right=True)  # [n]
    first = torch.cat([starts, starts.new_zeros(1)])[ri[:-1]]  # [rows] stream offset of each row's first trit
    start = starts - first[row]  # within the row
    t = torch.arange(28, device=dev)
    digit = (words[:, t // 14] >> (4 + 2 * (t % 14))) & 3  # [n, 28]
    value = torch.where(digit == 2, 1, torch.where(digit == 1, -1, 0)).to(torch.int8)
    value = torch.where(t[None, :] < trits[:, None], value, torch.zeros_like(value))
    pos = (start[:, None] + t[None, :]).clamp(max=width + 27)
    flat = out.view(-1)
    keep = t[None, :] < trits[:, None]
    idx = (row[:, None] * (width + 28) + pos)[keep]
    flat.index_put_((idx,), value[keep])
    return out[:, :columns]


def dict_dequantize(codewords: torch.Tensor, row_index: torch.Tensor, dec: torch.Tensor, scale: torch.Tensor,
                    scale_neg: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` from a dictionary-coded weight with group ``scale [E, O, G]`` (and ``scale_neg``: the
    negative level of two-level grids; None: ``-scale``)."""
    E, O, G = scale.shape
    t = dict_decode(codewords, row_index, dec, E * O, columns).view(E, O, G, columns // G).to(torch.float32)
    s = scale.float()[..., None]
    neg = s if scale_neg is None else scale_neg.float()[..., None]
    return torch.where(t > 0, s, torch.where(t < 0, -neg, torch.zeros_like(s))).view(E, O, columns).to(dtype)


# -------------------------------------------------------------------- trellis (QTIP's bitshift trellis code)
def trellis_states(stream: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """States ``[..., n]`` (int64) of tail-biting sequences ``stream [..., W]`` int32, ``n = 32 W / k`` weights
    each. Stream bit ``b`` is bit ``31 - b mod 32`` of word ``b // 32`` (most significant first); state ``p`` is
    the ``L`` bits from bit ``(k p + k - L) mod 32 W`` on, circularly, the earliest most significant."""
    *lead, W = stream.shape
    nk = 32 * W
    words = stream.to(torch.int64) & 0xFFFFFFFF
    start = (torch.arange(nk // k, device=stream.device) * k + (k - L)) % nk
    w0, off = start // 32, start % 32
    both = (words[..., w0] << 32) | words[..., (w0 + 1) % W]  # [..., n]: the window within 64 bits
    return (both >> (64 - L - off)) & ((1 << L) - 1)


def trellis_row_states(stream: torch.Tensor, order: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """States ``[E, O, C]`` (int64, row order) of ``stream [E, S, C, W]`` with ``order [O]`` int32, the row at each
    sequence position (positions from ``O`` on are padding)."""
    E, S, C, W = stream.shape
    st = trellis_states(stream, L, k).transpose(2, 3).reshape(E, -1, C)[:, :order.numel()]  # position order
    return torch.empty_like(st).index_copy_(1, order.to(torch.int64), st)


def trellis_dequantize(stream: torch.Tensor, order: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, k: int, zero_frac: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[E, O, C]`` of a trellis-coded weight: ``stream [E, S, C, W]`` int32 (sequence ``j`` of column
    ``c`` holds the weights at positions ``j n .. j n + n - 1``), ``order [O]`` int32 (the row at each position;
    positions from ``O`` on are padding), ``table [2^L]`` float32, ``scale [E, O, G]``, ``zero [E, O, G]`` uint8
    (``zero / 2^zero_frac``): weight ``(table[state] - zero) * scale``."""
    L = table.numel().bit_length() - 1
    v = table.float()[trellis_row_states(stream, order, L, k)]
    return dequantize(v, scale, zero.float() / 2 ** zero_frac, dtype)
