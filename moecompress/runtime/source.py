"""The model a run reads: a streamed directory source (`open_source`), or the whole model in memory as its
checkpoint behaves (`load_model`: recorded activation quantization simulated), and the `generate` demo.

The file reading itself is `io.model`; this module adds what needs the executor and the runtime modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.io.model import (LoadedModel, load_config, load_tokenizer, model_dir, model_label, read_model,
                                  recorded_activations, save_model)
from moecompress.io.validate import check_weight_files
from moecompress.models import find_arch
from moecompress.nn.act_quant import ActQuant, install_act_quant
from moecompress.runtime.dist import Dist
from moecompress.runtime.executor import ModelSource, Placement, resolve_device

__all__ = ["generate_text", "load_model", "open_source"]


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a whole model on the CPU in ``dtype`` (`io.model.read_model`) as its checkpoint behaves: a
    fake-quantized one keeps simulating the activation quantization it records (packed modules apply theirs
    themselves)."""
    loaded = read_model(spec, dtype)
    acts = recorded_activations(loaded.path) if loaded.path is not None else None
    packed = getattr(getattr(loaded.model.config, "quantization_config", None), "quant_method", None) == "moecompress"
    if acts and not packed:
        install_act_quant(loaded.model, loaded.arch, ActQuant.from_record(acts))
    return loaded


def open_source(spec: str | None, scratch: Path, config=None, dist=None) -> ModelSource:
    """The model a run reads, as a streamed directory source (`runtime.executor.ModelSource`). A ``tiny:<type>``
    model is written to ``scratch / "input"`` first (it is small), so every run reads the same way; under
    torchrun (``dist``: a `runtime.dist.Dist`) rank 0 writes it and the others wait."""
    config = config if config is not None else load_config(spec)
    arch = find_arch(config)
    dist = dist or Dist()
    if spec and str(spec).startswith("tiny:"):
        loaded = read_model(spec)
        d = Path(scratch) / "input"
        if dist.writer:
            save_model(loaded, d)
        dist.barrier()
        return ModelSource(loaded.model.config, arch, directory=d, tokenizer=loaded.tokenizer,
                           stored_dtype=loaded.disk_dtype, label=str(spec), path=None)
    path = model_dir(spec)
    check_weight_files(path, getattr(config, "quantization_config", None) is not None)
    tokenizer = load_tokenizer(path)
    return ModelSource(config, arch, directory=path, tokenizer=tokenizer, label=model_label(spec), path=path)


def generate_text(spec: str | None, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
                  seed: int = 0, device: str | torch.device | None = "auto") -> str:
    """Continue ``prompt`` with a model spec (greedy when ``temperature`` is 0); returns prompt + continuation.

    A demonstration: the whole model is loaded onto ``device`` (auto: the first GPU when there is one), in
    float32 on the CPU and in its stored dtype on a GPU; fake-quantized checkpoints keep their simulated
    activation quantization and packed ones compute from their packed weights."""
    dev = resolve_device(device)
    if not prompt:
        raise MoecompressError("the prompt is empty", "give some text with --prompt")
    stored = getattr(load_config(spec), "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    loaded = load_model(spec, Placement(dev).compute_dtype(stored))
    if loaded.tokenizer is None:
        raise MoecompressError(f"model {loaded.source!r} has no tokenizer", "save its tokenizer files with it")
    model = loaded.model.to(dev)
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
            pad_token_id=loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id)
    return loaded.tokenizer.decode(out[0].cpu(), skip_special_tokens=True)
