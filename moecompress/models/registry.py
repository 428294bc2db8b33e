"""The architecture registry: ``register_arch`` for family files, ``find_arch`` for everyone else."""

from __future__ import annotations

from transformers import PretrainedConfig

from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch
from moecompress.registry import Registry

__all__ = ["ARCHS", "find_arch", "register_arch"]

ARCHS: Registry[MoEArch] = Registry("architecture")


def _has_experts(cfg: dict) -> bool:
    """Any (nested) config key naming experts with a count above 1: tells an unknown MoE from a dense model."""
    for k, v in cfg.items():
        if isinstance(v, dict) and _has_experts(v):
            return True
        if "expert" in str(k) and isinstance(v, int) and not isinstance(v, bool) and v > 1:
            return True
    return False


def register_arch(arch: MoEArch) -> MoEArch:
    for t in arch.model_types:
        ARCHS.add(t, arch)
    return arch


def find_arch(config: PretrainedConfig) -> MoEArch:
    """The adapter for ``config.model_type``; a clear error for dense models and unknown MoE families."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type not in ARCHS:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if _has_experts(cfg):
            raise MoecompressError(
                f"unknown MoE architecture {model_type!r}",
                f"add moecompress/models/{model_type}.py and a tiny config in moecompress/testing.py "
                "(see 'Adding an architecture' in README.md)",
            )
        raise MoecompressError(
            f"{model_type!r} is a dense model, not a Mixture-of-Experts",
            f"moecompress compresses MoE models ({', '.join(ARCHS.names())})",
        )
    arch = ARCHS.get(model_type)
    if not arch.moe_layer_indices(config):
        raise MoecompressError(f"this {model_type!r} model has no MoE layers (its config turns experts off)",
                               "give a model with routed experts")
    return arch
