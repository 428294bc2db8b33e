"""The attention replayed once it is final, in sequential quantization's later passes (`runtime.quantize_run`).

After a layer's q, k, v are quantized, the pass that pairs its output projection sees exactly the inputs that
projection will get in every later pass of the same batches (the attention's inputs and weights no longer change).
`record_output_replay` records them, checking that the attention module returns that projection's output as is;
`replaying` then answers the module's calls with the projection (as it is now: quantized) on the recorded inputs,
so the experts' pairing pass and the output pass skip q, k, v, the rotary embedding and the attention itself.
The same bytes as running it (`tests/runtime/test_sequential.py`, every adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["OutputReplay", "record_output_replay", "replaying"]


@dataclass
class OutputReplay:
    """A module (the attention) whose output is its last linear's output, with that linear's inputs of each
    call recorded once every other linear inside it is final (`record_output_replay`): later passes of the same
    batches need not run the module again, only that linear on its recorded inputs (`replaying`)."""

    module: nn.Module
    linear: nn.Module
    inputs: list[torch.Tensor]
    arity: int | None  # the module returns a tuple of this length (replayed with its other items None), or a tensor


@contextlib.contextmanager
def record_output_replay(layer: nn.Module, linears: dict[str, nn.Module], final: set[str],
                         park: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                         ) -> Iterator[list[OutputReplay | None]]:
    """While ``layer`` runs: for the first of ``linears`` whose parent module holds other linears, all of them
    ``final`` (quantized: the attention's q, k, v for its output projection), record that linear's input per call
    and check that the parent returns exactly that linear's output (the same tensor, first of a tuple: its other
    items, attention weights, are not read by the decoder layers in these passes and are replayed as None).
    Yields a one-item list, set when the context exits to the `OutputReplay`, or None when no module qualifies or
    a call failed the check."""
    modules = dict(layer.named_modules())
    found = [None]
    cand = None
    for name, lin in linears.items():
        parent = name.rpartition(".")[0]
        others = [n for n, m in modules.items() if n.startswith(parent + ".") and isinstance(m, nn.Linear)
                  and n != name] if parent else []
        if others and all(n in final for n in others):
            cand = (modules[parent], lin)
            break
    if cand is None:
        yield found
        return
    module, lin = cand
    inputs: list[torch.Tensor] = []
    state: dict[str, Any] = {"ok": True, "arity": None, "out": None, "calls": 0}

    def pre(m, args):
        inputs.append(park(args[0].detach()))

    def post_linear(m, args, out):
        state["out"] = out

    def post_module(m, args, out):
        same = out[0] is state["out"] if isinstance(out, tuple) else out is state["out"]
        arity = len(out) if isinstance(out, tuple) else None
        state["calls"] += 1
        state["ok"] = state["ok"] and same and len(inputs) == state["calls"] and \
            (state["arity"] is None or state["arity"] == arity)
        state["arity"] = arity
        state["out"] = None

    handles = [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post_linear),
               module.register_forward_hook(post_module)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
    if state["ok"] and inputs:
        found[0] = OutputReplay(module, lin, inputs, state["arity"])


@contextlib.contextmanager
def replaying(rep: OutputReplay | None, device: torch.device | None = None) -> Iterator[None]:
    """While the layer runs the recorded batches again (in the same order, first): ``rep``'s module returns
    its linear applied to the recorded inputs instead of running (its linear as it is now: the output
    projection once quantized); calls past the recorded ones run the module itself."""
    if rep is None:
        yield
        return
    m = rep.module
    saved = m.__dict__.get("forward")
    calls = {"n": 0}
    real = m.forward

    def forward(*args, **kwargs):
        j = calls["n"]
        calls["n"] += 1
        if j >= len(rep.inputs):
            return real(*args, **kwargs)
        x = rep.inputs[j]
        y = rep.linear(x if device is None else x.to(device))
        return y if rep.arity is None else (y, *([None] * (rep.arity - 1)))

    m.forward = forward
    try:
        yield
    finally:
        if saved is None:
            m.__dict__.pop("forward", None)
        else:
            m.forward = saved
