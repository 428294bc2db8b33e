"""Writing a quantized model in the packed format (docs/FORMAT.md).

Every weight in the quantization record is replaced in the state dict by its codec's packed tensors (named
after the in-memory module, so transformers loads them without conversion); everything else (norms,
embeddings, routers, biases, unquantized linears) is written as is, in the checkpoint's dtype.
``config.json`` gets ``quantization_config`` (method, format version, module specs, checksums, activation
scheme); ``moecompress.json`` gets the per-module sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import FORMAT_VERSION, QUANT_METHOD, checksum, write_checkpoint
from moecompress.formats.codecs import encode, packed_bits_per_weight
from moecompress.formats.quant_record import QuantRecord
from moecompress.runtime.modelio import LoadedModel

__all__ = ["write_packed"]


def _codec(meta: dict | None, ternary_codec: str) -> tuple[str, bool]:
    if meta is None:
        raise MoecompressError("the quantization record has weights but no scheme", "quantize the model again")
    if meta.get("kind") == "ternary":
        return ternary_codec, True
    return f"int{meta['bits']}", bool(meta.get("symmetric", False))


def write_packed(loaded: LoadedModel, record: QuantRecord, meta: dict[str, Any], out_dir: Path,
                 ternary_codec: str = "ternary-b3") -> dict[str, Any]:
    """Write ``loaded.model`` with the record's weights packed; returns size statistics."""
    model, arch = loaded.model, loaded.arch
    disk = loaded.disk_dtype
    sd: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel():  # tied weights are written once
            continue
        seen.add(v.data_ptr())
        sd[k] = v.to(disk) if v.is_floating_point() and v.dtype != disk and "correction_bias" not in k else v
    modules: dict[str, dict] = {}
    experts_paths = {f"{arch.layers}.{v.index}.{arch.moe_block}.{arch.experts}": v for v in arch.moe_blocks(model)}
    rotation = meta.get("rotation") or {}
    names = [n for n in record.weights() if not n.endswith(":router")]  # routers stay dense (bf16 values)
    stats = {"modules": {}, "packed_bytes": 0, "dense_equivalent_bytes": 0}
    for path, view in experts_paths.items():
        projs = [n for n in names if n.startswith(path + ":")]
        if not projs:
            continue
        codec, symmetric = _codec(meta.get("experts"), ternary_codec)
        for k in [k for k in sd if k.startswith(path + ".")]:
            del sd[k]
        shape = None
        for p in ("gate", "up", "down"):
            name = f"{path}:{p}"
            if name not in projs:
                raise MoecompressError(f"the quantization record lacks {name}", "quantize the model again")
            q, s, z = (record.tensors[f"{name}.{x}"] for x in ("codes", "scales", "zeros"))
            for local, t in encode(codec, q, s, z, symmetric).items():
                sd[f"{path}.{p}_{local}"] = t
            b = view.experts.bias(p)
            if b is not None:
                sd[f"{path}.{p}_bias"] = b.detach().to(disk).contiguous()
            E, O, C = q.shape
            if p == "gate":
                shape = [E, O, C]
            bpw = packed_bits_per_weight(codec, C, C // s.shape[-1], symmetric)
            stats["modules"][name] = {"codec": codec, "bits_per_weight": bpw, "weights": q.numel()}
        modules[path] = {"type": "experts", "shape": shape, "codecs": {p: codec for p in ("gate", "up", "down")},
                         "group_size": shape[2] // record.tensors[f"{path}:gate.scales"].shape[-1],
                         "symmetric": symmetric, "bias": view.experts.bias("gate") is not None,
                         "activation": asdict(view.activation),
                         "intermediate_rotation_seed": rotation.get("seed") if rotation.get("intermediate") else None}
    for name in names:
        if ":" in name:
            continue
        codec, symmetric = _codec(meta.get("weights"), ternary_codec)
        q, s, z = (record.tensors[f"{name}.{x}"] for x in ("codes", "scales", "zeros"))
        del sd[f"{name}.weight"]
        for local, t in encode(codec, q, s, z, symmetric).items():
            sd[f"{name}.weight_{local}"] = t
        _, O, C = q.shape
        modules[name] = {"type": "linear", "shape": [1, O, C], "codec": codec, "group_size": C // s.shape[-1],
                         "symmetric": symmetric, "bias": f"{name}.bias" in sd}
        stats["modules"][name] = {"codec": codec, "weights": q.numel(),
                                  "bits_per_weight": packed_bits_per_weight(codec, C, C // s.shape[-1], symmetric)}
    packed_keys = [k for k in sd if any(k.startswith(p + ".") or k.startswith(p + "_") for p in modules)
                   and not k.endswith("_bias") and not k.endswith(".bias")]
    checksums = {k: checksum(sd[k].to(torch.float16) if sd[k].is_floating_point() else sd[k]) for k in packed_keys}
    write_checkpoint(sd, out_dir)
    model.config.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    n = arch.num_experts(model.config)
    for key in arch.num_experts_keys:
        cfg[key] = n
    cfg["dtype"] = str(disk).replace("torch.", "")
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": modules,
                                  "checksums": checksums, "activations": meta.get("activations")}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out_dir)
    for entry in stats["modules"].values():
        stats["packed_bytes"] += entry["bits_per_weight"] * entry["weights"] / 8
        stats["dense_equivalent_bytes"] += entry["weights"] * torch.empty(0, dtype=disk).element_size()
    stats["file_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return stats
