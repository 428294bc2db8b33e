"""Pure-torch reference kernels: the specification of every codec's decoding, and the CPU path.

Bit layouts (docs/FORMAT.md): ``b``-bit codes are packed densely and LSB-first along the input features
into int32 words (code ``k`` at bits ``[k*b, k*b + b)`` of the row's little-endian bit stream, crossing word
boundaries when needed); ternary values may instead be packed five per byte in base 3 (GGUF TQ1_0: trit
``n`` of a byte is ``((byte * 3^n) mod 256) * 3 >> 8``, minus 1). A weight is ``(q - zero) * scale`` per
group of ``C / G`` input columns.

Shapes: ``packed [E, O, W]`` int32 or ``trits [E, O, ceil(C/5)]`` uint8, ``scale``/``zero`` ``[E, O, G]``,
activations ``x [T, C]``.

Every function works on any device: tensors it makes are made on its input's device, and nothing reads a
device value back to the host (no ``.item()`` / ``.tolist()``), so the functions can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize", "grouped_experts_matmul", "packed_matmul", "unpack_bits", "unpack_trits"]

def unpack_bits(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """``[..., W]`` int32 words -> ``[..., columns]`` uint8 codes."""
    *lead, W = packed.shape
    if W != (columns * bits + 31) // 32:
        raise ValueError(f"{W} words cannot hold {columns} {bits}-bit codes")
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
