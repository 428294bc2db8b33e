"""The identity (`models.identity`) of a model a run reads, taken from its router weights alone.

A profile or a pattern store records the identity of the model it was taken on; a stage that uses one checks it
against the model it runs on before writing anything. For a model directory only the MoE layers' router tensors
are read (a few KB per layer), not the layers.
"""

from __future__ import annotations

from typing import Any

from moecompress.models.identity import identity_from_parts, model_identity
from moecompress.runtime.executor import LayerStream, ModelSource, Placement

__all__ = ["source_identity"]


def source_identity(source: ModelSource, placement: Placement | None = None) -> dict[str, Any]:
    """`models.identity.model_identity` of ``source``, reading only its router weights from disk."""
    arch, config = source.arch, source.config
    if source.in_memory:
        return model_identity(source.model, arch)
    layers = arch.moe_layer_indices(config)
    names = [f"{arch.layers}.{i}.{arch.moe_block}.{arch.router}.{arch.router_weight}" for i in layers]
    with LayerStream(source, [], placement) as stream:
        stream.files.load(stream.model, stream.files.keys_for(names), "cpu", stream.stored)
        return identity_from_parts(config, arch, [arch.block(stream.model, i).router_weight for i in layers])
