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
    "hf", "a plain transformers checkpoint (safetensors): what pruning and fake-quant write; loads anywhere", "16"))
