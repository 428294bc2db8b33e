"""The quantization record written next to a fake-quantized checkpoint.

``quantization.safetensors`` holds, per quantized weight ``NAME`` (a module path; routed experts as
``<experts module path>:<gate|up|down>``, a quantized router as ``<router module path>:router``): ``NAME.codes`` uint8 ``[E, O, C]`` (E = 1 for a plain linear),
``NAME.scales`` float32 ``[E, O, G]``, ``NAME.zeros`` float32 ``[E, O, G]``; and smoothing vectors
``<layer>.smooth.attn`` ``[H]``, ``<layer>.smooth.moe`` ``[H]``, ``<layer>.smooth.down`` ``[E, I]`` (already
folded into the checkpoint's weights and norms; kept for the record). Dequantized weights are
``(codes - zeros) * scales`` per group of ``group_size`` input columns. The packed format is built from
the codes, so it is exact even though the checkpoint stores the dequantized weights in bf16.
The matching metadata (scheme, bits, group size, activation quantization) lives in ``moecompress.json``
under ``"quantization"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.errors import MoecompressError

__all__ = ["RECORD_FILE", "QuantRecord"]

RECORD_FILE = "quantization.safetensors"


@dataclass
class QuantRecord:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
        self.tensors[f"{name}.scales"] = scales.float().contiguous()
        self.tensors[f"{name}.zeros"] = zeros.float().contiguous()

    def add_vector(self, name: str, v: torch.Tensor) -> None:
        self.tensors[name] = v.float().contiguous()

    def weights(self) -> list[str]:
        return sorted(k[: -len(".codes")] for k in self.tensors if k.endswith(".codes"))

    def dequantize(self, name: str, group_size: int) -> torch.Tensor:
        q, s, z = (self.tensors[f"{name}.{p}"].float() for p in ("codes", "scales", "zeros"))
        E, O, C = q.shape
        G = s.shape[-1]
        return ((q.view(E, O, G, C // G) - z[..., None]) * s[..., None]).view(E, O, C)

    def save(self, directory: Path) -> None:
        save_file(self.tensors, str(Path(directory) / RECORD_FILE), metadata={"format": "moecompress-quant-record"})

    @classmethod
    def load(cls, directory: Path) -> QuantRecord:
        f = Path(directory) / RECORD_FILE
        try:
            return cls(load_file(str(f)))
        except (SafetensorError, OSError, FileNotFoundError) as e:
            raise MoecompressError(f"cannot read the quantization record {str(f)!r} ({e.__class__.__name__})",
                                   "quantize the model again") from None
