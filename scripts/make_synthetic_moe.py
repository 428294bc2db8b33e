#!/usr/bin/env python
"""Write a synthetic MoE checkpoint of any size, tensor by tensor, with seeded random weights.

For memory and speed benchmarks only (layer streaming, packing, GPU kernels): the weights are random,
so quality numbers stay on trained models.

What it writes (``out_dir``), as ``save_pretrained`` would:
  * ``config.json`` (built with ``AutoConfig.for_model``, ``dtype`` bfloat16; every spelling of the expert
    count that moecompress's adapter lists, as ``moecompress``'s own saves do) and ``generation_config.json``;
  * ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards of at most ``shard_bytes``
    plus ``model.safetensors.index.json`` (``metadata.total_size`` / ``total_parameters``, ``weight_map``);
  * the bundled demo tokenizer (``moecompress/assets/demo-moe``), and ``vocab_size`` set to its size by
    default, so ``moecompress eval`` / ``profile`` run on the bundled text.

The tensor names, shapes and dtypes are not hand-written: the model is built on the meta device from
the config, its state dict is taken, tied weights are dropped and transformers' own reverse weight
conversion is applied, exactly as ``save_pretrained`` does. In transformers 5 that conversion turns
the in-memory fused experts (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) back into
the families' hub layout (Mixtral ``block_sparse_moe.experts.{e}.w1/w2/w3.weight``, Qwen
``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``); ``--layout fused`` writes the in-memory names
instead (transformers loads both). Any family transformers can build from a config works; the
generic options (``--experts``, ``--top-k``, ``--intermediate`` ...) are mapped onto the family's
config keys, and ``--set key=value`` sets any other key.

Memory: the shard plan is computed from shapes alone, every shard's safetensors header is written
first, then each tensor is generated and written in chunks of 2 Mi elements (float32 draw, scaled,
cast), drawn by ``--workers`` threads into a fixed pool of buffers and written in order by one more
thread. The writer never holds a tensor, let alone a shard: its peak RSS is the Python/torch/
transformers baseline plus (workers + 2) x 12 MB, whatever the model size.

Weights: every chunk of every tensor is drawn from its own ``torch.Generator`` seeded from
``blake2b(seed, tensor name, chunk index)``, so the output is byte-for-byte deterministic (for a given
torch build and CPU type) and independent of the shard size. Matrices are ``N(0, 1/fan_in)`` with
fan_in the last dimension (activations stay O(1) through any number of layers; router logits are
O(1), so routing is random but not uniform), norm weights are 1, norm biases 0, other vectors
(biases, attention sinks, correction biases) ``N(0, 0.02^2)``, integer buffers 0.

Usage::

    python scripts/make_synthetic_moe.py OUT [--model-type mixtral] [--layers 4] [--hidden 2048]
        [--intermediate 5632] [--experts 8] [--top-k 2] [--vocab N] [--heads N] [--kv-heads N]
        [--head-dim N] [--tie] [--shard-size 2GB] [--seed 0] [--dtype bf16] [--layout saved|fused]
        [--set KEY=VALUE ...] [--workers N] [--no-tokenizer] [--force] [--quiet]

    # Mixtral-shaped benchmark models (hidden 2048, 16 heads / 4 KV heads, 8 experts of width 5632, top-2,
    # vocab 8192): 0.57 GB per layer
    python scripts/make_synthetic_moe.py /data/syn-4l --layers 4       # 1.18 B parameters, 2.4 GB
    python scripts/make_synthetic_moe.py /data/syn-16l --layers 16     # 4.63 B, 9.3 GB
    python scripts/make_synthetic_moe.py /data/syn-44l --layers 44     # 12.7 B, 25.4 GB (23.6 GiB): above 24 GB RAM
    # two layers at Mixtral-8x7B width (hidden 4096, 32 heads / 8 KV heads, experts of width 14336): 5.9 GB
    python scripts/make_synthetic_moe.py /data/syn-8x7b-2l --layers 2 --hidden 4096 --intermediate 14336
    python scripts/make_synthetic_moe.py /data/syn-qwen3 --model-type qwen3_moe --experts 64 --top-k 8 \\
        --intermediate 768                                            # 2.6 GB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import queue
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "moecompress" / "assets" / "demo-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHUNK = 1 << 21  # elements per generated chunk (and per seeded generator): part of the output's definition
DEFAULT_SHARD_BYTES = 2_000_000_000

# generic option -> the config keys it may set, first one the family's config has wins
EXPERT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k")
INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")  # every one present is set

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}

__all__ = ["main", "parse_size", "plan_shards", "plan_tensors", "synthetic_config", "write_synthetic_moe"]


# ---------------------------------------------------------------------------------------------- config
def parse_size(s: int | str) -> int:
    """``2GB`` -> 2e9, ``512MiB`` -> 512 * 2**20, ``300000`` -> 300000 (bytes)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(s), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {s!r} (examples: 2GB, 500MB, 1GiB, 300000)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[d]


def _tokenizer_info(demo_dir: Path = DEMO_DIR) -> tuple[int, int | None]:
    """(size with added tokens, id of the eos token) of the bundled demo tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    eos = json.loads((demo_dir / "tokenizer_config.json").read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.get_vocab_size(with_added_tokens=True), None if eos is None else tok.token_to_id(eos)


def synthetic_config(
    model_type: str = "mixtral",
    layers: int = 4,
    hidden: int = 2048,
    intermediate: int = 5632,
    experts: int = 8,
    top_k: int = 2,
    vocab: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    tie_embeddings: bool = False,
    dtype: torch.dtype | str = torch.bfloat16,
    token_id: int | None = None,
    overrides: Mapping[str, Any] | None = None,
):
    """The family's config with the generic sizes mapped onto its keys (``overrides`` win)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)

    def has(key: str) -> bool:  # aliases in the config's attribute_map count
        return hasattr(default, key)

    heads = heads or max(1, hidden // 128)
    mla = has("kv_lora_rank")  # multi-head latent attention: one latent, as many KV heads as heads
    kv_heads = kv_heads or (heads if mla else max(1, heads // 4))
    kw: dict[str, Any] = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, tie_word_embeddings=tie_embeddings)
    if vocab is not None:
        kw["vocab_size"] = vocab
    expert_key = next((k for k in EXPERT_KEYS if has(k)), None)
    top_k_key = next((k for k in TOP_K_KEYS if has(k)), None)
    if expert_key is None or top_k_key is None:
        raise ValueError(f"{model_type!r}: no routed-expert count / top-k key among {EXPERT_KEYS} / {TOP_K_KEYS}; "
                         "is it an MoE family? (set its keys with overrides / --set)")
    kw[expert_key], kw[top_k_key] = experts, top_k
    for k in INTERMEDIATE_KEYS:
        if has(k):
            kw[k] = intermediate
    if head_dim is not None:
        kw["head_dim"] = head_dim
    elif has("head_dim") and not mla:  # MLA families keep their own head widths
        kw["head_dim"] = hidden // heads
    if token_id is not None:
        kw.update(bos_token_id=token_id, eos_token_id=token_id, pad_token_id=token_id)
    kw.update(overrides or {})
    cfg = AutoConfig.for_model(model_type, **kw)
    n_group, n_experts = getattr(cfg, "n_group", None), getattr(cfg, expert_key)
    if isinstance(n_group, int) and n_group > 1 and n_experts % n_group:
        raise ValueError(f"{model_type!r} routes within n_group={n_group} expert groups, which {n_experts} experts "
                         "do not fill evenly: set n_group and topk_group "
                         "(overrides / --set n_group=1 --set topk_group=1)")
    cfg.dtype = _dtype(dtype)
    return cfg


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=cfg.dtype)


def plan_tensors(cfg, layout: str = "saved") -> tuple[list[TensorSpec], int, str]:
    """The tensors ``save_pretrained`` would write for ``cfg`` (names, shapes, dtypes) in layer order,
    the model's parameter count and its class name, all from a meta-device model.

    ``layout="saved"``: tied weights removed, then transformers' reverse weight conversion (the hub
    layout, what ``save_pretrained`` writes); ``"fused"``: the in-memory names (tied weights removed).
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if layout not in ("saved", "fused"):
        raise ValueError(f"layout must be 'saved' or 'fused', not {layout!r}")
    meta = _meta_model(cfg)
    full = meta.state_dict()
    sd = remove_tied_weights_from_state_dict(dict(full), meta)
    order = {k: i for i, k in enumerate(full)}
    if layout == "saved":
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
            revert_weight_conversion,
        )

        saved = revert_weight_conversion(meta, sd)
        conv = get_model_conversion_mapping(meta)
        renamings = [c for c in conv if isinstance(c, WeightRenaming)]
        converters = [c for c in conv if isinstance(c, WeightConverter)]

        def position(key: str) -> int:  # where the in-memory tensor this key loads into sits
            target, _ = rename_source_key(key, renamings, converters, meta.base_model_prefix, full)
            if target in order:
                return order[target]
            m = re.search(r"\.layers\.(\d+)\.", key)  # unknown: at the end of its layer, else of the model
            later = [i for k, i in order.items() if m and f".layers.{int(m.group(1)) + 1}." in k]
            return min(later) - 0.5 if later else len(order)
    else:
        saved, position = sd, order.__getitem__

    def expert(key: str) -> int:
        m = re.search(r"\.experts\.(\d+)\.", key)
        return int(m.group(1)) if m else -1

    names = sorted(saved, key=lambda k: (position(k), expert(k), k))
    specs = [TensorSpec(k, tuple(saved[k].shape), saved[k].dtype) for k in names]
    return specs, meta.num_parameters(), type(meta).__name__


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor larger than ``shard_bytes`` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    # safetensors' own order within a file: wider dtypes first, so every tensor's offset is aligned
    return [sorted(shard, key=lambda s: -s.dtype.itemsize) for shard in shards]


# ---------------------------------------------------------------------------------------------- values
def _seed(seed: int, name: str, chunk: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{name}\0{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def init_rule(spec: TensorSpec) -> tuple[str, float]:
    """``("normal", std)``, ``("const", value)`` for one tensor."""
    if spec.dtype.is_floating_point is False:
        return "const", 0.0
    leaf = spec.name.rsplit(".", 2)
    is_norm = len(leaf) >= 2 and "norm" in leaf[-2].lower()
    if len(spec.shape) >= 2:
        return "normal", 1.0 / math.sqrt(max(1, spec.shape[-1]))
    if is_norm:
        return "const", 1.0 if leaf[-1] == "weight" else 0.0
    return "normal", 0.02


class _ChunkWriter:
    """Fills chunks on ``workers`` threads (each chunk seeded on its own, so the bytes do not depend on
    the thread count) into a fixed pool of ``workers + 2`` buffers; one more thread writes them in order."""

    def __init__(self, max_elems: int, max_itemsize: int, workers: int = 1) -> None:
        n = max(1, min(CHUNK, max_elems))
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, workers) + 2):
            self.free.put((torch.empty(n, dtype=torch.float32), torch.empty(n * max_itemsize, dtype=torch.uint8),
                           torch.Generator()))
        self.fill_pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="synth-fill")
        self.io_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-write")
        self.writes: deque[Future] = deque()

    @staticmethod
    def _fill(bufs, spec: TensorSpec, kind: str, value: float, seed: int, chunk: int, m: int):
        f32, raw, gen = bufs
        out = raw[: m * spec.dtype.itemsize].view(spec.dtype)
        if kind == "const":
            out.fill_(value)
        else:
            gen.manual_seed(_seed(seed, spec.name, chunk))
            x = out if spec.dtype == torch.float32 else f32[:m]
            x.normal_(0.0, value, generator=gen)
            if x is not out:
                out.copy_(x)
        return raw[: m * spec.dtype.itemsize].numpy()

    def _write(self, fh, filled: Future, bufs) -> None:
        try:
            fh.write(filled.result())
        finally:
            self.free.put(bufs)

    def _check(self) -> None:
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()  # re-raises a failed fill or write

    def write_tensor(self, fh, spec: TensorSpec, seed: int) -> None:
        kind, value = init_rule(spec)
        for c, start in enumerate(range(0, spec.numel, CHUNK)):
            m = min(CHUNK, spec.numel - start)
            self._check()
            bufs = self.free.get()  # blocks while every buffer is being filled or written: bounded memory
            filled = self.fill_pool.submit(self._fill, bufs, spec, kind, value, seed, c, m)
            self.writes.append(self.io_pool.submit(self._write, fh, filled, bufs))

    def flush(self) -> None:
        while self.writes:
            self.writes.popleft().result()

    def close(self) -> None:
        self.fill_pool.shutdown(wait=True, cancel_futures=True)
        self.io_pool.shutdown(wait=True, cancel_futures=True)


def _header(shard: Sequence[TensorSpec]) -> bytes:
    """The safetensors header (data written in this order, contiguous; padded to 8 bytes like safetensors)."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in shard:
        head[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_expert_count_aliases(path: Path, cfg) -> None:
    """Every config key moecompress's adapter lists for the expert count (as its ``save_model`` does:
    Qwen3-MoE's ``num_experts`` next to transformers 5's ``num_local_experts``); unknown families as is."""
    try:
        from moecompress.models import find_arch

        arch = find_arch(cfg)
    except Exception:  # noqa: BLE001 - not a family moecompress knows: keep transformers' config
        return
    data = json.loads(path.read_text())
    n = arch.num_experts(cfg)
    missing = [k for k in arch.num_experts_keys if data.get(k) != n]
    if missing:
        data.update({k: n for k in missing})
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _expert_key(cfg) -> str:
    return next(k for k in EXPERT_KEYS if hasattr(cfg, k))


def _moe_layers(specs: Sequence[TensorSpec], n_experts: int) -> set[int]:
    """Layers holding routed experts: per-expert tensors, or stacks of ``n_experts`` (any family's names)."""
    out = set()
    for s in specs:
        m = re.search(r"\.layers\.(\d+)\.", s.name)
        if m and (".experts." in s.name or (len(s.shape) == 3 and s.shape[0] == n_experts)):
            out.add(int(m.group(1)))
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------------- main API
def write_synthetic_moe(
    out_dir: str | os.PathLike,
    model_type: str = "mixtral",
    layers: int = 4,
    hidden: int = 2048,
    intermediate: int = 5632,
    experts: int = 8,
    top_k: int = 2,
    vocab: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    head_dim: int | None = None,
    tie_embeddings: bool = False,
    layout: str = "saved",
    overrides: Mapping[str, Any] | None = None,
    tokenizer: bool = True,
    workers: int | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Write a random-weight ``model_type`` checkpoint to ``out_dir`` (see the module docstring).

    ``vocab`` defaults to the bundled tokenizer's size (``tokenizer=False``: to the family's default);
    ``heads`` to ``hidden // 128``, ``kv_heads`` to ``heads // 4`` (MLA families: ``heads``), ``head_dim``
    to ``hidden // heads`` (families with such a key). ``overrides``: any other config keys. ``workers``:
    threads drawing the weights (default ``min(8, cpus)``; the bytes written do not depend on it).
    Written to a temporary sibling directory renamed into place at the end; an existing ``out_dir`` is
    refused unless ``force``. Returns ``out_dir``.
    """
    from transformers import GenerationConfig

    out = Path(out_dir).resolve()
    log = print if verbose else (lambda *a, **k: None)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use force=True / --force to replace it)")
    shard_bytes = parse_size(shard_bytes)
    if shard_bytes <= 0:
        raise ValueError("shard_bytes must be positive")
    dt = _dtype(dtype)
    token_id = None
    if tokenizer:
        tok_size, token_id = _tokenizer_info()
        if vocab is None:
            vocab = tok_size
        elif vocab < tok_size:
            raise ValueError(f"vocab {vocab} < the bundled tokenizer's {tok_size} tokens: its ids would not fit "
                             "(raise vocab, or write no tokenizer)")
    cfg = synthetic_config(model_type, layers, hidden, intermediate, experts, top_k, vocab, heads, kv_heads,
                           head_dim, tie_embeddings, dt, token_id, overrides)
    specs, n_params, arch_name = plan_tensors(cfg, layout)
    cfg.architectures = [arch_name]
    shards = plan_shards(specs, shard_bytes)
    total = sum(s.nbytes for s in specs)
    moe_layers = _moe_layers(specs, getattr(cfg, _expert_key(cfg)))
    if not moe_layers:
        raise ValueError(f"no layer of this {model_type!r} config has routed experts (dense-first settings such as "
                         "first_k_dense_replace or mlp_only_layers cover every layer?): add layers or --set them")
    log(f"{model_type}: {layers} layers ({len(moe_layers)} with experts), hidden {hidden}, {experts} experts of "
        f"width {intermediate}, top-{top_k}, vocab {cfg.vocab_size}: {n_params:,} parameters, {_fmt_bytes(total)} "
        f"in {len(specs)} tensors, {len(shards)} shard(s) -> {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        cfg.save_pretrained(tmp)
        _write_expert_count_aliases(tmp / "config.json", cfg)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        if tokenizer:
            for name in TOKENIZER_FILES:
                if (DEMO_DIR / name).is_file():
                    shutil.copyfile(DEMO_DIR / name, tmp / name)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        workers = workers or min(8, os.cpu_count() or 1)
        writer = _ChunkWriter(max(s.numel for s in specs), max(s.dtype.itemsize for s in specs), workers)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel over chunks, not inside each one
        done = 0
        try:
            for name, shard in zip(names, shards):
                ts = time.perf_counter()
                with open(tmp / name, "wb") as fh:
                    fh.write(_header(shard))
                    for spec in shard:
                        writer.write_tensor(fh, spec, seed)
                    writer.flush()
                size = sum(s.nbytes for s in shard)
                done += size
                dt_s = time.perf_counter() - ts
                if len(shards) > 1:
                    log(f"  {name}: {len(shard)} tensors, {_fmt_bytes(size)} in {dt_s:.1f} s "
                        f"({_fmt_bytes(size / max(dt_s, 1e-9))}/s; {100 * done / total:.0f}% done)")
        finally:
            writer.close()
            torch.set_num_threads(threads)
        if len(shards) > 1:
            index = {"metadata": {"total_parameters": n_params, "total_size": total},
                     "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        old = None
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} appeared while writing; not replaced (use --force)")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0
    log(f"wrote {n_params:,} parameters, {total:,} bytes ({_fmt_bytes(total)}) to {out} in {elapsed:.1f} s "
        f"({_fmt_bytes(total / max(elapsed, 1e-9))}/s)")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write a synthetic MoE checkpoint (random bf16 weights) tensor by tensor, for memory and "
                    "speed benchmarks.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--model-type", default="mixtral", help="transformers model_type (mixtral, qwen3_moe, ...)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632, help="routed experts' width (and dense MLPs')")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None, help="default: the bundled tokenizer's size")
    p.add_argument("--heads", type=int, default=None, help="default: hidden // 128")
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads // 4 (MLA families: heads)")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden // heads")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embeddings")
    p.add_argument("--shard-size", default="2GB", help="maximum shard size (2GB, 500MB, 1GiB, bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--layout", default="saved", choices=("saved", "fused"),
                   help="saved: what save_pretrained writes (hub names); fused: in-memory fused-expert names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key (VALUE parsed as JSON when it can be); repeatable")
    p.add_argument("--workers", type=int, default=None, help="threads drawing weights (default: min(8, cpus))")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer (vocab: the family default)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        write_synthetic_moe(
            a.out, a.model_type, a.layers, a.hidden, a.intermediate, a.experts, a.top_k, a.vocab, a.heads,
            a.kv_heads, a.shard_size, a.seed, a.dtype, head_dim=a.head_dim, tie_embeddings=a.tie,
            layout=a.layout, overrides=_parse_set(a.overrides), tokenizer=not a.no_tokenizer, workers=a.workers,
            force=a.force,
            verbose=not a.quiet)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
