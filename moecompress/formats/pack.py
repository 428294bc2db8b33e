"""Writing a quantized model in the packed format (docs/FORMAT.md), one decoder layer at a time.

`PackedWriter.add` takes a part of the model (one decoder layer's tensors by in-memory module name, or the
tensors outside the layers) with the record entries of the weights quantized in it: every recorded weight is
replaced by its codec's packed tensors (named after the in-memory module, so transformers loads them without
conversion; routed experts as ``<experts>.<proj>_<packed|trits|scale|zero|shape>`` plus dense
``<experts>.<proj>_bias``); everything else (norms, embeddings, routers, biases, unquantized linears) is
written as is, in the checkpoint's dtype (score-correction biases stay float32). The tensors go to disk at
once (`io.CheckpointWriter`, bounded shards); only the small per-module specs, checksums and sizes are kept
until `close` writes them into ``config.json``'s ``quantization_config`` (one `formats.spec.ModuleSpec` per
packed module).

Routers quantized by ``--router-bits`` stay dense (their values are already on the quantization grid).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import FORMAT_VERSION, QUANT_METHOD, checksum
from moecompress.formats.codecs import CODECS, encode, encoded_bits_per_weight, int_codec, packed_bits_per_weight
from moecompress.formats.quant_record import QuantRecord
from moecompress.formats.spec import PROJS, ModuleSpec
from moecompress.io.writer import CheckpointWriter
from moecompress.types import Activation

__all__ = ["PackedExpertsInfo", "PackedWriter"]

@dataclass(frozen=True)
class PackedExpertsInfo:
    """What the format needs to know of one routed-experts module besides its codes: the dense per-projection
    biases ``[E, O]`` (None: no biases) and the activation."""

    biases: dict[str, torch.Tensor | None]
    activation: Activation


def _codec(meta: dict | None, ternary_codec: str) -> tuple[str, bool]:
    if meta is None:
        raise MoecompressError("the quantization record has weights but no scheme", "quantize the model again")
    if meta.get("kind") == "ternary":
        return ternary_codec, not meta.get("two_scales", False)
    code = meta.get("code") or {}
    if code.get("kind") == "trellis" and meta["bits"] in code.get("widths", ()):
        return f"trellis{meta['bits']}", False
    return f"int{meta['bits']}", bool(meta.get("symmetric", False))


def _zero_form(codec: str, zero: torch.Tensor, symmetric: bool) -> str:
    """An integer codec's ``-fz`` form where the zero points are not all integers (`quantize
    --fractional-zeros`); integer zeros keep the integer codec (a version 2 checkpoint)."""
    if symmetric or not codec.startswith("int") or bool((zero == zero.round()).all()):
        return codec
    fz = int_codec(CODECS.get(codec).bits, True)
    if fz == codec:
        raise MoecompressError(f"{codec} weights have fractional zero points, which it cannot store",
                               "quantize again without --fractional-zeros")
    return fz


TERNARY_CODECS = ("ternary-b3", "ternary2", "ternary-dict", "auto")


def _encode(codec: str, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, symmetric: bool,
            neg: torch.Tensor | None, record: QuantRecord | None = None,
            name: str = "") -> tuple[str, dict[str, torch.Tensor]]:
    """``(codec, tensors)``; ``auto`` (ternary weights): the smaller of ``ternary-b3`` and ``ternary-dict``; a
    trellis codec reads the weight's row order and table from ``record``."""
    if CODECS.get(codec if codec != "auto" else "ternary-dict").trellis:
        order, table = (record.tensors.get(f"{name}.{x}") for x in ("order", "table"))
        if order is None or table is None or q.dtype != torch.int16:
            raise MoecompressError(f"the quantization record's {name} is not trellis-coded, but the scheme says "
                                   f"{codec}", "quantize the model again")
        try:
            return codec, encode(codec, q, s, z, symmetric, order=order.cpu(), table=table.cpu())
        except ValueError as e:
            raise MoecompressError(f"cannot pack {name} as {codec}: {e}", "quantize the model again") from None
    if codec != "auto":
        codec = _zero_form(codec, z, symmetric)
        return codec, encode(codec, q, s, z, symmetric, neg)
    options = [(c, encode(c, q, s, z, symmetric, neg)) for c in ("ternary-b3", "ternary-dict")]
    return min(options, key=lambda o: encoded_bits_per_weight(o[1]))


def _bits(codec: str, tensors: dict[str, torch.Tensor], columns: int, group: int, symmetric: bool) -> float:
    if CODECS.get(codec).dict or CODECS.get(codec).trellis:
        return encoded_bits_per_weight(tensors)
    return packed_bits_per_weight(codec, columns, group, symmetric)


class PackedWriter:
    """A packed checkpoint written part by part into ``directory`` (see the module doc).

    ``stored``: the checkpoint's dtype for dense floating tensors; ``meta``: the stage's quantization metadata
    (``experts`` / ``weights`` schemes, ``rotation``, ``activations``); ``ternary_codec``: the codec of ternary
    weights (``ternary-b3``, ``ternary2``, ``ternary-dict`` or ``auto``: per weight the smaller of b3 and dict)."""

    def __init__(self, directory: str | Path, stored: torch.dtype, meta: dict[str, Any],
                 ternary_codec: str = "ternary-b3", shard_bytes: int = 1 << 30) -> None:
        if ternary_codec not in TERNARY_CODECS:
            raise MoecompressError(f"{ternary_codec!r} is not a codec for ternary weights",
                                   f"use one of {', '.join(TERNARY_CODECS)}")
        self.directory = Path(directory)
        self.stored, self.meta, self.ternary_codec = stored, meta, ternary_codec
        self.writer = CheckpointWriter(self.directory, shard_bytes)
        self.modules: dict[str, ModuleSpec] = {}
        self.checksums: dict[str, str] = {}
        self.stats: dict[str, Any] = {"modules": {}, "packed_bytes": 0, "dense_equivalent_bytes": 0}

    def _dense(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != self.stored and "correction_bias" not in name:
            return t.to(self.stored)
        return t

    def _scheme(self, kind: str, bits: int | None) -> dict | None:
        """The metadata's ``experts`` / ``weights`` scheme, at ``bits`` instead of its own width when given."""
        scheme = self.meta.get(kind)
        return scheme if bits is None or scheme is None else {**scheme, "bits": bits}

    def add(self, tensors: dict[str, torch.Tensor], record: QuantRecord | None = None,
            experts: dict[str, PackedExpertsInfo] | None = None, bits: int | None = None) -> None:
        """Write ``tensors`` (model names), with the weights ``record`` holds packed. ``experts``: the routed
        experts modules among them, by module path; ``bits``: the integer width of every packed weight here
        (a layer of its own width), instead of the metadata's."""
        record = record if record is not None else QuantRecord()
        experts = experts or {}
        names = [n for n in record.weights() if not n.endswith(":router")]  # routers stay dense
        # what is written packed is never converted to a dense copy (a layer's experts are most of its bytes)
        packed_prefixes = tuple(f"{path}." for path in experts if any(n.startswith(path + ":") for n in names))
        packed_linears = {f"{n}.weight" for n in names if ":" not in n}
        sd: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in tensors.items():
            if v.numel() and v.data_ptr() in seen:  # tied weights are written once
                continue
            seen.add(v.data_ptr())
            if k in packed_linears or k.startswith(packed_prefixes):
                continue
            sd[k] = self._dense(k, v.detach())
        packed: dict[str, torch.Tensor] = {}
        for path, info in experts.items():
            projs = [n for n in names if n.startswith(path + ":")]
            if not projs:
                continue
            codec, symmetric = _codec(self._scheme("experts", bits), self.ternary_codec)
            shape = None
            chosen, lengths = {}, {}
            for p in PROJS:
                name = f"{path}:{p}"
                if name not in projs:
                    raise MoecompressError(f"the quantization record lacks {name}", "quantize the model again")
                q, s, z = (record.tensors[f"{name}.{x}"] for x in ("codes", "scales", "zeros"))
                neg = record.tensors.get(f"{name}.scales_neg")
                neg = None if neg is None else neg.cpu()
                chosen[p], enc = _encode(codec, q.cpu(), s.cpu(), z.cpu(), symmetric, neg, record, name)
                for local, t in enc.items():
                    packed[f"{path}.{p}_{local}"] = t
                if "codewords" in enc:
                    lengths[p] = (enc["codewords"].numel(), int(enc["dict"][0]))
                b = info.biases.get(p)
                if b is not None:
                    sd[f"{path}.{p}_bias"] = b.detach().to(self.stored).contiguous()
                E, O, C = q.shape
                if p == "gate":
                    shape = [E, O, C]
                bpw = _bits(chosen[p], enc, C, C // s.shape[-1], symmetric)
                self.stats["modules"][name] = {"codec": chosen[p], "bits_per_weight": bpw, "weights": q.numel()}
            rotation = self.meta.get("rotation") or {}
            self.modules[path] = ModuleSpec.experts(
                shape, chosen, shape[2] // record.tensors[f"{path}:gate.scales"].shape[-1],
                symmetric, info.biases.get("gate") is not None, info.activation,
                rotation.get("seed") if rotation.get("intermediate") else None, lengths)
        for name in names:
            if ":" in name:
                continue
            codec, symmetric = _codec(self._scheme("weights", bits), self.ternary_codec)
            if CODECS.get(codec if codec != "auto" else "ternary-dict").dict:
                raise MoecompressError(f"{name}: ternary-dict is written for routed experts only",
                                       "use --codec ternary-b3 for ternary linears")
            q, s, z = (record.tensors[f"{name}.{x}"] for x in ("codes", "scales", "zeros"))
            if f"{name}.weight" not in tensors:
                raise MoecompressError(f"the quantization record has {name}, which this part of the model lacks",
                                       "quantize the model again")
            codec, enc = _encode(codec, q.cpu(), s.cpu(), z.cpu(), symmetric, None, record, name)
            for local, t in enc.items():
                packed[f"{name}.weight_{local}"] = t
            _, O, C = q.shape
            self.modules[name] = ModuleSpec.linear((1, O, C), codec, C // s.shape[-1], symmetric,
                                                   f"{name}.bias" in sd)
            self.stats["modules"][name] = {"codec": codec, "weights": q.numel(),
                                           "bits_per_weight": _bits(codec, enc, C, C // s.shape[-1], symmetric)}
        for k, t in packed.items():  # every packed tensor has its checksum (floating ones as float16)
            self.checksums[k] = checksum(t.to(torch.float16) if t.is_floating_point() else t)
        sd.update(packed)
        self.writer.add_all(sd)

    def close(self, config: dict[str, Any]) -> dict[str, Any]:
        """Finish the shards and write ``config.json`` from ``config`` (the model's, as a dict) with the packed
        format's ``quantization_config`` and ``dtype``; returns size statistics."""
        self.writer.close()
        cfg = dict(config)
        cfg["dtype"] = str(self.stored).replace("torch.", "")
        # the lowest version that has every codec used (4: trellis, 3: -fz, else 2): older readers keep reading
        # what they can
        used = [CODECS.get(c) for m in self.modules.values() for c in m.all_codecs]
        version = FORMAT_VERSION if any(c.trellis for c in used) else 3 if any(c.zero_frac for c in used) else 2
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": version,
                                      "modules": {k: m.to_dict() for k, m in self.modules.items()},
                                      "checksums": self.checksums,
                                      "activations": self.meta.get("activations")}
        (self.directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        item = torch.empty(0, dtype=self.stored).element_size()
        for entry in self.stats["modules"].values():
            self.stats["packed_bytes"] += entry["bits_per_weight"] * entry["weights"] / 8
            self.stats["dense_equivalent_bytes"] += entry["weights"] * item
        self.stats["file_bytes"] = sum(f.stat().st_size for f in self.directory.glob("model*.safetensors"))
        return self.stats
