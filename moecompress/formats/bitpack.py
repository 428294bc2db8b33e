"""Bit packing, pure torch, for codes laid out along the last axis (input features).

``pack_bits``: unsigned ``b``-bit codes into int32 words, dense and LSB-first across word boundaries,
exactly compressed-tensors' ``pack-quantized`` layout since 0.18 (for b in {1, 2, 4, 8} identical to the
older word-aligned layout): code ``k`` occupies bits ``[k*b, k*b + b)`` of the row's little-endian bit
stream, word ``(k*b) // 32``; a code crossing a word boundary continues in the next word's low bits.
Rows are padded with zero bits; shape ``[..., C] -> [..., ceil(C*b/32)]``.

``pack_trits``: ternary values ``t`` in {-1, 0, 1}, five per byte, GGUF TQ1_0's base-3 encoding: for trits
``t_0..t_4`` (element ``5j + n`` is trit ``n`` of byte ``j``), ``v = sum_n (t_n + 1) * 3^(4-n)`` and
``byte = ceil(v * 256 / 243)``; decoding trit ``n`` is ``((byte * 3^n) mod 256) * 3 >> 8`` minus 1 (no
division, no table). Rows are padded with ``t = 0``; shape ``[..., C] -> [..., ceil(C/5)]`` uint8.
"""

from __future__ import annotations

import torch

from moecompress.kernels.reference import unpack_bits, unpack_trits  # the decoding side is the kernels' spec

__all__ = ["pack_bits", "pack_trits", "packed_width", "unpack_bits", "unpack_trits"]

_POW3 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int64)  # 3^(4-n)


def packed_width(columns: int, bits: int) -> int:
    return (columns * bits + 31) // 32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., C]`` unsigned codes (< 2^bits) -> ``[..., ceil(C*bits/32)]`` int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, C = c.shape
    W = packed_width(C, bits)
    if 32 % bits == 0:  # whole codes per word: OR each slot into place (a few times faster than the scatter)
        per = 32 // bits
        flat = torch.nn.functional.pad(c.reshape(-1, C).to(torch.int32), (0, W * per - C)).reshape(-1, W, per)
        out = flat[..., 0].clone()
        for j in range(1, per):
            out |= flat[..., j] << (bits * j)  # the top slot lands in the sign bit: two's complement int32
        return out.reshape(*lead, W)
    pos = torch.arange(C, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    flat = c.reshape(-1, C)
    out = torch.zeros(flat.shape[0], W + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand_as(flat), (flat << off) & 0xFFFFFFFF)
    spill = (flat >> (32 - off)) * (off + bits > 32)  # high bits continuing in the next word
    out.scatter_add_(1, (word + 1).expand_as(flat), spill)
    out = out[:, :W]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # two's complement int32
    return out.to(torch.int32).reshape(*lead, W)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` values in {-1, 0, 1} -> ``[..., ceil(C/5)]`` uint8, five trits per byte (TQ1_0)."""
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
        raise ValueError("trits must be -1, 0 or 1")
    *lead, C = t.shape
    B = (C + 4) // 5
    pad = torch.zeros(*lead, B * 5 - C, dtype=torch.int64)
    groups = torch.cat([t, pad], dim=-1).reshape(*lead, B, 5) + 1  # digits 0..2
    v = (groups * _POW3).sum(-1)  # 0..242
    return ((v * 256 + 242) // 243).to(torch.uint8)  # ceil(v * 256 / 243)
