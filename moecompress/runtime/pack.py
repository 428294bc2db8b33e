"""Where a quantizing stage writes the model, one decoder layer at a time.

* `PackedSink`: the packed format (docs/FORMAT.md) through `formats.pack.PackedWriter`: each layer's quantized
  modules as codec tensors plus the rest of the layer, as the layer is done; ``config.json`` with the
  ``quantization_config`` (module specs, checksums) at the end.
* `FakeQuantSink`: the dequantized weights through a `LayerSink` (a plain checkpoint any loader reads) plus the
  quantization record (codes, scales, zeros), written layer by layer (`formats.quant_record.RecordWriter`).

Both follow `LayerSink`'s protocol (``layer``, ``outside``, ``close(config, arch, tokenizer)`` -> the written
model as a `ModelSource`, ``in_place``), so `Context.adopt` hands the result to the next stage. A model held in
memory with nowhere to write is changed in place and nothing is written (the record still goes to
``record_dir`` when one is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moecompress.formats.pack import PackedExpertsInfo, PackedWriter
from moecompress.formats.quant_record import QuantRecord, RecordWriter
from moecompress.io.checkpoint import layer_of
from moecompress.io.outdir import failpoint
from moecompress.models.base import MoEArch, MoEBlockView
from moecompress.runtime.executor import LayerStream, ModelSource
from moecompress.runtime.sink import LayerSink, copy_companions, written_config

__all__ = ["FakeQuantSink", "PackedSink"]


def _experts_info(arch: MoEArch, views: list[MoEBlockView]) -> dict[str, PackedExpertsInfo]:
    return {f"{arch.layers}.{v.index}.{arch.moe_block}.{arch.experts}":
            PackedExpertsInfo({p: v.experts.bias(p) for p in ("gate", "up", "down")}, v.activation)
            for v in views}


class PackedSink:
    """Write a quantized stream in the packed format into ``target`` (None with an in-memory source: nothing
    is written, the model stays fake-quantized in memory)."""

    def __init__(self, source: ModelSource, target: Path | None, meta: dict[str, Any],
                 ternary_codec: str = "ternary-b3", writer: bool = True) -> None:
        """``writer=False``: another process (torchrun rank 0) writes ``target``; this one only computes."""
        if target is None and not source.in_memory:
            raise ValueError("a model read from disk must be written somewhere")
        self.source, self.target, self.meta, self.ternary_codec = source, target, meta, ternary_codec
        self.writes = writer
        self.reread_config = not writer  # the packed config.json exists once rank 0 has closed
        self._writer: PackedWriter | None = None
        self.stats: dict[str, Any] | None = None

    @property
    def in_place(self) -> bool:
        return self.target is None

    def _stored(self) -> torch.dtype:
        if self.source.stored_dtype is not None:
            return self.source.stored_dtype
        from moecompress.io.checkpoint import stored_dtype

        return stored_dtype(self.source.directory)

    def _open(self) -> PackedWriter:
        if self._writer is None:
            self._writer = PackedWriter(self.target, self._stored(), self.meta, self.ternary_codec)
        return self._writer

    def layer(self, stream: LayerStream, i: int, record: QuantRecord, views: list[MoEBlockView]) -> None:
        """Write decoder layer ``i`` as it is now, its recorded weights packed (``views``: its MoE blocks)."""
        if self.target is not None and self.writes:
            bits = (self.meta.get("layer_bits") or {}).get(str(i))  # a layer of its own width (`layer_bits`)
            self._open().add(stream.layer_state(i), record, _experts_info(stream.arch, views), bits)
            failpoint(f"after-layer-{i}")  # tests: killed mid-model

    def outside(self, stream: LayerStream, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write everything outside the decoder layers (or ``tensors``), dense."""
        if self.target is None or not self.writes:
            return
        state = stream.outside_state() if tensors is None else tensors
        self._open().add({k: v for k, v in state.items() if layer_of(k, stream.arch.layers) is None})

    def close(self, config, arch: MoEArch, tokenizer=None) -> ModelSource:
        if self.target is None:
            return self.source
        if not self.writes:  # rank 0 writes; the others read its directory after the barrier
            return ModelSource(config, arch, directory=self.target,
                               tokenizer=tokenizer if tokenizer is not None else self.source.tokenizer,
                               stored_dtype=self._stored())
        writer = self._open()
        self.stats = writer.close(written_config(config, arch, self.target))
        tok = copy_companions(self.source, self.target, tokenizer)
        from transformers import AutoConfig

        written = AutoConfig.from_pretrained(self.target, local_files_only=True)
        return ModelSource(written, arch, directory=self.target, tokenizer=tok, stored_dtype=writer.stored)


class FakeQuantSink:
    """Dequantized weights through ``dense`` (a `LayerSink`), the record layer by layer into ``record_dir``
    (None: not kept)."""

    def __init__(self, dense: LayerSink, record_dir: Path | None) -> None:
        self.dense = dense
        self.record = RecordWriter(record_dir) if record_dir is not None else None
        self.record_file: str | None = None

    @property
    def in_place(self) -> bool:
        return self.dense.in_place

    def layer(self, stream: LayerStream, i: int, record: QuantRecord, views: list[MoEBlockView]) -> None:
        self.dense.layer(stream, i)
        if self.record is not None:
            self.record.add(record)

    def outside(self, stream: LayerStream, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.dense.outside(stream, tensors)

    def close(self, config, arch: MoEArch, tokenizer=None) -> ModelSource:
        if self.record is not None:
            self.record_file = self.record.close()
        return self.dense.close(config, arch, tokenizer)
