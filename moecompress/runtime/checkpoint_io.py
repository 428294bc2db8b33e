"""Per-tensor lazy access to a checkpoint, and expert surgery at the file level.

`CheckpointReader` opens a model directory's safetensors (single file or sharded) and reads tensors,
or only some rows of a tensor, on demand, counting every byte read. `classify` maps each checkpoint
key to its role using transformers' own key conversions (so on-disk names such as Mixtral's
``block_sparse_moe.experts.3.w1.weight`` resolve to ``mlp.experts.gate_up_proj``): a routed expert's
per-expert tensor, a fused expert stack, a router tensor, or anything else. `reduced_state_dict` builds
a checkpoint-format state dict that keeps only chosen experts (renumbered, routers sliced) while
reading only those experts' bytes; transformers loads it (``from_pretrained(None, config=...,
state_dict=...)``) or `write_checkpoint` writes it as a standard directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import write_checkpoint
from moecompress.models.base import MoEArch

__all__ = ["CheckpointReader", "KeyRole", "classify", "reduced_state_dict", "write_checkpoint"]

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class CheckpointReader:
    """Lazy, counted reads from ``directory``'s ``*.safetensors`` (with or without an index file)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise MoecompressError(f"no safetensors weights in {str(self.directory)!r}", "give a model directory")
        self._handles, self._where = [], {}
        try:
            for name in files:
                h = safe_open(str(self.directory / name), framework="pt")
                self._handles.append(h)
                for k in h.keys():
                    self._where[k] = h
        except (SafetensorError, OSError) as e:
            raise MoecompressError(f"cannot read the safetensors in {str(self.directory)!r} ({e})",
                                   "check that the files are complete") from None
        self.bytes_read = 0
        self.read_log: dict[str, int] = {}  # key -> bytes read from disk
        self._cache: dict[str, torch.Tensor] = {}  # whole tensors already read (each is read from disk once)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> list[int]:
        return list(self._where[key].get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        sl = self._where[key].get_slice(key)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _itemsize(sl.get_dtype())

    def _count(self, key: str, t: torch.Tensor) -> torch.Tensor:
        b = t.numel() * t.element_size()
        self.bytes_read += b
        self.read_log[key] = self.read_log.get(key, 0) + b
        return t

    def get(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._count(key, self._where[key].get_tensor(key))
        return self._cache[key]

    def forget(self) -> None:
        """Drop cached tensors (they stay counted as read)."""
        self._cache.clear()

    def get_rows(self, key: str, rows: Sequence[int], dim: int = 0) -> torch.Tensor:
        """``tensor.index_select(dim, rows)`` reading only those rows (dim 0, or dim 1 of a 2-D tensor)."""
        sl = self._where[key].get_slice(key)
        parts = []
        for r in rows:
            parts.append(sl[r:r + 1] if dim == 0 else sl[:, r:r + 1])
        return self._count(key, torch.cat(parts, dim=dim))


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)


@dataclass(frozen=True)
class KeyRole:
    kind: str  # "expert" (one expert's tensor), "fused" (an [E, ...] stack), "router", "other"
    layer: int | None = None
    expert: int | None = None
    dim: int = 0  # the expert axis of router / fused tensors


@dataclass
class Classified:
    roles: dict[str, KeyRole] = field(default_factory=dict)

    def expert_keys(self) -> list[str]:
        return [k for k, r in self.roles.items() if r.kind in ("expert", "fused")]

    def router_weight_keys(self, arch: MoEArch, layers: Sequence[int]) -> list[str]:
        return [k for layer in layers for k, r in self.roles.items()
                if r.kind == "router" and r.layer == layer and k.endswith(arch.router_weight)]


def classify(reader: CheckpointReader, config, arch: MoEArch) -> Classified:
    """The role of every checkpoint key, from transformers' conversion table and the adapter's paths."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    conversions = get_model_conversion_mapping(meta)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    E = arch.num_experts(config)
    experts_params: dict[str, int] = {}
    routers: dict[str, int] = {}
    for view in arch.moe_blocks(meta):
        block = f"{arch.layers}.{view.index}.{arch.moe_block}"
        for name, _ in view.experts.module.named_parameters():
            experts_params[f"{block}.{arch.experts}.{name}"] = view.index
        for path in (arch.router_weight, arch.router_bias, arch.correction_bias):
            if path is not None:
                routers[f"{block}.{arch.router}.{path}"] = view.index
    out = Classified()
    for key in reader.keys():
        target, _ = rename_source_key(key, renamings, converters, meta.base_model_prefix, meta.state_dict())
        if target in experts_params:
            m = _PER_EXPERT.search(key)
            if m:
                out.roles[key] = KeyRole("expert", experts_params[target], int(m.group(1)))
            elif reader.shape(key)[0] == E:
                out.roles[key] = KeyRole("fused", experts_params[target])
            else:
                raise MoecompressError(f"cannot tell the experts apart in checkpoint tensor {key!r}",
                                       "re-save the model with transformers 5")
        elif target in routers:
            shape = reader.shape(key)
            out.roles[key] = KeyRole("router", routers[target], dim=1 if len(shape) == 2 and shape[0] == 1 else 0)
        else:
            out.roles[key] = KeyRole("other")
    return out


def reduced_state_dict(
    reader: CheckpointReader,
    classified: Classified,
    keep: Mapping[int, Sequence[int]],
    include: Callable[[str, KeyRole], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Checkpoint-format tensors keeping only ``keep[layer]`` experts (renumbered in that order).

    Reads only the kept experts' bytes (whole per-expert tensors, or rows of fused stacks) plus every
    non-expert tensor accepted by ``include`` (default: all). Layers absent from ``keep`` keep all experts.
    """
    sd: dict[str, torch.Tensor] = {}
    for key, role in classified.roles.items():
        if include is not None and not include(key, role):
            continue
        ids = None if role.layer is None else keep.get(role.layer)
        if role.kind == "expert":
            if ids is None:
                sd[key] = reader.get(key)
            elif role.expert in ids:
                new = ids.index(role.expert)
                sd[key[:_PER_EXPERT.search(key).start()] + f".experts.{new}." + key[_PER_EXPERT.search(key).end():]] = (
                    reader.get(key))
        elif role.kind in ("fused", "router") and ids is not None:
            sd[key] = reader.get_rows(key, list(ids), role.dim) if role.kind == "fused" else (
                reader.get(key).index_select(role.dim, torch.as_tensor(list(ids))))
        else:
            sd[key] = reader.get(key)
    return sd
