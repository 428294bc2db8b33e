"""Quantize a whole model one decoder layer at a time, following a `QuantPlan`.

For each layer: one statistics pass (inputs come from the already-quantized previous layers; rare experts
topped up from reserve text and near-miss tokens when calibration balance is on), optional smoothing
folded in, every other linear quantized on its own Hessian, all routed experts at once on their
gate-weighted Hessians, the router optionally (with logit alignment); then the quantized layer, with
simulated activation quantization, produces the next layer's inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.formats.quant_record import QuantRecord
from moecompress.models.base import MoEArch
from moecompress.nn.act_quant import ActQuant, ActQuantHandle, install_layer_act_quant, rotation_matrix
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.calibration import collect
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.layer_quant import QuantOptions, quantize_experts, quantize_linears, quantize_router, smooth_layer
from moecompress.runtime.rotate import rotate_residual
from moecompress.runtime.sequential import SequentialRunner

__all__ = ["QuantPlan", "QuantRun", "quantize_model"]


@dataclass(frozen=True)
class QuantPlan:
    experts: QuantOptions | None  # routed experts (None: keep them in full precision)
    linears: QuantOptions | None  # attention, dense and shared MLPs (None: keep)
    act: ActQuant | None = None
    smooth: bool = False
    smooth_alpha: float = 0.6
    smooth_aggregate: str = "max"
    smooth_router: bool = False
    smooth_attention: bool = True
    smooth_down: str = "outlier"
    router_bits: int | None = None
    align_router: bool = True
    balance: bool = True
    balance_ratio: float = 2.0
    near_miss: int = 2
    rotate: bool = False
    rotate_intermediate: bool = False
    rotation_seed: int = 0
    batch_size: int = 8
    align_objective: str = "topk_rest"


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
                                                        plan.balance, n_min, q_inter)
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
