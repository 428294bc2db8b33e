"""Model directories read and written one decoder layer at a time.

`CheckpointSource` opens a directory's safetensors shards (``safetensors.safe_open``, reading with pread) and groups
every stored tensor by the decoder layer it belongs to, using transformers' own key conversions (so the
per-expert names of a hub Mixtral checkpoint, ``block_sparse_moe.experts.3.w1.weight``, land in the fused
``mlp.experts.gate_up_proj`` of the model). `CheckpointSource.load` materialises one group into a model
skeleton with transformers' loader (``convert_and_load_state_dict_in_model``: the same conversions, dtype
rules and ``keep_in_fp32`` plan as ``from_pretrained``), on a chosen device, reading only that group's
bytes.

`build_skeleton` makes the model on the meta device from ``config.json`` (no memory for weights), with its
non-persistent buffers (rotary tables) real on the compute device.

Writing a checkpoint as it comes is `io.writer`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.io.validate import check_weight_files

__all__ = ["CheckpointSource", "build_skeleton", "layer_of", "release", "stored_dtype"]

_ITEM = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
         "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _open(path: Path):
    """A safetensors file read with ``pread``: memory-mapping would keep every layer's pages mapped (and counted
    in the process's resident memory) for as long as the file is open."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend option
        return safe_open(str(path), framework="pt")


def layer_of(name: str, layers_path: str) -> int | None:
    """The decoder layer a model parameter name belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    m = re.match(rf"^{re.escape(layers_path)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """``AutoModelForCausalLM`` from ``config`` with every parameter and persistent buffer on the meta device,
    and the non-persistent buffers (rotary tables) computed for real on ``device``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    model.eval()
    owners: dict[int, nn.Module] = {}
    for name, buf in list(model.named_buffers()):
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if attr in module._non_persistent_buffers_set and buf.is_meta:
            module._buffers[attr] = torch.empty_like(buf, device=device)
            owners[id(module)] = module
    for module in owners.values():  # what from_pretrained does for buffers no checkpoint holds
        model._init_weights(module)
    return model


def stored_dtype(directory: str | Path) -> torch.dtype:
    """The dtype most of a directory's floating-point bytes are stored in (read from the headers only)."""
    from moecompress.io.validate import read_header

    counts: dict[str, int] = {}
    for f in check_weight_files(directory, quantized=True):
        for k, info in read_header(f).items():
            if k != "__metadata__" and info["dtype"] in _FLOAT:
                begin, end = info["data_offsets"]
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + int(end) - int(begin)
    return _FLOAT[max(counts, key=counts.get)] if counts else torch.float32


def release(module: nn.Module) -> None:
    """Free a module's parameters and persistent buffers (back to the meta device, shapes kept)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and not b.is_meta and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(b, device="meta")
    trim_heap()


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). Tensors
    under glibc's mmap threshold live on the heap, and a freed layer's would otherwise stay resident, mixed
    with live blocks, so resident memory would creep up layer after layer."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class CheckpointSource:
    """The stored tensors of a model directory, grouped by decoder layer, read lazily (memory-mapped)."""

    def __init__(self, directory: str | Path, model: nn.Module, layers_path: str, quantized: bool = False) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.directory = Path(directory)
        files = check_weight_files(self.directory, quantized)
        self._handles: list[Any] = []
        self._where: dict[str, Any] = {}
        try:
            for f in files:
                h = _open(f)
                self._handles.append(h)
                for k in h.keys():
                    self._where[k] = h
        except (SafetensorError, OSError) as e:
            raise MoecompressError(f"cannot open the safetensors in {str(self.directory)!r} ({e})",
                                   "copy the files again from the original model") from None
        self.mapping = get_model_conversion_mapping(model)
        renamings = [c for c in self.mapping if isinstance(c, WeightRenaming)]
        converters = [c for c in self.mapping if isinstance(c, WeightConverter)]
        meta_sd = model.state_dict()
        self.target: dict[str, str] = {}  # stored key -> model key (the first target of a converter)
        self.groups: dict[int | None, list[str]] = {}
        for key in sorted(self._where):
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
            if target not in meta_sd and key in meta_sd:
                target = key
            self.target[key] = target
            self.groups.setdefault(layer_of(target, layers_path), []).append(key)
        # the conversions this checkpoint's names needed: what save_pretrained would reverse on the way out
        self.used_conversions = [c for c in self.mapping if c.was_used()]
        self.bytes_read = 0
        self.read_log: dict[str, int] = {}  # stored key -> bytes read from it

    def _count(self, key: str, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.read_log[key] = self.read_log.get(key, 0) + nbytes

    def keys_for(self, targets: Iterable[str]) -> list[str]:
        """Stored keys whose model parameter (first target of a conversion) is in ``targets``."""
        targets = set(targets)
        return [k for k in sorted(self._where) if self.target[k] in targets]

    def shape(self, key: str) -> list[int]:
        return list(self._where[key].get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return sorted(self._where)

    def layer_keys(self, layer: int | None) -> list[str]:
        """Stored keys of decoder layer ``layer`` (None: everything outside the decoder layers)."""
        return list(self.groups.get(layer, []))

    def nbytes(self, key: str) -> int:
        sl = self._where[key].get_slice(key)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _ITEM.get(sl.get_dtype(), 4)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._where)

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor, in its stored dtype, on the CPU."""
        t = self._where[key].get_tensor(key)
        self._count(key, t.numel() * t.element_size())
        return t

    def read_rows(self, key: str, dim: int, ids: Sequence[int]) -> torch.Tensor:
        """``tensor.index_select(dim, ids)`` (dim 0 or 1) reading only those rows (runs of consecutive ids in
        one read each), in the stored dtype, on the CPU."""
        sl = self._where[key].get_slice(key)
        ids = [int(i) for i in ids]
        parts, start = [], 0
        for j in range(1, len(ids) + 1):
            if j == len(ids) or ids[j] != ids[j - 1] + 1:
                a, b = ids[start], ids[j - 1] + 1
                parts.append(sl[a:b] if dim == 0 else sl[:, a:b])
                start = j
        t = torch.cat(parts, dim=dim) if parts else torch.empty(0)
        self._count(key, t.numel() * t.element_size())
        return t

    def load(self, model: nn.Module, keys: Iterable[str], device: torch.device | str, dtype: torch.dtype,
             quantizer: Any = None, rows: dict[str, tuple[int, Sequence[int]]] | None = None,
             rename: dict[str, str] | None = None) -> None:
        """Materialise the model parameters of stored ``keys`` into ``model`` on ``device``, converted as
        ``from_pretrained`` converts them (dtype: the skeleton's, with its keep-in-fp32 plan).

        ``rows``: stored keys read only in part, ``{key: (dim, ids)}`` (`read_rows`; an expert subset of a fused
        stack or a router); ``rename``: stored keys handed to the loader under another stored name (a kept
        per-expert tensor renumbered). The skeleton's shapes must be those of the subset."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        keys = list(keys)
        rows, rename = rows or {}, rename or {}
        state = {rename.get(k, k): _Rows(self, k, *rows[k]) if k in rows else self._where[k].get_slice(k)
                 for k in keys}
        for k in keys:
            if k not in rows:  # partial reads are counted when they happen
                self._count(k, self.nbytes(k))
        config = LoadStateDictConfig(device_map={"": torch.device(device)}, dtype=dtype,
                                     dtype_plan=model._get_dtype_plan(dtype), weight_mapping=self.mapping,
                                     hf_quantizer=quantizer)
        with _quiet_loading():
            info, _ = convert_and_load_state_dict_in_model(model, state, config)
            _align(model)
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()  # the head shares the embedding's new parameter
        if info.mismatched_keys:
            name, got, want = next(iter(info.mismatched_keys))
            raise MoecompressError(f"{str(self.directory)!r}: tensor {name!r} has shape {list(got)}, config.json "
                                   f"implies {list(want)}", "the weights do not fit config.json; re-save the model")
        if info.conversion_errors:
            name, err = next(iter(info.conversion_errors.items()))
            raise MoecompressError(f"{str(self.directory)!r}: cannot convert {name!r} ({err})",
                                   "re-save the model with transformers 5")

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()


class _Rows:
    """Some rows of a stored tensor, read when transformers' loader materialises it (``t[...]``)."""

    def __init__(self, source: CheckpointSource, key: str, dim: int, ids: Sequence[int]) -> None:
        self.source, self.key, self.dim, self.ids = source, key, dim, list(ids)

    def __getitem__(self, item: Any) -> torch.Tensor:
        return self.source.read_rows(self.key, self.dim, self.ids)[item]


def _align(model: nn.Module) -> None:
    """Copy CPU tensors read from a file into freshly allocated (64-byte aligned) memory. safetensors hands out
    8-byte aligned storage, and CPU BLAS kernels take other code paths for it, so a model read from disk would
    differ from the same model held in memory in the last bits of some sums."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, t in list(table.items()):
                if t is not None and t.device.type == "cpu" and not t.is_meta and t.data_ptr() % 64:
                    new = t.detach().clone()
                    table[attr] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else new


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers draws a tqdm bar per call ("Loading weights"): one call per layer would flood the terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    old = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # one layer at a time: threads only add peak memory
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old
        if was:
            hf_logging.enable_progress_bar()

