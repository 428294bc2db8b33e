"""Output formats moecompress writes. Packed codecs register here as they are added."""

from __future__ import annotations

from dataclasses import dataclass

from moecompress.registry import Registry

__all__ = ["FORMATS", "FormatSpec"]


@dataclass(frozen=True)
class FormatSpec:
    name: str
    description: str
    bits: str  # bits per expert weight, as text ("16", "4 + scales", ...)


FORMATS: Registry[FormatSpec] = Registry("format")
FORMATS.add("hf", FormatSpec(
    "hf", "a plain transformers checkpoint (safetensors): what pruning writes; loads anywhere", "16"))
FORMATS.add("fake-quant", FormatSpec(
    "fake-quant", "dequantized weights in a plain checkpoint + quantization.safetensors (codes, scales, zeros)",
    "16 (+ record)"))
for _b in (8, 4, 3, 2):
    FORMATS.add(f"packed:int{_b}", FormatSpec(
        f"packed:int{_b}", f"moecompress packed v1, {_b}-bit codes, dense LSB-first int32 along inputs "
        "(compressed-tensors pack-quantized layout), fp16 group scales", f"{_b} + 16/g"))
FORMATS.add("packed:ternary2", FormatSpec(
    "packed:ternary2", "moecompress packed v1, ternary {-1,0,1} in the int2 layout (compressed-tensors symmetric int2)",
    "2 + 16/g"))
FORMATS.add("packed:ternary-b3", FormatSpec(
    "packed:ternary-b3", "moecompress packed v1, ternary, five trits per byte in base 3 (GGUF TQ1_0 encoding)",
    "1.6 + 16/g"))
FORMATS.add("compressed-tensors", FormatSpec(
    "compressed-tensors", "export target (moecompress export --to compressed-tensors): symmetric W4A16 / W8A16 "
    "pack-quantized", "4 + 16/g / 8 + 16/g"))
