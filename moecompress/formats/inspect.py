"""Describe a model directory's storage: per quantized module the codec, bits per weight and bytes, the routed
experts' bits per weight (every stored tensor of the packed experts modules: codes, scales, row indices,
dictionaries; biases excluded) and the whole model's bits per parameter (all weight files), and the overall
compression against a 16-bit checkpoint. Reads ``config.json`` and safetensors headers only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import QUANT_METHOD, READABLE_VERSIONS
from moecompress.formats.quant_record import is_record_file
from moecompress.formats.spec import module_specs

__all__ = ["inspect_dir", "storage_summary"]

_ITEM = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _tensors(directory: Path) -> dict[str, tuple[list[int], int]]:
    out = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MoecompressError(f"no safetensors weights in {str(directory)!r}", "give a model directory")
    for f in files:
        if is_record_file(f.name):
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shape = list(sl.get_shape())
                    n = 1
                    for d in shape:
                        n *= d
                    out[k] = (shape, n * _ITEM.get(sl.get_dtype(), 4))
        except (SafetensorError, OSError) as e:
            raise MoecompressError(f"cannot read {str(f)!r} ({e})", "the file is truncated or corrupt") from None
    return out


def inspect_dir(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise MoecompressError(f"{str(directory)!r} has no config.json", "give a model directory")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or {}
    tensors = _tensors(directory)
    total_bytes = sum(b for _, b in tensors.values())
    rows, dense_weights, packed_bytes = [], 0, 0
    expert_weights, expert_bytes = 0, 0
    if qc.get("quant_method") == QUANT_METHOD:
        if qc.get("format_version") not in READABLE_VERSIONS:
            raise MoecompressError(f"unknown moecompress format version {qc.get('format_version')!r}",
                                   f"this moecompress reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        for path, spec in sorted(module_specs(qc["modules"]).items()):
            E, O, C = spec.shape
            weights = (3 if spec.type == "experts" else 1) * E * O * C
            mine = {k: b for k, (_, b) in tensors.items()
                    if (k.startswith(path + ".") or k.startswith(path + "_")) and not k.endswith("bias")}
            nbytes = sum(mine.values())
            codec = "/".join(sorted(set(spec.all_codecs)))
            rows.append({"module": path, "type": spec.type, "codec": codec, "group_size": spec.group_size,
                         "weights": weights, "bytes": nbytes, "bits_per_weight": 8 * nbytes / weights})
            dense_weights += weights
            packed_bytes += nbytes
            if spec.type == "experts":
                expert_weights += weights
                expert_bytes += nbytes
    params = 0
    for k, (shape, b) in tensors.items():
        if not any(k.startswith(r["module"] + ".") or k.startswith(r["module"] + "_") for r in rows):
            n = 1
            for d in shape:
                n *= d
            params += n
    params += dense_weights
    return {"directory": str(directory), "format": f"{QUANT_METHOD} v{qc['format_version']}" if rows else
            (qc.get("quant_method") or "dense"), "modules": rows, "packed_weights": dense_weights,
            "packed_bytes": packed_bytes, "packed_bits_per_weight": 8 * packed_bytes / max(1, dense_weights),
            "expert_weights": expert_weights, "expert_bytes": expert_bytes,
            "expert_bits_per_weight": 8 * expert_bytes / expert_weights if expert_weights else None,
            "file_bytes": total_bytes, "params": params, "bits_per_param": 8 * total_bytes / max(1, params),
            "compression_vs_16bit": (2 * params) / max(1, total_bytes)}


def storage_summary(directory: str | Path) -> dict[str, Any]:
    """Parameters, bytes and bits per parameter of a model directory, exactly as `inspect_dir` counts them
    (the one definition that ``inspect``, ``eval`` and ``run`` report)."""
    d = inspect_dir(directory)
    return {"params": d["params"], "size_bytes": d["file_bytes"], "bits_per_param": d["bits_per_param"],
            "expert_bits_per_weight": d["expert_bits_per_weight"], "size_source": "files", "format": d["format"]}
