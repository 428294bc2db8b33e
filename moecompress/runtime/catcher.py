"""The first decoder layer's inputs and every layer's keyword arguments, per batch: GPTQ's "Catcher" pattern made
exact for every family. One pass with every decoder layer replaced by an identity records each layer's keyword
arguments (attention masks differ per layer for sliding-window families; rotary tables are shared) and stops
before the final norm (`stop_at`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["Stop", "first_layer_inputs", "stop_at"]


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, final_norm: nn.Module, batches: Sequence[torch.Tensor],
                       device: torch.device, kwargs: list[list[dict]],
                       embed_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The first decoder layer's input hidden states of each of ``batches`` (token ids ``[B, S]``, run on
    ``device``); each layer's keyword arguments per batch are appended to ``kwargs[layer]``. With
    ``embed_transform`` the tokens are embedded by ``embed_transform(embedding weight)`` (the model's own
    embedding is left as it is)."""
    first: list[torch.Tensor] = []
    with _identity_layers(layers, kwargs, first), stop_at(final_norm), \
            _embedding_as(model.get_input_embeddings(), embed_transform):
        for x in batches:
            try:
                model.base_model(input_ids=x.to(device), use_cache=False)
            except Stop:
                pass
    return first


class Stop(Exception):
    """Raised by `stop_at`'s hook: the forward pass ends there."""


@contextlib.contextmanager
def _embedding_as(module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """The embedding looks tokens up in ``transform(weight)`` meanwhile (nothing changes without a transform)."""
    if transform is None:
        yield
        return
    weight = transform(module.weight)
    h = module.register_forward_hook(lambda m, args, out: nn.functional.embedding(args[0], weight).to(out.dtype))
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def stop_at(module: nn.Module) -> Iterator[None]:
    """Every call of ``module`` meanwhile raises `Stop` before it runs."""
    def stop(*args, **kwargs):
        raise Stop

    h = module.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        h.remove()


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
