"""Output formats moecompress writes (packed codecs register here as they are added), and the packed format's
per-module record (`ModuleSpec`, one entry of ``quantization_config.modules`` in ``config.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from moecompress.registry import Registry
from moecompress.types import Activation

__all__ = ["FORMATS", "PROJS", "FormatSpec", "ModuleSpec", "module_specs"]

PROJS = ("gate", "up", "down")  # the projections of a routed expert, in the order the format lists them


@dataclass(frozen=True)
class ModuleSpec:
    """One packed module as ``config.json`` records it (docs/FORMAT.md, format versions 1 and 2)::

        linear:  {"type": "linear", "shape": [1, O, C], "codec", "group_size", "symmetric", "bias"}
        experts: {"type": "experts", "shape": [E, I, H], "codecs": {proj: codec}, "group_size", "symmetric",
                  "bias", "activation": {"kind", "fn", "alpha", "limit"}, "intermediate_rotation_seed"}

    ``shape`` is ``(E, O, C)``: E = 1 for a linear; for experts the gate/up shape ``(E, I, H)`` (down is
    ``(E, H, I)``). ``group_size`` counts columns per scale (-1 / 0: one group per row); ``symmetric``: no
    zero point stored; ``bias``: dense biases stored beside the packed tensors (``P.bias``, ``P.<proj>_bias``);
    ``intermediate_rotation_seed``: the experts' down projections are stored in that rotated basis (None: not).
    ``dict`` (version 2, only when a weight uses ``ternary-dict``): ``{proj: [codewords, dictionary entries]}``,
    the lengths of its variable-size tensors (a linear's key is ``weight``); ``symmetric`` false on a ternary codec
    means a two-level grid (``scale_neg`` stored). `to_dict` writes exactly these keys, so the JSON of a version 1
    module is unchanged.
    """

    type: Literal["linear", "experts"]
    shape: tuple[int, int, int]
    group_size: int
    symmetric: bool
    bias: bool
    codec: str | None = None  # linear
    codecs: Mapping[str, str] | None = None  # experts: proj -> codec
    activation: Activation | None = None  # experts
    intermediate_rotation_seed: int | None = None  # experts
    dict_sizes: Mapping[str, tuple[int, int]] | None = None  # ternary-dict weights: proj -> (codewords, entries)

    @classmethod
    def linear(cls, shape: tuple[int, int, int], codec: str, group_size: int, symmetric: bool,
               bias: bool) -> ModuleSpec:
        return cls("linear", tuple(shape), group_size, symmetric, bias, codec=codec)

    @classmethod
    def experts(cls, shape: tuple[int, int, int], codecs: Mapping[str, str], group_size: int, symmetric: bool,
                bias: bool, activation: Activation, intermediate_rotation_seed: int | None = None,
                dict_sizes: Mapping[str, tuple[int, int]] | None = None) -> ModuleSpec:
        return cls("experts", tuple(shape), group_size, symmetric, bias, codecs=dict(codecs), activation=activation,
                   intermediate_rotation_seed=intermediate_rotation_seed,
                   dict_sizes=None if not dict_sizes else {k: tuple(v) for k, v in dict_sizes.items()})

    @property
    def all_codecs(self) -> tuple[str, ...]:
        """The codec of every packed weight of the module (one for a linear; gate, up, down for experts)."""
        return (self.codec,) if self.type == "linear" else tuple(self.codecs[p] for p in PROJS)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleSpec:
        """Read one entry of ``quantization_config.modules`` (KeyError / ValueError when it is malformed)."""
        kind = d["type"]
        if kind == "linear":
            return cls.linear(tuple(d["shape"]), d["codec"], d["group_size"], d["symmetric"], d["bias"])
        if kind == "experts":
            spec = cls.experts(tuple(d["shape"]), d["codecs"], d["group_size"], d["symmetric"], bool(d.get("bias")),
                               Activation(**d["activation"]), d.get("intermediate_rotation_seed"), d.get("dict"))
            missing = [p for p in PROJS if d["codecs"][p] == "ternary-dict" and p not in (spec.dict_sizes or {})]
            if missing:
                raise ValueError(f"ternary-dict weights {missing} have no 'dict' lengths")
            return spec
        raise ValueError(f"unknown packed module type {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry (lists, not tuples)."""
        out: dict[str, Any] = {"type": self.type, "shape": list(self.shape)}
        if self.type == "linear":
            out["codec"] = self.codec
        else:
            out["codecs"] = dict(self.codecs)
        out.update(group_size=self.group_size, symmetric=self.symmetric, bias=self.bias)
        if self.type == "experts":
            out["activation"] = asdict(self.activation)
            out["intermediate_rotation_seed"] = self.intermediate_rotation_seed
        if self.dict_sizes:
            out["dict"] = {k: list(v) for k, v in self.dict_sizes.items()}
        return out


def module_specs(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, ModuleSpec]:
    """``quantization_config.modules`` as typed specs, by module path."""
    return {path: ModuleSpec.from_dict(d) for path, d in modules.items()}


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
FORMATS.add("packed:ternary-dict", FormatSpec(
    "packed:ternary-dict", "moecompress packed v2, sparse ternary in QMoE's dictionary code (uint16 codewords over "
    "runs of up to 28 trits, a row index, a per-weight dictionary)", "~0.8 at 90 % zeros + 32/row + scales"))
FORMATS.add("compressed-tensors", FormatSpec(
    "compressed-tensors", "export target (moecompress export --to compressed-tensors): symmetric W4A16 / W8A16 "
    "pack-quantized", "4 + 16/g / 8 + 16/g"))
