"""Run a decoder-only model one decoder layer at a time over fixed batches.

GPTQ's "Catcher" pattern, made exact for every family: one cheap pass with every decoder layer replaced
by an identity records each layer's keyword arguments per batch (attention masks differ per layer for
sliding-window families, rotary tables are shared) and the first layer's input. After that,
`run_layer(i)` pushes every batch through layer ``i`` only, so a stage can inspect or change layer ``i``
before layer ``i + 1`` sees its outputs (quantization propagates its error this way).

Memory: the activations of one layer for all batches, plus the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from moecompress.models.base import MoEArch

__all__ = ["SequentialRunner"]


@contextlib.contextmanager
def _identity_layers(layers: nn.ModuleList, record: list[list[dict]], first: list[torch.Tensor]) -> Iterator[None]:
    originals = [layer.forward for layer in layers]

    def make(i: int):
        def forward(hidden_states, *args, **kwargs):
            if args:  # decoder layers are called with keywords after the hidden states in transformers 5
                raise TypeError("unexpected positional arguments to a decoder layer")
            record[i].append(kwargs)
            if i == 0:
                first.append(hidden_states.detach())
            return hidden_states

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = make(i)
        yield
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd


class SequentialRunner:
    """Layer-by-layer execution of ``model`` on ``batches`` (each ``[B, S]`` token ids)."""

    def __init__(self, model: nn.Module, arch: MoEArch, batches: Sequence[torch.Tensor]) -> None:
        self.model, self.arch, self.batches = model, arch, list(batches)
        self.layers = arch.decoder_layers(model)
        self.kwargs: list[list[dict]] = [[] for _ in self.layers]
        first: list[torch.Tensor] = []
        with torch.no_grad(), _identity_layers(self.layers, self.kwargs, first):
            for x in self.batches:
                self.model.base_model(input_ids=x, use_cache=False)
        self.hidden: list[torch.Tensor] = first  # inputs of the next layer to run, per batch [B, S, H]
        self.next_layer = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def run_layer(self, i: int, store: bool = True, batches=None) -> None:
        """Run the batches (default all) through layer ``i`` (layers must run in order). ``store=True``
        replaces the stored hidden states by the outputs and moves on to the next layer; ``store=False`` only
        runs the layer (a calibration pass whose hooks collect statistics)."""
        if i != self.next_layer:
            raise RuntimeError(f"layer {i} run out of order (next is {self.next_layer})")
        if store and batches is not None:
            raise ValueError("a storing pass runs every batch")
        layer = self.layers[i]
        for b in batches if batches is not None else range(len(self.hidden)):
            h = self.hidden[b]
            out = layer(h, **self.kwargs[i][b])
            if store:
                self.hidden[b] = out[0] if isinstance(out, tuple) else out
        if store:
            self.next_layer += 1

    @torch.no_grad()
    def logits(self, b: int) -> torch.Tensor:
        """``[B, S, V]`` logits of batch ``b`` once every layer has run (final norm + LM head)."""
        if self.next_layer != self.num_layers:
            raise RuntimeError("run every layer before asking for logits")
        final_norm = self.model.get_submodule(self.arch.final_norm)
        logits = self.model.get_output_embeddings()(final_norm(self.hidden[b]))
        if self.arch.logits_divisor_key:
            logits = logits / getattr(self.model.config, self.arch.logits_divisor_key)
        return logits
