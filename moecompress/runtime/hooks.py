"""Forward hooks as context managers (always removed), and routing capture.

`capture_routing` records, per MoE layer, exactly what the model used: the router's raw logits
(from the router's output) and the top-k indices and weights the experts module received (from its
input), so it is right for every family's routing rule without re-implementing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.models.base import MoEArch
from moecompress.models.calls import experts_call_args

__all__ = ["RoutingTrace", "capture_routing", "hooks"]


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove every hook handle in ``handles`` on exit, even on error."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


@dataclass
class RoutingTrace:
    """One MoE layer's routing over all captured tokens, in call order."""

    logits: list[torch.Tensor] = field(default_factory=list)  # each [T, E]
    index: list[torch.Tensor] = field(default_factory=list)  # each [T, K]
    weights: list[torch.Tensor] = field(default_factory=list)  # each [T, K]
    inputs: list[torch.Tensor] = field(default_factory=list)  # each [T, H] (only with keep_inputs)

    def cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E], index [T, K], weights [T, K])`` over every call."""
        return torch.cat(self.logits), torch.cat(self.index), torch.cat(self.weights)


RouteCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def capture_routing(
    model: nn.Module,
    arch: MoEArch,
    keep_inputs: bool = False,
    layers: Sequence[int] | None = None,
    on_route: RouteCallback | None = None,
    store: bool = True,
) -> Iterator[dict[int, RoutingTrace]]:
    """Record routing of the MoE layers (all, or ``layers``) during the forwards run inside the block.

    Yields ``{layer index: RoutingTrace}``, filled as the model runs (detached CPU copies; nothing is
    kept when ``store=False``). ``on_route(layer, x [T, H], logits [T, E], index [T, K], weights [T, K])``
    is called once per block call, when the experts receive their tokens, so a caller can reduce each
    call to statistics instead of keeping every token.
    """
    traces: dict[int, RoutingTrace] = {}
    handles: list = []
    for view in arch.moe_blocks(model):
        if layers is not None and view.index not in layers:
            continue
        trace = traces[view.index] = RoutingTrace()
        last: dict[str, torch.Tensor] = {}

        def on_router(mod, args, out, last=last):
            logits = out[0] if isinstance(out, tuple) else out
            last["logits"] = logits.detach().reshape(-1, logits.shape[-1]).float()

        def on_experts(mod, args, kwargs, trace=trace, last=last, layer=view.index):
            x, index, weights = experts_call_args(args, kwargs)
            x = x.detach().reshape(-1, x.shape[-1])
            index = index.detach().reshape(-1, index.shape[-1])
            weights = weights.detach().reshape(-1, weights.shape[-1]).float()
            logits = last.pop("logits")
            if on_route is not None:
                on_route(layer, x, logits, index, weights)
            if store:
                trace.logits.append(logits.cpu())
                trace.index.append(index.cpu())
                trace.weights.append(weights.cpu())
                if keep_inputs:
                    trace.inputs.append(x.cpu())

        handles.append(view.router.register_forward_hook(on_router))
        handles.append(view.experts.module.register_forward_pre_hook(on_experts, with_kwargs=True))
    with hooks(handles):
        yield traces
