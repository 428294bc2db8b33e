"""Checkpoints written as they come: `CheckpointWriter` puts tensors into safetensors shards of bounded size,
then the index, and `checkpoint_names` names them as ``save_pretrained`` would for a model loaded from the source
(the reverse conversions of the ones the source's names needed), so a streamed output is the same checkpoint an
in-memory save gives."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.io.spool import SpooledShard
from moecompress.io.validate import INDEX

__all__ = ["CheckpointWriter", "checkpoint_names"]


class CheckpointWriter:
    """Write tensors as they come into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``shard_bytes``
    (a tensor larger than that gets a shard of its own), then ``model.safetensors.index.json``; a single
    shard is written as ``model.safetensors``. Memory: no tensor is held once added (`io.spool`)."""

    def __init__(self, directory: str | Path, shard_bytes: int = 1 << 30, prefix: str = "model",
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.prefix = shard_bytes, prefix
        self.metadata = metadata or {"format": "pt"}
        self._shard: SpooledShard | None = None
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0
        self.total_params = 0
        self._seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        b = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.nbytes and self._shard.nbytes + b > self.shard_bytes:
            self.flush()
        if self._shard is None:
            name_tmp = f".{self.prefix}-part-{len(self._shards) + 1:05d}.safetensors"
            self._shard = SpooledShard(self.directory / name_tmp, self.metadata)
        self._shard.add(name, tensor)
        self.total_bytes += b
        self.total_params += tensor.numel()

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in sorted(tensors):
            self.add(k, tensors[k])

    def flush(self) -> None:
        """Finish the current shard."""
        if self._shard is None:
            return
        keys = sorted(self._shard.keys())
        self._shard.finish()
        self._shards.append((self._shard.path.name, keys))
        self._shard = None

    def close(self) -> list[str]:
        """Flush, give the shards their final names and write the index (when sharded); returns the files."""
        self.flush()
        n = len(self._shards)
        if n == 0:
            SpooledShard(self.directory / f"{self.prefix}.safetensors", self.metadata).finish()
            return [f"{self.prefix}.safetensors"]
        if n == 1:
            final = f"{self.prefix}.safetensors"
            os.replace(self.directory / self._shards[0][0], self.directory / final)
            return [final]
        weight_map, files = {}, []
        for i, (tmp, keys) in enumerate(self._shards, 1):
            final = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            files.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                 "weight_map": dict(sorted(weight_map.items()))}
        name = INDEX if self.prefix == "model" else f"{self.prefix}.safetensors.index.json"
        (self.directory / name).write_text(json.dumps(index, indent=2) + "\n")
        return files


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor],
                     conversions: Sequence[Any] | None) -> dict[str, torch.Tensor]:
    """Model-named ``tensors`` renamed (and split) as ``save_pretrained`` writes them for a model whose
    weights came through ``conversions`` (`CheckpointSource.used_conversions`; None: the family's defaults,
    as for a model built from its config)."""
    from transformers.core_model_loading import revert_weight_conversion

    had = getattr(model, "_weight_conversions", None)
    model._weight_conversions = list(conversions) if conversions is not None else None
    try:
        if conversions is not None and not conversions:
            return dict(tensors)
        return revert_weight_conversion(model, dict(tensors))
    finally:
        model._weight_conversions = had
