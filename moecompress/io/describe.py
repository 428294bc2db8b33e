"""What a model is, from its config alone (a meta-device skeleton; no weight is read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from moecompress.errors import MoecompressError
from moecompress.models import find_arch
from moecompress.io.model import input_facts, lineage, load_config, model_dir, model_label, read_sidecar

__all__ = ["describe_model"]


def describe_model(spec: str | None) -> dict[str, Any]:
    """Architecture, MoE layout, routing rule and parameter counts by role of a model spec."""
    config = load_config(spec)
    arch = find_arch(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = arch.moe_blocks(model)
    routed = sum(b.experts.numel() for b in blocks)
    routers = sum(sum(p.numel() for p in b.router.parameters()) for b in blocks)
    shared = sum(b.shared.numel() for b in blocks if b.shared is not None)
    shared += sum(b.shared_gate.weight.numel() for b in blocks if b.shared_gate is not None)
    total = sum(p.numel() for p in model.parameters())
    per_expert = routed // max(1, len(blocks) * arch.num_experts(config))
    rule = blocks[0].routing
    active = total - routed + len(blocks) * rule.top_k * per_expert
    info: dict[str, Any] = {
        "model": model_label(spec),
        "architecture": arch.name,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "moe_layers": arch.moe_layer_indices(config),
        "experts_per_layer": arch.num_experts(config),
        "top_k": rule.top_k,
        "routing": rule.score + (f", {rule.group_score} groups {rule.topk_group}/{rule.n_group}"
                                 if rule.group_score and rule.n_group > 1 else "")
        + (", renormalised" if rule.renormalize else "") + (f", x{rule.scaling:g}" if rule.scaling != 1 else "")
        + (", correction bias" if arch.correction_bias else ""),
        "shared_experts": bool(arch.shared_experts) and shared > 0,
        "hidden_size": config.hidden_size,
        "params_total": total,
        "params_active_per_token": active,
        "params_routed_experts": routed,
        "params_shared_experts": shared,
        "params_routers": routers,
        "params_other": total - routed - shared - routers,
    }
    if not (spec and str(spec).startswith("tiny:")):
        path = model_dir(spec)
        info["path"] = str(path)
        info["size_on_disk_bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        info["dtype_on_disk"] = str(getattr(config, "dtype", "") or "").replace("torch.", "")
        facts = input_facts(spec, config)
        kind = {"original": "full precision", "packed": "packed (moecompress)", "quantized": "fake-quantized "
                "(moecompress: dequantized weights, codes recorded)", "foreign": "quantized by another tool"}
        info["representation"] = kind[facts["representation"]] + (f", {facts['scheme']}" if facts["scheme"] else "")
        side = read_sidecar(path)
        chain = lineage(side)
        if chain:  # written by moecompress: what it was made from, and how many experts each ancestor had
            info["made_from"] = " <- ".join(m for m, _ in chain)
            first, kept = chain[-1]
            if kept:  # experts were removed along the way
                try:
                    first_config = load_config(first)
                    of = f" of {find_arch(first_config).num_experts(first_config)}"
                except MoecompressError:  # the first model is gone: its expert count is unknown
                    of = ""
                counts = sorted({len(v) for v in kept.values()})
                per = (f"{counts[0]}{of} per MoE layer" if len(counts) == 1 else
                       ", ".join(f"layer {k}: {len(v)}{of}" for k, v in sorted(kept.items())))
                info["experts_kept"] = f"{per} (pruned from {first})"
    return info
