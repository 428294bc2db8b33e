"""The whole-model quantization path as it was before streaming (commit 38627d3), frozen here as the reference
the streamed path is checked against: `quantize_model` (SequentialRunner over a model held in memory, whole-model
probe forwards for the routing agreement, `rotate_residual` up front) and `write_packed` (the packed writer over a
whole state dict). Only tests import it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.algorithms.rotation import random_orthogonal
from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import QUANT_METHOD, checksum, write_checkpoint
from moecompress.formats.codecs import encode, packed_bits_per_weight
from moecompress.formats.quant_record import QuantRecord
from moecompress.models.base import MoEArch
from moecompress.nn.act_quant import ActQuantHandle, install_layer_act_quant, rotation_matrix
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.calibration import collect
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.expert_quant import quantize_experts
from moecompress.runtime.layer_quant import quantize_linears
from moecompress.runtime.layer_smooth import quantize_router, smooth_layer
from moecompress.runtime.quant_plan import QuantPlan


# ---------------------------------------------------------------- runtime/sequential.py (deleted from the package)
@contextlib.contextmanager
def _identity_layers(layers: nn.ModuleList, record: list[list[dict]], first: list[torch.Tensor]) -> Iterator[None]:
    originals = [layer.forward for layer in layers]

    def make(i: int):
        def forward(hidden_states, *args, **kwargs):
            if args:  # decoder layers are called with keywords after the hidden states in transformers 5
                raise TypeError("unexpected positional arguments to a decoder layer")
            record[i].append(kwargs)
            if i == 0:
                first.append(hidden_states.detach())
            return hidden_states

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = make(i)
        yield
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd


class SequentialRunner:
    """Layer-by-layer execution of ``model`` on ``batches`` (each ``[B, S]`` token ids)."""

    def __init__(self, model: nn.Module, arch: MoEArch, batches: Sequence[torch.Tensor]) -> None:
        self.model, self.arch, self.batches = model, arch, list(batches)
        self.layers = arch.decoder_layers(model)
        self.kwargs: list[list[dict]] = [[] for _ in self.layers]
        first: list[torch.Tensor] = []
        with torch.no_grad(), _identity_layers(self.layers, self.kwargs, first):
            for x in self.batches:
                self.model.base_model(input_ids=x, use_cache=False)
        self.hidden: list[torch.Tensor] = first  # inputs of the next layer to run, per batch [B, S, H]
        self.next_layer = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def run_layer(self, i: int, store: bool = True, batches=None) -> None:
        """Run the batches (default all) through layer ``i`` (layers must run in order). ``store=True``
        replaces the stored hidden states by the outputs and moves on to the next layer; ``store=False`` only
        runs the layer (a calibration pass whose hooks collect statistics)."""
        if i != self.next_layer:
            raise RuntimeError(f"layer {i} run out of order (next is {self.next_layer})")
        if store and batches is not None:
            raise ValueError("a storing pass runs every batch")
        layer = self.layers[i]
        for b in batches if batches is not None else range(len(self.hidden)):
            h = self.hidden[b]
            out = layer(h, **self.kwargs[i][b])
            if store:
                self.hidden[b] = out[0] if isinstance(out, tuple) else out
        if store:
            self.next_layer += 1

    @torch.no_grad()
    def logits(self, b: int) -> torch.Tensor:
        """``[B, S, V]`` logits of batch ``b`` once every layer has run (final norm + LM head)."""
        if self.next_layer != self.num_layers:
            raise RuntimeError("run every layer before asking for logits")
        final_norm = self.model.get_submodule(self.arch.final_norm)
        logits = self.model.get_output_embeddings()(final_norm(self.hidden[b]))
        if self.arch.logits_divisor_key:
            logits = logits / getattr(self.model.config, self.arch.logits_divisor_key)
        return logits


# ---------------------------------------------------------------- runtime/rotate.py
def _consumers(model: nn.Module, arch: MoEArch) -> dict[int, dict[str, list[nn.Linear]]]:
    """Per layer: the nn.Linear modules reading the attention norm's and the MLP/MoE norm's output."""
    out: dict[int, dict[str, list[nn.Linear]]] = {}
    handles, ptrs = [], {}
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        out[i] = {"attn": [], "mlp": []}
        for tag, name in (("attn", arch.pre_attn_norm), ("mlp", arch.pre_moe_norm)):
            handles.append(getattr(layer, name).register_forward_hook(
                lambda m, a, o, key=(i, tag): ptrs.__setitem__(o.data_ptr(), key)))
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                def pre(mod, args, i=i):
                    key = ptrs.get(args[0].data_ptr())
                    if key is not None and key[0] == i and mod not in out[i][key[1]]:
                        out[i][key[1]].append(mod)
                handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(8)[None] % model.config.vocab_size)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> torch.Tensor:
    w = norm.weight.detach().double().clone()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * w).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    return w


@torch.no_grad()
def rotate_residual(model: nn.Module, arch: MoEArch, seed: int = 0, check: bool = True) -> dict:
    """Rotate ``model`` in place; returns ``{"hidden_size", "max_logit_change"}``."""
    H = model.config.hidden_size
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in (arch.pre_attn_norm, arch.pre_moe_norm):
            norm = getattr(layer, name)
            if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
                raise MoecompressError(f"{arch.name} uses LayerNorm, which a residual rotation does not commute with",
                                       "quantize without --rotate")
    probe = torch.arange(16)[None] % model.config.vocab_size
    before = model(input_ids=probe).logits.double() if check else None
    readers = _consumers(model, arch)
    views = {v.index: v for v in arch.moe_blocks(model)}
    Q = random_orthogonal(H, seed)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    final = model.get_submodule(arch.final_norm)
    w_final = final.weight.detach().double().clone()
    new_head = (head.weight.double() * w_final) @ Q
    for i, layer in enumerate(layers):
        view = views.get(i)
        if view is not None:  # the router is handled through the adapter (its weight may sit in an nn.Linear)
            readers[i]["mlp"] = [m for m in readers[i]["mlp"] if m.weight is not view.router_weight]
        attn_w = _fold_norm(getattr(layer, arch.pre_attn_norm), readers[i]["attn"])
        mlp_norm = getattr(layer, arch.pre_moe_norm)
        mlp_w = _fold_norm(mlp_norm, readers[i]["mlp"])
        del attn_w
        if view is not None:  # routed experts read the MoE norm too, through 3-D parameters
            for proj in ("gate", "up"):
                view.experts.set_stacked(proj, view.experts.stacked(proj).double() * mlp_w)
            for proj in ("gate", "up"):
                view.experts.set_stacked(proj, view.experts.stacked(proj).double() @ Q)
            view.experts.set_stacked("down", Q.T @ view.experts.stacked("down").double())
            b = view.experts.bias("down")
            if b is not None:
                b.copy_((b.double() @ Q).to(b.dtype))
            view.router_weight.copy_((view.router_weight.double() * mlp_w @ Q).to(view.router_weight.dtype))
        seen = {id(m) for m in readers[i]["attn"] + readers[i]["mlp"]}
        for lin in readers[i]["attn"] + readers[i]["mlp"]:
            lin.weight.copy_((lin.weight.double() @ Q).to(lin.weight.dtype))
        experts = set() if view is None else {id(p) for p in view.experts.module.parameters()}
        if view is not None:
            experts.add(id(view.router_weight))
        for m in layer.modules():
            if isinstance(m, nn.Linear) and id(m) not in seen and m.out_features == H and id(m.weight) not in experts:
                m.weight.copy_((Q.T @ m.weight.double()).to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.copy_((m.bias.double() @ Q).to(m.bias.dtype))
    tied = head.weight is emb.weight
    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    if tied:  # the head now differs from the embeddings (the final norm weight is folded into it): untie
        head.weight = nn.Parameter(new_head.to(emb.weight.dtype), requires_grad=emb.weight.requires_grad)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    else:
        head.weight.copy_(new_head.to(head.weight.dtype))
    final.weight.fill_(1.0)
    report = {"hidden_size": H, "untied_lm_head": tied}
    if check:
        after = model(input_ids=probe).logits.double()
        change = float((after - before).abs().max() / before.abs().max())
        report["max_logit_change"] = change
        if change > 1e-3:
            raise MoecompressError(f"rotating {arch.name} changed its outputs (relative {change:.2e})",
                                   "quantize without --rotate, and report this model type")
    return report


# ---------------------------------------------------------------- runtime/quantize_run.py
@dataclass
class QuantRun:
    record: QuantRecord
    act_handle: ActQuantHandle
    layers: dict[str, Any] = field(default_factory=dict)
    routing_agreement: list[float] = field(default_factory=list)
    min_tokens_per_expert: float = 0.0
    rotated_residual: bool = False

    def fallbacks(self) -> dict[str, int]:
        return {k: len(v["experts"].get("rtn_fallback", [])) for k, v in self.layers.items() if "experts" in v}


@contextlib.contextmanager
def _skip_experts(views):
    """During a statistics pass the block output is discarded: the hooks see the experts' inputs, so the
    experts themselves need not run (their statistics are computed from routed tokens only)."""
    saved = []
    for v in views:
        m = v.experts.module
        saved.append((m, m.__dict__.get("forward")))
        m.forward = lambda *args, **kwargs: torch.zeros_like(args[0] if args else kwargs["hidden_states"])
    try:
        yield
    finally:
        for m, f in saved:
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f


def _batches(windows: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [w[i:i + size] for w in windows for i in range(0, len(w), size)]


def quantize_model(model, arch: MoEArch, base: list[torch.Tensor], reserve: list[torch.Tensor], plan: QuantPlan,
                   progress: Progress | None = None, label: str = "quantizing") -> QuantRun:
    """Quantize ``model`` in place on calibration windows ``base`` (list of ``[N, S]``; ``reserve`` windows
    only feed experts short of tokens)."""
    progress = progress or NullProgress()
    seq_len = base[0].shape[1]
    batches, reserve_batches = _batches(base, plan.batch_size), _batches(reserve, plan.batch_size)
    n_base = len(batches)
    probe = torch.cat([w[:2] for w in base])  # routing of the original model, for the agreement report
    with torch.no_grad(), capture_routing(model, arch) as ref_traces:
        model(input_ids=probe)
    rotated = rotate_residual(model, arch, plan.rotation_seed) if plan.rotate else None
    layers = arch.moe_layer_indices(model.config)
    views = {v.index: v for v in arch.moe_blocks(model)}
    top_k, E = views[layers[0]].routing.top_k, arch.num_experts(model.config)
    n_min = plan.balance_ratio * seq_len * top_k / E
    runner = SequentialRunner(model, arch, batches + reserve_batches)
    out = QuantRun(QuantRecord(), ActQuantHandle(), min_tokens_per_expert=n_min, rotated_residual=rotated is not None)
    with progress.task(label, total=runner.num_layers) as bar:
        for i, layer in enumerate(runner.layers):
            lv = [views[i]] if i in views else []
            attn_norm = getattr(layer, arch.pre_attn_norm, None)
            prefix = f"{arch.layers}.{i}"
            with collect(layer, lv, attn_norm, plan.near_miss) as stats, _skip_experts(lv):
                runner.run_layer(i, store=False, batches=range(n_base))
                if plan.balance and lv and plan.experts is not None:  # top up rare experts: reserve, near-miss
                    stats.experts.short = set((stats.experts.count < n_min).nonzero().flatten().tolist())
                    if stats.experts.short and reserve_batches:
                        stats.mode = "reserve"
                        runner.run_layer(i, store=False, batches=range(n_base, n_base + len(reserve_batches)))
                    if stats.experts.short and plan.near_miss:
                        stats.mode = "near"
                        runner.run_layer(i, store=False, batches=range(n_base))
            entry: dict[str, Any] = {}
            if plan.smooth:
                used = smooth_layer(layer, lv, stats, attn_norm, plan.smooth_alpha, plan.smooth_aggregate,
                                    plan.smooth_router, plan.smooth_attention, plan.smooth_down)
                for k, vec in used.items():
                    out.record.add_vector(f"{prefix}.smooth.{k}", vec)
                entry["smoothed"] = sorted(used)
            if plan.linears is not None:
                entry["linears"] = quantize_linears(layer, stats, plan.linears, out.record, prefix)
            for v in lv:
                block = f"{prefix}.{arch.moe_block}"
                if plan.experts is not None:
                    q_inter = rotation_matrix(v.experts.stacked("down").shape[2], plan.rotation_seed) \
                        if plan.rotate_intermediate else None
                    entry["experts"] = quantize_experts(v, stats, plan.experts, out.record, f"{block}.{arch.experts}",
                                                        plan.balance, n_min, plan.rare_experts, q_inter)
                if plan.router_bits:
                    entry["router"] = quantize_router(v, stats, plan.router_bits, plan.align_router, out.record,
                                                      f"{block}.{arch.router}", plan.align_objective)
            if plan.act is not None:
                install_layer_act_quant(layer, lv, plan.act, out.act_handle)
            runner.run_layer(i)
            out.layers[str(i)] = entry
            bar.advance(1)
    with torch.no_grad(), capture_routing(model, arch) as traces:
        model(input_ids=probe)
    for layer in layers:
        a = ref_traces[layer].cat()[1].sort(-1).values
        b = traces[layer].cat()[1].sort(-1).values
        out.routing_agreement.append(float((a == b).all(-1).float().mean()))
    return out


# ---------------------------------------------------------------- runtime/pack.py
def _codec(meta: dict | None, ternary_codec: str) -> tuple[str, bool]:
    if meta is None:
        raise MoecompressError("the quantization record has weights but no scheme", "quantize the model again")
    if meta.get("kind") == "ternary":
        return ternary_codec, True
    return f"int{meta['bits']}", bool(meta.get("symmetric", False))


def write_packed(loaded, record: QuantRecord, meta: dict[str, Any], out_dir: Path,
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
    packed_keys = [k for k in sd if any(k.startswith(p + ".") or k.startswith(p + "_") for p in modules)  # noqa: PIE810
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
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": 2, "modules": modules,
                                  "checksums": checksums, "activations": meta.get("activations")}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out_dir)
    for entry in stats["modules"].values():
        stats["packed_bytes"] += entry["bits_per_weight"] * entry["weights"] / 8
        stats["dense_equivalent_bytes"] += entry["weights"] * torch.empty(0, dtype=disk).element_size()
    stats["file_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return stats
