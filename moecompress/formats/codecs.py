"""Stateless codecs: quantized weights <-> packed tensors (format version 2; see docs/FORMAT.md).

A quantized weight is integer codes ``q [E, O, C]`` (E = 1 for a plain linear) with per-group ``scale``
and ``zero`` ``[E, O, G]`` (group = ``C / G`` consecutive input columns); its value is ``(q - zero) * scale``.
Packed tensors, with local names (the checkpoint prefixes them with the weight's name):

* ``int8`` / ``int4`` / ``int3`` / ``int2``: ``packed`` int32 ``[E, O, ceil(C*b/32)]`` (dense, LSB-first along
  the input features: compressed-tensors' pack-quantized layout), ``scale`` float16 ``[E, O, G]``,
  ``zero`` uint8 ``[E, O, G]`` for asymmetric grids (symmetric grids have ``zero = 2^(b-1)`` implied).
* ``int4-fz`` / ``int3-fz`` / ``int2-fz`` (version 3): the same, with fractional zero points: the byte holds
  ``zero * 2^(8-b)`` (zeros in steps of ``2^-(8-b)`` on ``[0, 2^b)``; `quant_grid.fractional_zero_bits`), so the
  grid's levels need not include 0. Same size as the integer form.
* ``ternary2``: ternary ``t`` stored as ``t + 2`` in the int2 layout (compressed-tensors' symmetric int2:
  codes {-1, 0, 1}), ``scale`` float16; value ``t * scale``.
* ``ternary-b3``: ``trits`` uint8 ``[E, O, ceil(C/5)]``, five trits per byte (GGUF TQ1_0's base-3 encoding),
  ``scale`` float16; value ``t * scale``. 1.6 bits per weight + 16 / group for the scales.
* ``ternary-dict`` (version 2): QMoE's dictionary code (formats/dictcode.py): ``dict`` int32 ``[10]`` (the
  dictionary's size and its nine integer symbol costs: the table itself is rebuilt from them), ``codewords``
  uint16 ``[n]``, ``row_index`` int32 ``[E O + 1]``, ``scale`` float16; below 1 bit per weight at about 90 %
  zeros, more than base 3 below about 70 %.

* ``trellis2`` / ``trellis3`` / ``trellis4`` (version 4): QTIP's bitshift trellis code (`algorithms.trellis`;
  formats/trellis_code.py): ``stream`` int32 ``[E, S, C, 2k]`` (per column, ``S = ceil(O / 64)`` circular
  streams of 64 k bits, one per sequence of 64 rows), ``order`` int32 ``[O]`` (the rows in sequence order),
  ``table`` float32 ``[1024]`` (10-bit states), ``scale`` float16, ``zero`` uint8 (``zero * 32``); value
  ``(table[state] - zero) * scale``. The size of int<k> with byte zeros, plus 4 KiB and 4 bytes per row.

Ternary weights of two-level grids (QMoE's ``{min, 0, max}``; the module's ``symmetric`` is false) also carry
``scale_neg`` float16 ``[E, O, G]``: ``t = 1`` is ``scale``, ``t = -1`` is ``-scale_neg``.

Every packed form also carries ``shape`` int64 ``[3]`` (E, O, C). ``decode`` returns the codes and
parameters exactly; dequantization is in ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.formats.bitpack import pack_bits, pack_trits, packed_width, unpack_bits, unpack_trits
from moecompress.algorithms.trellis import SEQ, STATE_BITS, ZERO_FRAC
from moecompress.formats.dictcode import dict_decode, dict_table, pick_and_encode
from moecompress.formats.trellis_code import trellis_stream
from moecompress.kernels.reference import trellis_row_states
from moecompress.registry import Registry

__all__ = ["CODECS", "Codec", "decode", "encode", "encoded_bits_per_weight", "int_codec", "packed_bits_per_weight",
           "stored_zeros"]


@dataclass(frozen=True)
class Codec:
    name: str
    bits: int  # stored bits per code (ternary-b3: 8/5, reported as 1.6)
    ternary: bool = False
    base3: bool = False
    dict: bool = False  # variable-rate dictionary code (ternary-dict)
    zero_frac: int = 0  # fraction bits of the stored zero points (the -fz codecs: 8 - bits)
    trellis: bool = False  # bitshift trellis code (trellis<k>): states of STATE_BITS bits, sequences of SEQ rows

    def bits_per_code(self) -> float:
        return 1.6 if self.base3 else float(self.bits)


CODECS: Registry[Codec] = Registry("codec")
for _b in (8, 4, 3, 2):
    CODECS.add(f"int{_b}", Codec(f"int{_b}", _b))
for _b in (4, 3, 2):
    CODECS.add(f"int{_b}-fz", Codec(f"int{_b}-fz", _b, zero_frac=8 - _b))
for _b in (2, 3, 4):
    CODECS.add(f"trellis{_b}", Codec(f"trellis{_b}", _b, zero_frac=ZERO_FRAC, trellis=True))
CODECS.add("ternary2", Codec("ternary2", 2, ternary=True))
CODECS.add("ternary-b3", Codec("ternary-b3", 8, ternary=True, base3=True))
CODECS.add("ternary-dict", Codec("ternary-dict", 16, ternary=True, dict=True))


def int_codec(bits: int, fractional_zeros: bool = False) -> str:
    """The integer codec of ``bits``-wide codes (``fractional_zeros``: its ``-fz`` form, where there is one)."""
    return f"int{bits}-fz" if fractional_zeros and f"int{bits}-fz" in CODECS else f"int{bits}"


def stored_zeros(zero: torch.Tensor, zero_frac: int) -> torch.Tensor:
    """Zero points as their uint8 bytes (``zero * 2^zero_frac``); a zero off that grid or out of range is an
    error, never silently rounded."""
    k = zero.double() * 2 ** zero_frac
    if bool((k != k.round()).any()) or bool(((k < 0) | (k > 255)).any()):
        step = "integers" if zero_frac == 0 else f"multiples of 2^-{zero_frac}"
        raise ValueError(f"zero points must be {step} in [0, {255 / 2 ** zero_frac:g}] to be stored "
                         f"(got values from {float(zero.min()):g} to {float(zero.max()):g})")
    return k.to(torch.uint8).contiguous()


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
           symmetric: bool, scale_neg: torch.Tensor | None = None, order: torch.Tensor | None = None,
           table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Packed tensors for codes ``[E, O, C]`` (uint8; ternary codes are ``t + 1``; ``scale_neg``: the negative
    level of two-level ternary grids; trellis codecs: int16 states with the weight's row ``order`` and ``table``)."""
    c = CODECS.get(codec)
    if codes.dim() == 2:
        codes, scale, zero = codes[None], scale[None], zero[None]
        scale_neg = None if scale_neg is None else scale_neg[None]
    E, O, C = codes.shape
    out = {"shape": torch.tensor([E, O, C], dtype=torch.int64), "scale": scale.to(torch.float16).contiguous()}
    if c.trellis:
        if order is None or table is None or table.numel() != 1 << STATE_BITS:
            raise ValueError(f"{codec} needs the weight's row order and its {1 << STATE_BITS}-entry table")
        out["stream"] = trellis_stream(codes, order, STATE_BITS, c.bits, SEQ)
        out["order"] = order.to(torch.int32).contiguous()
        out["table"] = table.float().contiguous()
        out["zero"] = stored_zeros(zero, c.zero_frac)
        return out
    if c.ternary:
        if scale_neg is not None:
            out["scale_neg"] = scale_neg.to(torch.float16).contiguous()
        if c.dict:
            out["dict"], out["codewords"], out["row_index"] = pick_and_encode(
                codes.reshape(E * O, C).to(torch.int64) - 1)
        elif c.base3:
            out["trits"] = _by_rows(lambda q: pack_trits(q - 1), codes)
        else:
            out["packed"] = _by_rows(lambda q: pack_bits(q + 1, 2), codes)
        return out
    out["packed"] = _by_rows(lambda q: pack_bits(q, c.bits), codes)
    if not symmetric:
        out["zero"] = stored_zeros(zero, c.zero_frac)
    return out


def decode(codec: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [E, O, C] int64, scale [E, O, G] float32, zero [E, O, G] float32)`` from packed tensors."""
    c = CODECS.get(codec)
    E, O, C = (int(v) for v in tensors["shape"])
    scale = tensors["scale"].float()
    if c.trellis:  # codes: the states, in row order (values: tensors["table"][codes])
        codes = trellis_row_states(tensors["stream"], tensors["order"], STATE_BITS, c.bits)
        return codes, scale, tensors["zero"].float() / 2 ** c.zero_frac
    if c.dict:
        t = dict_decode(tensors["codewords"], tensors["row_index"], dict_table(tensors["dict"]), E * O, C).view(E, O, C)
        return t.to(torch.int64) + 1, scale, torch.ones_like(scale)
    if c.ternary:
        t = unpack_trits(tensors["trits"], C) if c.base3 else unpack_bits(tensors["packed"], 2, C).to(torch.int64) - 2
        codes = t.to(torch.int64) + 1
        return codes, scale, torch.ones_like(scale)
    codes = unpack_bits(tensors["packed"], c.bits, C).to(torch.int64)
    zero = tensors["zero"].float() / 2 ** c.zero_frac if "zero" in tensors else \
        torch.full_like(scale, float(2 ** (c.bits - 1)))
    return codes, scale, zero


def packed_bits_per_weight(codec: str, columns: int, group: int, symmetric: bool) -> float:
    """Storage bits per weight, scales (16 bits per group) and zero points (8 bits per group) included; a
    two-level ternary grid (``symmetric`` false) stores a second scale. Fixed-rate codecs only (the dictionary
    code's rate depends on the weights: `encoded_bits_per_weight`)."""
    c = CODECS.get(codec)
    if c.dict or c.trellis:
        raise ValueError(f"{codec} has no rate independent of the rows; measure the encoded tensors "
                         "(encoded_bits_per_weight)")
    groups = max(1, columns // group) if group > 0 else 1
    code_bits = (8 * ((columns + 4) // 5) if c.base3 else 32 * packed_width(columns, c.bits)) / columns
    extra = 16 * groups / columns + (8 * groups / columns if not symmetric else 0)
    if c.ternary:
        extra = 16 * groups / columns * (1 if symmetric else 2)
    return code_bits + extra


def encoded_bits_per_weight(tensors: dict[str, torch.Tensor]) -> float:
    """Bits per weight of one encoded weight, everything but its 24-byte ``shape`` counted (dictionary, row
    index, scales)."""
    E, O, C = (int(v) for v in tensors["shape"])
    nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "shape")
    return 8 * nbytes / (E * O * C)
