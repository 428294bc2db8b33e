"""Checks of a model directory's weight files before transformers reads them, and of loaded tensors.

Each problem gets its own one-line message and fix, instead of one generic "cannot load": a shard missing
from the index, an index that is not JSON, a file whose safetensors header is corrupt, a truncated file
(its header promises more bytes than it has), PyTorch ``.bin`` weights only, integer weights in a model whose
config declares no quantization, and non-finite values (named by tensor).

The safetensors layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoecompressError

__all__ = ["check_finite", "check_weight_files", "read_header"]

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # safetensors refuses larger headers too
# moecompress records, not model weights: the profile, the quantization record (and its shards)
_SIDE_FILES = re.compile(r"^(profile|quantization(-\d{5}-of-\d{5})?)\.safetensors$")
_INT = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL"}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size. One-line errors."""
    name = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoecompressError(f"{name!r} is empty or truncated ({size} bytes)",
                                       "copy the file again from the original model")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > size - 8:
                raise MoecompressError(f"{name!r} is not a valid safetensors file (corrupt header length)",
                                       "copy the file again from the original model, or re-save the model")
            raw = f.read(n)
    except OSError as e:
        raise MoecompressError(f"cannot read {name!r} ({e.strerror or e.__class__.__name__})",
                               "check the file's permissions and the disk") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise MoecompressError(f"{name!r} is not a valid safetensors file (corrupt header)",
                               "copy the file again from the original model, or re-save the model") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise MoecompressError(f"{name!r} is not a valid safetensors file (entry {key!r} is malformed)",
                                   "copy the file again from the original model, or re-save the model") from None
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise MoecompressError(f"{name!r} is truncated: it has {size:,} bytes, its header needs {8 + n + end:,}",
                               "the copy or download stopped early; copy the file again from the original model")
    return header


def check_weight_files(directory: str | Path, quantized: bool = False) -> list[Path]:
    """Check that ``directory`` holds complete safetensors weights; return the weight files.

    ``quantized``: the config declares a quantization method (integer tensors are then expected).
    """
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise MoecompressError(f"the shard index {str(index)!r} is corrupt (not JSON with a 'weight_map')",
                                   "copy it again from the original model, or re-save the model") from None
        files = sorted({str(v) for v in weight_map.values()})
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MoecompressError(f"shard {missing[0]!r}{more} listed in {INDEX} is missing from {str(directory)!r}",
                                   "copy every shard of the model into the directory")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors") if not _SIDE_FILES.match(p.name))
        weight_map = None
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise MoecompressError(f"{str(directory)!r} has PyTorch .bin weights only",
                                   "convert them: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)")
        raise MoecompressError(f"{str(directory)!r} has no safetensors weights", "give a model directory with its "
                               "*.safetensors files (and model.safetensors.index.json when sharded)")
    paths = [directory / f for f in files]
    for path in paths:
        header = read_header(path)
        if weight_map is not None:
            listed = [k for k, v in weight_map.items() if v == path.name]
            absent = [k for k in listed if k not in header]
            if absent:
                raise MoecompressError(f"{str(path)!r} lacks tensor {absent[0]!r} that {INDEX} places in it",
                                       "the shard does not belong to this index; copy the model again")
        if not quantized:
            ints = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] in _INT
                    and k.endswith("weight")]
            if ints:
                raise MoecompressError(
                    f"tensor {ints[0]!r} in {str(path)!r} is stored as {header[ints[0]]['dtype']}, but config.json "
                    "declares no quantization", "use the config.json that came with these weights")
    return paths


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse NaN or infinite values in floating-point tensors, naming the first bad tensor."""
    for name, t in named:
        if not t.is_floating_point() or t.is_meta or not t.numel():
            continue
        # one fast reduction; NaN or inf make the sum non-finite, and only then (or on an overflow of finite
        # values) the exact element-wise test runs
        if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MoecompressError(f"tensor {name!r} of {where} holds {bad:,} NaN or infinite values",
                                   "the checkpoint is damaged: restore it from the original model")
