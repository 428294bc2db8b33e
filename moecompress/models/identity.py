"""A model's identity, so that a profile (or store) taken on one model is refused for another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch

__all__ = ["check_identity", "config_identity", "identity_from_parts", "model_identity"]

# Config keys that do not change what the model computes.
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache", "output_router_logits",
             "_experts_implementation", "_attn_implementation", "architectures", "return_dict", "tie_word_embeddings"}


def _config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def identity_from_parts(config, arch: MoEArch, router_weights: list[torch.Tensor]) -> dict[str, Any]:
    """Identity from a config and the MoE layers' router weights ``[E, H]`` (in layer order)."""
    h = hashlib.sha256()
    for w in router_weights:
        # bf16 rounding makes the hash the same whether the model was loaded in bf16 or fp32
        h.update(w.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    layers = arch.moe_layer_indices(config)
    return {
        "architecture": arch.name,
        "model_type": config.model_type,
        "num_experts": arch.num_experts(config),
        "moe_layers": layers,
        "top_k": arch.routing(config, layers[0]).top_k,
        "hidden_size": config.hidden_size,
        "config_hash": _config_hash(config),
        "router_hash": h.hexdigest()[:16],
    }


def model_identity(model, arch: MoEArch) -> dict[str, Any]:
    """Architecture, expert layout, a hash of the config and a hash of every router's weights."""
    return identity_from_parts(model.config, arch, [v.router_weight for v in arch.moe_blocks(model)])


_KEYS = ("architecture", "num_experts", "moe_layers", "hidden_size", "config_hash", "router_hash")


def config_identity(config, arch: MoEArch) -> dict[str, Any]:
    """The part of `model_identity` that the config alone gives (no weights read)."""
    layers = arch.moe_layer_indices(config)
    return {"architecture": arch.name, "num_experts": arch.num_experts(config), "moe_layers": layers,
            "hidden_size": config.hidden_size, "config_hash": _config_hash(config)}


def check_identity(recorded: dict[str, Any], current: dict[str, Any], what: str, fix: str) -> None:
    """Raise a one-line error naming the first difference between a recorded and a current identity
    (only the keys ``current`` has: a config-only identity checks everything but the router weights)."""
    for key in (k for k in _KEYS if k in current):
        if recorded.get(key) != current.get(key):
            label = {"config_hash": "config", "router_hash": "router weights"}.get(key, key.replace("_", " "))
            raise MoecompressError(f"{what} was taken on another model ({label} differ)", fix)
