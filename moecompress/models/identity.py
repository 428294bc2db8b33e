"""A model's identity, so that a profile (or store) taken on one model is refused for another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch

__all__ = ["check_identity", "model_identity"]

# Config keys that do not change what the model computes.
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache", "output_router_logits",
             "_experts_implementation", "_attn_implementation", "architectures", "return_dict", "tie_word_embeddings"}


def _config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def model_identity(model, arch: MoEArch) -> dict[str, Any]:
    """Architecture, expert layout, a hash of the config and a hash of every router's weights."""
    h = hashlib.sha256()
    for view in arch.moe_blocks(model):
        # bf16 rounding makes the hash the same whether the model was loaded in bf16 or fp32
        h.update(view.router_weight.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    rule = arch.moe_blocks(model)[0].routing
    return {
        "architecture": arch.name,
        "model_type": model.config.model_type,
        "num_experts": arch.num_experts(model.config),
        "moe_layers": arch.moe_layer_indices(model.config),
        "top_k": rule.top_k,
        "hidden_size": model.config.hidden_size,
        "config_hash": _config_hash(model.config),
        "router_hash": h.hexdigest()[:16],
    }


def check_identity(recorded: dict[str, Any], current: dict[str, Any], what: str, fix: str) -> None:
    """Raise a one-line error naming the first difference between a recorded and a current identity."""
    for key in ("architecture", "num_experts", "moe_layers", "hidden_size", "config_hash", "router_hash"):
        if recorded.get(key) != current.get(key):
            label = {"config_hash": "config", "router_hash": "router weights"}.get(key, key.replace("_", " "))
            raise MoecompressError(f"{what} was taken on another model ({label} differ)", fix)
