"""Export a packed symmetric W4A16 or W8A16 checkpoint to the compressed-tensors format (vLLM / llm-compressor).

Both become ``pack-quantized`` (the layout llm-compressor writes for W4A16 / W8A16): ``weight_packed`` int32,
dense LSB-first along in_features (identical bits to ours: compressed-tensors stores the signed code plus
``2^(b-1)``, i.e. our unsigned code), ``weight_scale [O, G]`` float16 as stored, ``weight_shape [2]`` int64; one
config group targets ``Linear`` with a group strategy (``channel`` when every linear has one group per row).
Routed experts are written one linear per expert under the checkpoint's original per-expert names, derived
from transformers' own conversion table (Mixtral ``block_sparse_moe.experts.{e}.w1``, Qwen
``experts.{e}.gate_proj``, ...); transformers stacks them back into its fused 3-D experts at load time.

What it refuses, and why (transformers 5.24 + compressed-tensors 0.20, checked by loading the export in a
fresh process with plain ``from_pretrained``; ``tests/test_export.py``):

* asymmetric weights: compressed-tensors creates the zero point of a ``Linear`` unpacked ``[O, G]`` while
  the format stores it packed ``[O/8, G]`` (size mismatch), and transformers decompresses MoE experts
  without their zero points ("Asymmetric quant requires zero-point values"; transformers PR #47430);
* W8A8 (``int-quantized``): transformers decompresses MoE experts only from ``weight_packed`` or FP8 and
  would run them without activation quantization;
* families whose checkpoints keep experts fused (gpt-oss, Granite), rotated down projections, other codecs.

Linears left in full precision (LM head, shared-expert gates) and every router are listed in ``ignore`` under
both their in-memory names (what compressed-tensors matches inside transformers) and their checkpoint names
(what vLLM matches). A router that the packed checkpoint stores quantized is written dequantized (float32),
as every MoE runtime builds routers unquantized.
"""

from __future__ import annotations

import json
import math
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
from moecompress.kernels.reference import dequantize
from moecompress.models import find_arch
from moecompress.formats.spec import PROJS, module_specs
from moecompress.io.outdir import atomic_output, check_output

__all__ = ["export_compressed_tensors"]

_BITS = {"int4": 4, "int8": 8}


def _load_all(directory: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sd[k] = h.get_tensor(k)
    return sd


def _naming(meta):
    """(reverse renamings, {"gate": pattern, "up": pattern, "down": pattern}) of the model's checkpoint format."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

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


def _is_linear(module: torch.nn.Module) -> bool:
    """What compressed-tensors' ``Linear`` target matches: any class named ``Linear`` in the MRO."""
    return any(c.__name__ == "Linear" for c in type(module).__mro__)


def _check_scheme(qc: dict, side: dict) -> int:
    """The bit width of a checkpoint this exporter can write so that transformers loads it; else a one-line error."""
    scheme = (side.get("quantization") or {}).get("scheme")
    specs = module_specs(qc["modules"]).values()
    codecs = {s.codec for s in specs if s.type == "linear"} | {
        c for s in specs if s.type == "experts" for c in s.codecs.values()
    }
    what = "+".join(sorted(c for c in codecs if c)) if not scheme or len(codecs) > 1 else scheme
    if qc.get("activations"):
        raise MoecompressError(
            f"compressed-tensors export supports W4A16 and W8A16, not {what}: transformers loads compressed-tensors "
            "MoE experts only as packed or FP8 weights and runs them without activation quantization",
            "quantize W4A16 or W8A16 with `symmetric: true` to export, or keep the moecompress checkpoint",
        )
    if len(codecs) != 1 or not codecs <= set(_BITS):
        raise MoecompressError(
            f"compressed-tensors export supports W4A16 and W8A16, not {what}",
            "quantize W4A16 or W8A16 with --symmetric (`symmetric: true` in a recipe) and one width (no "
            "--linear-bits) to export",
        )
    if not all(s.symmetric for s in specs):
        raise MoecompressError(
            f"{what} has asymmetric weights, which transformers 5.x + compressed-tensors cannot load (packed zero "
            "points: Linear size mismatch, MoE experts decompressed without them)",
            "quantize with symmetric weights (`moecompress quantize --symmetric`, or `symmetric: true` in the "
            "recipe's quantize stage) to export",
        )
    if any(s.type == "experts" and s.intermediate_rotation_seed is not None for s in specs):
        raise MoecompressError(
            "the experts' down projections are stored in a rotated basis",
            "quantize without --rotate-intermediate to export",
        )
    return _BITS[codecs.pop()]


def _ct_tensors(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int | None
) -> dict[str, torch.Tensor]:
    """One linear's ``pack-quantized`` tensors from our unsigned symmetric codes ``[O, C]`` and scales ``[O, G]``;
    ``group``: the exported group size, a divisor of ours (each scale repeated), None for one group per row."""
    O, C = codes.shape
    if not bool((zero == 2 ** (bits - 1)).all()):
        raise MoecompressError(
            "a symmetric module stores zero points other than 2^(b-1)",
            "re-quantize with moecompress quantize; the packed checkpoint is inconsistent",
        )
    if group is not None:
        scale = scale.repeat_interleave(C // scale.shape[1] // group, dim=1)  # [O, C / group]
    return {
        "weight_packed": pack_bits(codes, bits),
        "weight_scale": scale.to(torch.float16),
        "weight_shape": torch.tensor([O, C], dtype=torch.int64),
    }


def export_compressed_tensors(src: str | Path, output: str | Path, force: bool = False) -> dict[str, Any]:
    """Write ``src`` (a moecompress packed symmetric W4A16 / W8A16 directory) as a compressed-tensors checkpoint."""
    src = Path(src)
    out = check_output(output, force, [src])
    cfg_json = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    qc = cfg_json.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise MoecompressError(
            f"{str(src)!r} is not a moecompress packed checkpoint",
            "quantize it first (moecompress quantize ... writes the packed format)",
        )
    side = json.loads((src / "moecompress.json").read_text()) if (src / "moecompress.json").is_file() else {}
    bits = _check_scheme(qc, side)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    renamings, pats = _naming(meta)
    modules = module_specs(qc["modules"])
    for path, spec in modules.items():
        if spec.type == "experts" and (set(pats) != {"gate", "up", "down"} or spec.bias):
            raise MoecompressError(
                f"{config.model_type} checkpoints keep experts fused", "compressed-tensors needs one linear per expert"
            )
    names = {id(m): n for n, m in meta.named_modules()}
    routers = [names[id(v.router)] for v in find_arch(config).moe_blocks(meta)]
    sd = _load_all(src)

    # decode every packed linear: (checkpoint name, codes [O, C], scales [O, G], zeros [O, G])
    linears: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    dense: dict[str, torch.Tensor] = {}
    for path, spec in modules.items():
        projs = PROJS if spec.type == "experts" else ("weight",)
        for p in projs:
            local = {k[len(path) + len(p) + 2 :]: v for k, v in sd.items() if k.startswith(f"{path}.{p}_")}
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{path}.{p}_")}
            codes, scale, zero = decode(spec.codecs[p] if spec.type == "experts" else spec.codec, local)
            if spec.type != "experts":
                if any(path == r or path.startswith(r + ".") for r in routers):  # routers stay unquantized
                    dense[f"{path}.weight"] = dequantize(codes, scale, zero)[0]
                else:
                    linears.append(
                        (_original(f"{path}.weight", renamings)[: -len(".weight")], codes[0], scale[0], zero[0])
                    )
                continue
            for e in range(codes.shape[0]):
                suffix = pats[p].split("experts", 1)[1].replace("*", str(e))  # ".{e}.w1.weight"
                linears.append(
                    (_original(f"{path}{suffix}", renamings)[: -len(".weight")], codes[e], scale[e], zero[e])
                )

    # one group size for all (compressed-tensors gives all MoE experts one scheme): the largest that divides
    # every linear's own; a linear with one group per row counts its column count; all per-row -> "channel"
    sizes = {c.shape[1] // s.shape[1] for _, c, s, _ in linears}
    per_row = all(s.shape[1] == 1 for _, _, s, _ in linears)
    group = None if per_row else math.gcd(*sizes)
    new: dict[str, torch.Tensor] = {}
    for name, codes, scale, zero in linears:
        for k, v in _ct_tensors(codes, scale, zero, bits, group).items():
            new[f"{name}.{k}"] = v
    for k, v in {**sd, **dense}.items():
        new[_original(k, renamings)] = v

    quantized = {name for name, *_ in linears}
    ignore = set()
    for n, m in meta.named_modules():
        disk = _original(f"{n}.weight", renamings)[: -len(".weight")]
        if (_is_linear(m) or n in routers) and disk not in quantized:  # routers: whatever class a runtime uses
            ignore |= {n, disk}
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "dynamic": False,
        "strategy": "channel" if group is None else "group",
        "group_size": group,
        "actorder": None,
        "observer": "minmax",
    }
    cfg_json["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }
    with atomic_output(out, replace=force) as tmp:
        write_checkpoint(new, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        for f in src.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copyfile(f, tmp / f.name)
        report = {
            "source": str(src),
            "format": "pack-quantized",
            "modules": len(linears),
            "bits": bits,
            "group_size": group,
            "symmetric": True,
        }
        (tmp / "moecompress.json").write_text(json.dumps({"exported_from": side, "export": report}, indent=1) + "\n")
    return {**report, "output": str(out), "linears": sorted(quantized)}
