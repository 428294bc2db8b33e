"""The quantization record written next to a fake-quantized checkpoint.

The record holds, per quantized weight ``NAME`` (a module path; routed experts as ``<experts module
path>:<gate|up|down>``, a quantized router as ``<router module path>:router``): ``NAME.codes`` uint8
``[E, O, C]`` (E = 1 for a plain linear), ``NAME.scales`` float32 ``[E, O, G]``, ``NAME.zeros`` float32
``[E, O, G]`` (two-level ternary grids such as QMoE's add ``NAME.scales_neg`` ``[E, O, G]``: code 0 is
``-scales_neg``, code 2 ``scales``; trellis-coded weights (`algorithms.trellis`) have int16 states as codes, whose
values are ``NAME.table[codes]`` (float32 ``[2^L]``), and ``NAME.order`` int32 ``[O]``, the rows in sequence
order); and smoothing vectors ``<layer>.smooth.attn`` ``[H]``, ``<layer>.smooth.moe`` ``[H]``,
``<layer>.smooth.down`` ``[E, I]`` (already folded into the checkpoint's weights and norms; kept for the
record). Dequantized weights are ``(codes - zeros) * scales`` per group of ``group_size`` input columns. The
packed format is built from the codes, so it is exact even though the checkpoint stores the dequantized
weights in bf16. The matching metadata (scheme, bits, group size, activation quantization) lives in
``moecompress.json`` under ``"quantization"``.

Files: ``quantization.safetensors``, or, when the record is larger than one shard (a real model's codes take
about one byte per parameter), ``quantization-0000i-of-0000n.safetensors`` plus
``quantization.safetensors.index.json`` (``{"weight_map": {tensor: file}}``, as a model's index). The record
is written one decoder layer at a time (`RecordWriter`) and never held whole while quantizing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moecompress.errors import MoecompressError
from moecompress.io.writer import CheckpointWriter

__all__ = ["RECORD_FILE", "RECORD_INDEX", "QuantRecord", "RecordWriter", "is_record_file"]

RECORD_FILE = "quantization.safetensors"
RECORD_INDEX = "quantization.safetensors.index.json"
_METADATA = {"format": "moecompress-quant-record"}
_RECORD_NAME = re.compile(r"^quantization(-\d{5}-of-\d{5})?\.safetensors$")


def is_record_file(name: str) -> bool:
    """Whether a file name is (a shard of) the quantization record rather than model weights."""
    return bool(_RECORD_NAME.match(name))


@dataclass
class QuantRecord:
    """Record entries in memory: one decoder layer's while quantizing, or a whole record read back (`load`)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            scales_neg: torch.Tensor | None = None, order: torch.Tensor | None = None,
            table: torch.Tensor | None = None) -> None:
        """``order`` and ``table``: a trellis-coded weight (its codes are int16 states)."""
        trellis = table is not None
        self.tensors[f"{name}.codes"] = codes.to(torch.int16 if trellis else torch.uint8).contiguous()
        if trellis:
            self.tensors[f"{name}.order"] = order.to(torch.int32).contiguous()
            self.tensors[f"{name}.table"] = table.float().contiguous()
        self.tensors[f"{name}.scales"] = scales.float().contiguous()
        self.tensors[f"{name}.zeros"] = zeros.float().contiguous()
        if scales_neg is not None:  # two-level ternary grids (qmoe): t = -1 is -scales_neg
            self.tensors[f"{name}.scales_neg"] = scales_neg.float().contiguous()

    def add_vector(self, name: str, v: torch.Tensor) -> None:
        self.tensors[name] = v.float().contiguous()

    def weights(self) -> list[str]:
        return sorted(k[: -len(".codes")] for k in self.tensors if k.endswith(".codes"))

    def dequantize(self, name: str, group_size: int) -> torch.Tensor:
        q, s, z = (self.tensors[f"{name}.{p}"].float() for p in ("codes", "scales", "zeros"))
        table = self.tensors.get(f"{name}.table")
        if table is not None:  # trellis states -> table values
            q = table.float()[self.tensors[f"{name}.codes"].long()]
        E, O, C = q.shape
        G = s.shape[-1]
        neg = self.tensors.get(f"{name}.scales_neg")
        if neg is not None:
            q = q.view(E, O, G, C // G)
            return torch.where(q > 1, s[..., None], torch.where(q < 1, -neg.float()[..., None], 0.0)).view(E, O, C)
        return ((q.view(E, O, G, C // G) - z[..., None]) * s[..., None]).view(E, O, C)

    def save(self, directory: Path) -> None:
        """Write the whole record (``quantization.safetensors``; shards past 1 GiB)."""
        w = RecordWriter(directory)
        w.add(self)
        w.close()

    @classmethod
    def load(cls, directory: Path) -> QuantRecord:
        """Read a record back: the single file, or every shard its index lists."""
        directory = Path(directory)
        index = directory / RECORD_INDEX
        try:
            if index.is_file():
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            else:
                files = [RECORD_FILE]
            tensors: dict[str, torch.Tensor] = {}
            for name in files:
                f = directory / name
                tensors.update(load_file(str(f)))
            return cls(tensors)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            where = index if index.is_file() else directory / RECORD_FILE
            raise MoecompressError(f"cannot read the quantization record {str(where)!r} ({e.__class__.__name__})",
                                   "quantize the model again") from None


class RecordWriter:
    """Write a record as it comes, one decoder layer's `QuantRecord` at a time, into ``directory``: at most
    one shard (``shard_bytes``) is held in memory; see the module doc for the files."""

    def __init__(self, directory: str | Path, shard_bytes: int = 1 << 30) -> None:
        self._writer = CheckpointWriter(directory, shard_bytes, prefix="quantization", metadata=dict(_METADATA))

    def add(self, record: QuantRecord) -> None:
        self._writer.add_all(record.tensors)

    def close(self) -> str:
        """Finish the files; returns the name to read the record from (the file, or the index)."""
        files = self._writer.close()
        return RECORD_FILE if len(files) == 1 else RECORD_INDEX
