"""One safetensors shard written as its tensors come, holding none of them in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range, ``__metadata__``) padded with spaces to a multiple of 8, then the tensors' bytes back to back. The
header must come first and depends on every tensor of the shard, so `save_file` needs them all at once: a
writer that buffers a 1 GB shard of a streamed model holds up to 1 GB of finished layers. `SpooledShard`
appends each tensor's bytes to a spool file (one per element size) as soon as it is added, and `finish`
writes the header and the spools, largest element size first (so every tensor stays aligned to its element
size, as `save_file` orders them). Readers see an ordinary safetensors file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

__all__ = ["SpooledShard", "safetensors_dtype"]

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store {dtype}") from None


class SpooledShard:
    """Tensors appended to spool files next to ``path``; `finish` writes ``path`` and removes the spools."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self._spools: dict[int, tuple[Path, object, list[tuple[str, str, list[int], int]]]] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        size = t.element_size()
        if size not in self._spools:
            spool = self.path.with_name(f"{self.path.name}.spool{size}")
            self._spools[size] = (spool, open(spool, "wb"), [])
        _, f, entries = self._spools[size]
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        f.write(memoryview(data))
        n = t.numel() * size
        entries.append((name, safetensors_dtype(t.dtype), list(t.shape), n))
        self.nbytes += n

    def keys(self) -> list[str]:
        return [e[0] for _, _, entries in self._spools.values() for e in entries]

    def finish(self) -> None:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = dict(self.metadata)
        offset, order = 0, sorted(self._spools, reverse=True)
        for size in order:
            spool, f, entries = self._spools[size]
            f.close()
            for name, dtype, shape, n in entries:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in order:
                spool = self._spools[size][0]
                with open(spool, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.remove(spool)
        self._spools.clear()

    def discard(self) -> None:
        for spool, f, _ in self._spools.values():
            f.close()
            spool.unlink(missing_ok=True)
        self._spools.clear()
