"""The ``moecompress`` quantization method for transformers: ``import moecompress`` then
``AutoModelForCausalLM.from_pretrained(packed_dir)`` gives a model whose weights stay packed.

``config.json`` carries ``quantization_config = {"quant_method": "moecompress", "format_version": 2,
"modules": {path: spec}, "checksums": {tensor: crc32}, "activations": {...} | null}`` (docs/FORMAT.md). Before
weights are read, every listed module is swapped for `PackedLinear` / `PackedExperts` (on the meta device);
after loading, every packed tensor must have been read from the checkpoint and match its checksum, or
loading fails: never random weights; every ``ternary-dict`` stream must be well formed (`check_stream`: row
index, codewords within the dictionary, every row decoding to its length). Versions 1 and 2 load; an unknown
format version fails before anything is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from moecompress.formats.checkpoint import QUANT_METHOD, READABLE_VERSIONS, checksum
from moecompress.formats.codecs import CODECS
from moecompress.formats.dictcode import check_stream, dict_table
from moecompress.formats.spec import PROJS, ModuleSpec, module_specs
from moecompress.nn.act_quant import ActQuant
from moecompress.nn.packed import PackedExperts, PackedLinear

__all__ = ["MoecompressQuantConfig", "MoecompressQuantizer", "build_packed_modules", "register"]


class MoecompressQuantConfig(QuantizationConfigMixin):
    def __init__(self, format_version: int | None = None, modules: dict | None = None, checksums: dict | None = None,
                 activations: dict | None = None, quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.checksums = dict(checksums or {})
        self.activations = activations
        for k, v in kwargs.items():  # keep unknown keys so a re-save writes them back
            setattr(self, k, v)


def build_packed_modules(model: torch.nn.Module, modules: Mapping[str, ModuleSpec], activations: dict | None) -> None:
    """Swap every module listed in a packed checkpoint's ``modules`` for its packed counterpart (in place)."""
    aq = ActQuant.from_record(activations)
    for path, spec in modules.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        if spec.type == "linear":
            E, O, C = spec.shape
            new = PackedLinear(C, O, spec.codec, spec.group_size, spec.symmetric, spec.bias)
            new.act = aq
        else:
            new = PackedExperts(spec)
            new.act = None if aq is None else ActQuant(aq.bits, aq.clip_ratio, aq.symmetric, aq.router, None)
        del old
        setattr(parent, name, new)


def verify_packed(model: torch.nn.Module, checksums: dict[str, str]) -> None:
    """Every packed tensor present (not left on the meta device) and equal to its recorded checksum."""
    state = dict(model.named_buffers())
    for key, expected in checksums.items():
        t = state.get(key)
        if t is None or t.is_meta:
            raise ValueError(f"packed tensor {key} was not in the checkpoint")
        t = t.to(torch.float16) if t.is_floating_point() else t
        if checksum(t) != expected:
            raise ValueError(f"packed tensor {key} does not match its checksum (corrupt checkpoint)")


def verify_streams(model: torch.nn.Module) -> None:
    """Every ``ternary-dict`` weight decodes (ValueError naming the weight and the problem otherwise)."""
    for name, m in model.named_modules():
        if not isinstance(m, PackedExperts):
            continue
        for p in PROJS:
            if not CODECS.get(m.codecs[p]).dict:
                continue
            E, O, C = m.num_experts, *((m.hidden, m.intermediate) if p == "down" else (m.intermediate, m.hidden))
            header = getattr(m, f"{p}_dict")
            entries = (m.spec.dict_sizes or {}).get(p, (0, 0))[1]
            if int(header[0]) != entries:
                why = f"the dictionary has {int(header[0])} entries, the config says {entries}"
            else:
                try:
                    why = check_stream(getattr(m, f"{p}_codewords"), getattr(m, f"{p}_row_index"), dict_table(header),
                                       E * O, C)
                except ValueError as e:
                    why = str(e)
            if why:
                raise ValueError(f"packed tensor {name}.{p}: {why}; the checkpoint is corrupt, re-pack the model")


class MoecompressQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-quantized (packed) checkpoints

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        v = getattr(self.quantization_config, "format_version", None)
        if v not in READABLE_VERSIONS:
            raise ValueError(f"moecompress packed format version {v!r} is not supported (this moecompress reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade moecompress or re-pack "
                             "the model")

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        with torch.device("meta"):
            build_packed_modules(model, module_specs(self.quantization_config.modules),
                                 self.quantization_config.activations)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        verify_packed(model, self.quantization_config.checksums)
        verify_streams(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the method with transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, MoecompressQuantConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, MoecompressQuantizer)
