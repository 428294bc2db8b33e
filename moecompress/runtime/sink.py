"""Where a stage that changes the model puts it: one decoder layer at a time into a new checkpoint directory
(or, for a model held in memory with no target, nowhere: the stage changed the model in place).

Tensors are written in the dtype the source stored them in (float32 kept where the family's
``keep_in_fp32`` plan says so, as ``from_pretrained``/``save_pretrained`` do), named as ``save_pretrained``
names them for a model loaded from that source, into shards of bounded size (`io.CheckpointWriter`). The
directory gets ``config.json`` (with every expert-count key the adapter lists), the generation config and
the tokenizer; `LayerSink.close` returns the new directory as the next stage's source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moecompress.io.checkpoint import layer_of
from moecompress.io.writer import CheckpointWriter, checkpoint_names
from moecompress.io.outdir import failpoint
from moecompress.runtime.executor import LayerStream, ModelSource

__all__ = ["LayerSink", "copy_companions", "written_config"]


class LayerSink:
    """Write a stream's layers (as they are after the stage's work) into ``target``; see the module doc."""

    def __init__(self, source: ModelSource, target: Path | None, shard_bytes: int = 1 << 30,
                 writer: bool = True) -> None:
        self.source, self.target = source, target
        if target is None and not source.in_memory:
            raise ValueError("a model read from disk must be written somewhere")
        self.writes = writer  # False: another process (torchrun rank 0) writes this directory
        self.writer = None if target is None or not writer else CheckpointWriter(target, shard_bytes)
        self._plan: re.Pattern | None = None
        self._stored = source.stored_dtype
        self.layers_written: set[int] = set()

    @property
    def in_place(self) -> bool:
        return self.target is None

    def _dtype_for(self, stream: LayerStream, name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point():
            return t.dtype
        if self._stored is None:
            from moecompress.io.checkpoint import stored_dtype

            self._stored = stored_dtype(self.source.directory)
        if self._plan is None:
            plan = stream.model._get_dtype_plan(self._stored)
            self._plan = re.compile("|".join(re.escape(k) for k in plan)) if plan else re.compile(r"(?!x)x")
        return torch.float32 if self._plan.search(name) else self._stored

    def _write(self, stream: LayerStream, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to(self._dtype_for(stream, k, v)) for k, v in tensors.items()}
        conversions = stream.files.used_conversions if stream.files is not None else \
            getattr(stream.model, "_weight_conversions", None)
        for k, v in sorted(checkpoint_names(stream.model, tensors, conversions).items()):
            self.writer.add(k, v)

    def layer(self, stream: LayerStream, i: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write decoder layer ``i`` as it is now (or ``tensors``, by model names)."""
        self.layers_written.add(i)
        if self.writer is not None:
            self._write(stream, stream.layer_state(i) if tensors is None else tensors)
            failpoint(f"after-layer-{i}")  # tests: killed mid-model, with layer i's tensors handed to the writer

    def outside(self, stream: LayerStream, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write everything outside the decoder layers (embeddings, final norm, head; or ``tensors``)."""
        if self.writer is None:
            return
        state = stream.outside_state() if tensors is None else tensors
        emb = stream.model.get_input_embeddings().weight
        shared = [n for n, p in stream.model.named_parameters(remove_duplicate=False) if p is emb]
        for name in shared[1:]:  # a tied head is written once, under the embedding's name (as save_pretrained)
            state.pop(name, None)
        self._write(stream, {k: v for k, v in state.items() if layer_of(k, stream.arch.layers) is None})

    def close(self, config, arch, tokenizer=None) -> ModelSource:
        """Finish the directory (shards, index, config, tokenizer); the result as a source."""
        if self.target is None:
            return self.source
        if self.writer is None:  # written by rank 0
            return ModelSource(config, arch, directory=self.target, tokenizer=tokenizer or self.source.tokenizer,
                               stored_dtype=self._stored or self.source.stored_dtype)
        self.writer.close()
        cfg = written_config(config, arch, self.target)
        cfg["dtype"] = str(self._stored or torch.float32).replace("torch.", "")
        (self.target / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tok = copy_companions(self.source, self.target, tokenizer)
        return ModelSource(config, arch, directory=self.target, tokenizer=tok, stored_dtype=self._stored)


def written_config(config, arch, target: Path) -> dict:
    """``config`` saved into ``target`` and read back as a dict, the expert count under every key readers use
    (Qwen3-MoE reads one spelling, older readers the other); the caller finishes and writes it."""
    config.save_pretrained(target)
    cfg = json.loads((target / "config.json").read_text())
    n = arch.num_experts(config)
    for key in arch.num_experts_keys:
        cfg[key] = n
    return cfg


def copy_companions(source: ModelSource, target: Path, tokenizer=None):
    """The source's ``generation_config.json`` and the tokenizer (``tokenizer``, else the source's) into
    ``target``; returns the tokenizer written (or None)."""
    gen = source.directory / "generation_config.json" if source.directory else None
    if gen is not None and gen.is_file():
        (target / "generation_config.json").write_bytes(gen.read_bytes())
    tok = tokenizer if tokenizer is not None else source.tokenizer
    if tok is not None:
        tok.save_pretrained(target)
    return tok
