"""Stateless codecs: quantized weights <-> packed tensors (format version 1; see docs/FORMAT.md).

A quantized weight is integer codes ``q [E, O, C]`` (E = 1 for a plain linear) with per-group ``scale``
and ``zero`` ``[E, O, G]`` (group = ``C / G`` consecutive input columns); its value is ``(q - zero) * scale``.
Packed tensors, with local names (the checkpoint prefixes them with the weight's name):

* ``int8`` / ``int4`` / ``int3`` / ``int2``: ``packed`` int32 ``[E, O, ceil(C*b/32)]`` (dense, LSB-first along
  the input features: compressed-tensors' pack-quantized layout), ``scale`` float16 ``[E, O, G]``,
  ``zero`` uint8 ``[E, O, G]`` for asymmetric grids (symmetric grids have ``zero = 2^(b-1)`` implied).
* ``ternary2``: ternary ``t`` stored as ``t + 2`` in the int2 layout (compressed-tensors' symmetric int2:
  codes {-1, 0, 1}), ``scale`` float16; value ``t * scale``.
* ``ternary-b3``: ``trits`` uint8 ``[E, O, ceil(C/5)]``, five trits per byte (GGUF TQ1_0's base-3 encoding),
  ``scale`` float16; value ``t * scale``. 1.6 bits per weight + 16 / group for the scales.

Every packed form also carries ``shape`` int64 ``[3]`` (E, O, C). ``decode`` returns the codes and
parameters exactly; dequantization is in ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.formats.bitpack import pack_bits, pack_trits, packed_width, unpack_bits, unpack_trits
from moecompress.registry import Registry

__all__ = ["CODECS", "Codec", "decode", "encode", "packed_bits_per_weight"]


@dataclass(frozen=True)
class Codec:
    name: str
    bits: int  # stored bits per code (ternary-b3: 8/5, reported as 1.6)
    ternary: bool = False
    base3: bool = False

    def bits_per_code(self) -> float:
        return 1.6 if self.base3 else float(self.bits)


CODECS: Registry[Codec] = Registry("codec")
for _b in (8, 4, 3, 2):
    CODECS.add(f"int{_b}", Codec(f"int{_b}", _b))
CODECS.add("ternary2", Codec("ternary2", 2, ternary=True))
CODECS.add("ternary-b3", Codec("ternary-b3", 8, ternary=True, base3=True))


ROWS_ELEMENTS = 1 << 22  # codes packed at a time: packing works in int64, 8 bytes per code


def _by_rows(pack, codes: torch.Tensor) -> torch.Tensor:
    """``pack`` (a per-row packer of int64 codes) over ``codes [E, O, C]`` a slice of rows at a time, so
    packing a layer's experts needs a few times ``ROWS_ELEMENTS`` bytes of int64 rather than of the whole layer
    (each row packs alone: the result is the same as in one call)."""
    E, O, C = codes.shape
    flat = codes.reshape(E * O, C)
    step = max(1, ROWS_ELEMENTS // max(C, 1))
    parts = [pack(flat[a:a + step].to(torch.int64)) for a in range(0, E * O, step)]
    return torch.cat(parts).reshape(E, O, -1) if parts else pack(flat.to(torch.int64)).reshape(E, O, -1)


def encode(codec: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           symmetric: bool) -> dict[str, torch.Tensor]:
    """Packed tensors for codes ``[E, O, C]`` (uint8; ternary codes are ``t + 1``)."""
    c = CODECS.get(codec)
    if codes.dim() == 2:
        codes, scale, zero = codes[None], scale[None], zero[None]
    E, O, C = codes.shape
    out = {"shape": torch.tensor([E, O, C], dtype=torch.int64), "scale": scale.to(torch.float16).contiguous()}
    if c.ternary:
        if c.base3:
            out["trits"] = _by_rows(lambda q: pack_trits(q - 1), codes)
        else:
            out["packed"] = _by_rows(lambda q: pack_bits(q + 1, 2), codes)
        return out
    out["packed"] = _by_rows(lambda q: pack_bits(q, c.bits), codes)
    if not symmetric:
        out["zero"] = zero.to(torch.uint8).contiguous()
    return out


def decode(codec: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [E, O, C] int64, scale [E, O, G] float32, zero [E, O, G] float32)`` from packed tensors."""
    c = CODECS.get(codec)
    E, O, C = (int(v) for v in tensors["shape"])
    scale = tensors["scale"].float()
    if c.ternary:
        t = unpack_trits(tensors["trits"], C) if c.base3 else unpack_bits(tensors["packed"], 2, C).to(torch.int64) - 2
        codes = t.to(torch.int64) + 1
        return codes, scale, torch.ones_like(scale)
    codes = unpack_bits(tensors["packed"], c.bits, C).to(torch.int64)
    zero = tensors["zero"].float() if "zero" in tensors else torch.full_like(scale, float(2 ** (c.bits - 1)))
    return codes, scale, zero


def packed_bits_per_weight(codec: str, columns: int, group: int, symmetric: bool) -> float:
    """Storage bits per weight, scales (16 bits per group) and zero points (8 bits per group) included."""
    c = CODECS.get(codec)
    groups = max(1, columns // group) if group > 0 else 1
    code_bits = (8 * ((columns + 4) // 5) if c.base3 else 32 * packed_width(columns, c.bits)) / columns
    extra = 16 * groups / columns + (0 if (symmetric or c.ternary) else 8 * groups / columns)
    return code_bits + extra
