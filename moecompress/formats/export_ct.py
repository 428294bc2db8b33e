"""Export a packed W4A16 or W8A8 checkpoint to the compressed-tensors format (vLLM / llm-compressor).

W4A16 -> ``pack-quantized`` (int4 group quantization; ``weight_packed`` int32 along in_features, identical
bits to ours; ``weight_zero_point`` signed and packed along the output dimension); W8A8 -> ``int-quantized``
(``weight`` int8, per-channel scale and zero point, dynamic per-token 8-bit input activations). Routed
experts are written one linear per expert under the checkpoint's original per-expert names, derived from
transformers' own conversion table (Mixtral ``block_sparse_moe.experts.{e}.w1``, Qwen ``experts.{e}.gate_proj``,
...); families whose checkpoints keep experts fused (gpt-oss, Granite) cannot be exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moecompress.errors import MoecompressError
from moecompress.formats.bitpack import pack_bits
from moecompress.formats.checkpoint import QUANT_METHOD, write_checkpoint
from moecompress.formats.codecs import decode
from moecompress.formats.spec import PROJS, module_specs
from moecompress.io.outdir import atomic_output, check_output

__all__ = ["export_compressed_tensors"]


def _load_all(directory: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sd[k] = h.get_tensor(k)
    return sd


def _naming(config):
    """(reverse renamings, {"gate": pattern, "up": pattern, "down": pattern}) of the model's checkpoint format."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    conv = get_model_conversion_mapping(meta, add_legacy=False)
    renamings = [c.reverse_transform() for c in conv[::-1] if isinstance(c, WeightRenaming)]
    pats: dict[str, str] = {}
    for c in conv:
        if isinstance(c, WeightConverter) and c.target_patterns[0].endswith("experts.gate_up_proj"):
            pats["gate"], pats["up"] = c.source_patterns[0], c.source_patterns[1]
        elif isinstance(c, WeightConverter) and c.target_patterns[0].endswith("experts.down_proj"):
            pats["down"] = c.source_patterns[0]
    return renamings, pats


def _original(key: str, renamings) -> str:
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(key, renamings)


def _ct_tensors(fmt: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                symmetric: bool) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors from our unsigned codes ``[O, C]`` and group params ``[O, G]``."""
    half = 2 ** (bits - 1)
    O, C = codes.shape
    out: dict[str, torch.Tensor] = {"weight_scale": scale.to(torch.float16)}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_bits(codes, bits)
        out["weight_shape"] = torch.tensor([O, C], dtype=torch.int64)
        if not symmetric:  # signed zero point, packed along the output dimension
            # compressed-tensors stores the signed zero point plus 2^(b-1): our unsigned zero, packed along dim 0
            out["weight_zero_point"] = pack_bits(zero.to(torch.int64).T.contiguous(), bits).T.contiguous()
    else:
        out["weight"] = (codes.to(torch.int16) - half).to(torch.int8)
        if not symmetric:
            out["weight_zero_point"] = (zero.to(torch.int16) - half).to(torch.int8)
    return out


def export_compressed_tensors(src: str | Path, output: str | Path, force: bool = False) -> dict[str, Any]:
    """Write ``src`` (a moecompress packed W4A16 / W8A8 directory) as a compressed-tensors checkpoint."""
    src = Path(src)
    out = check_output(output, force, [src])
    cfg_json = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    qc = cfg_json.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise MoecompressError(f"{str(src)!r} is not a moecompress packed checkpoint",
                               "quantize it first (moecompress quantize ... writes the packed format)")
    side = json.loads((src / "moecompress.json").read_text()) if (src / "moecompress.json").is_file() else {}
    scheme = (side.get("quantization") or {}).get("scheme")
    modules = module_specs(qc["modules"])
    codecs = {c for s in modules.values() for c in s.all_codecs}
    acts = qc.get("activations")
    if codecs == {"int4"} and not acts:
        fmt, bits, act = "pack-quantized", 4, None
    elif codecs == {"int8"} and acts and acts["bits"] == 8 and acts.get("symmetric", True):
        fmt, bits, act = "int-quantized", 8, {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                              "strategy": "token"}
    else:
        raise MoecompressError(f"compressed-tensors export supports W4A16 and W8A8, not {scheme or sorted(codecs)}",
                               "quantize with --scheme w4a16 or w8a8")
    if any(s.type == "experts" and s.intermediate_rotation_seed is not None for s in modules.values()):
        raise MoecompressError("the experts' down projections are stored in a rotated basis",
                               "quantize without --rotate-intermediate to export")
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    renamings, pats = _naming(config)
    sd = _load_all(src)
    new: dict[str, torch.Tensor] = {}
    packed_prefixes = []
    group_sizes, symmetric = set(), set()
    for path, spec in modules.items():
        symmetric.add(spec.symmetric)
        group_sizes.add(spec.group_size)
        if spec.type == "experts":
            if set(pats) != set(PROJS) or spec.bias:
                raise MoecompressError(f"{config.model_type} checkpoints keep experts fused",
                                       "compressed-tensors needs one linear per expert")
            for p in PROJS:
                local = {k[len(path) + len(p) + 2:]: v for k, v in sd.items() if k.startswith(f"{path}.{p}_")}
                codes, scale, zero = decode(spec.codecs[p], local)
                for e in range(codes.shape[0]):
                    suffix = pats[p].split("experts", 1)[1].replace("*", str(e))  # ".{e}.w1.weight"
                    name = _original(f"{path}{suffix}", renamings)[: -len(".weight")]
                    for k, v in _ct_tensors(fmt, codes[e], scale[e], zero[e], bits, spec.symmetric).items():
                        new[f"{name}.{k}"] = v
                    packed_prefixes.append(name)
                sd = {k: v for k, v in sd.items() if not k.startswith(f"{path}.{p}_")}
        else:
            local = {k[len(path) + len("weight_") + 1:]: v for k, v in sd.items() if k.startswith(f"{path}.weight_")}
            codes, scale, zero = decode(spec.codec, local)
            name = _original(f"{path}.weight", renamings)[: -len(".weight")]
            for k, v in _ct_tensors(fmt, codes[0], scale[0], zero[0], bits, spec.symmetric).items():
                new[f"{name}.{k}"] = v
            packed_prefixes.append(name)
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{path}.weight_")}
    for k, v in sd.items():
        new[_original(k, renamings)] = v
    gs = group_sizes.pop() if len(group_sizes) == 1 else None
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric == {True}, "dynamic": False,
               "strategy": "group" if fmt == "pack-quantized" and gs not in (-1, None) else "channel",
               "group_size": gs if fmt == "pack-quantized" and gs not in (-1, None) else None,
               "actorder": None, "observer": "minmax"}
    ignore = sorted({k[: -len(".weight")] for k in new if k.endswith(".weight") and new[k].dim() == 2
                     and not new[k].dtype == torch.int8 and "embed" not in k})
    cfg_json["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": act,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None}
    with atomic_output(out, replace=force) as tmp:
        write_checkpoint(new, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        for f in src.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copyfile(f, tmp / f.name)
        report = {"source": str(src), "format": fmt, "modules": len(packed_prefixes), "bits": bits,
                  "group_size": gs, "symmetric": symmetric == {True}}
        (tmp / "moecompress.json").write_text(json.dumps({"exported_from": side, "export": report}, indent=1) + "\n")
    return {**report, "output": str(out), "linears": packed_prefixes}
