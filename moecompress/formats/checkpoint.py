"""Writing state dicts as (sharded) safetensors directories, and the packed format's version and checksums."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "READABLE_VERSIONS", "checksum", "write_checkpoint"]

FORMAT_VERSION = 4  # the newest written; 2 added the ternary-dict codec and two-level ternary scales, 3 the -fz codecs
# (fractional zero points), 4 the trellis codecs; a checkpoint is written at the lowest version its codecs need
# (without -fz or trellis codecs: version 2; docs/FORMAT.md)
READABLE_VERSIONS = (1, 2, 3, 4)  # every version this moecompress loads (each one a valid checkpoint of the next)
QUANT_METHOD = "moecompress"


def checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (hex), recorded for every packed tensor and verified on load."""
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def write_checkpoint(sd: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``sd`` as ``model.safetensors`` (or shards plus ``model.safetensors.index.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        b = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + b > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k].contiguous()
        size += b
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
