"""How transformers calls an MoE experts module: the argument names differ between families."""

from __future__ import annotations

import torch

__all__ = ["experts_call_args"]


def experts_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [T, H], top-k index [T, K], top-k weights [T, K])`` of an experts-module call, positional or
    keyword (gpt-oss names them ``router_indices`` / ``routing_weights``)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    alt = {"top_k_index": "router_indices", "top_k_weights": "routing_weights"}
    vals = list(args[:3]) + [kwargs.get(n, kwargs.get(alt.get(n, ""))) for n in names[len(args):]]
    return vals[0], vals[1], vals[2]
