"""Expert-aware post-training quantization, one decoder layer at a time.

For each layer: one calibration pass collects statistics (inputs come from the already-quantized
previous layers), optional EAQuant smoothing is folded in, every linear is quantized with GPTQ (or RTN)
on its own Hessian, all routed experts at once on their gate-weighted Hessians with calibration balance,
the router optionally (with logit alignment); then the quantized layer (with simulated activation
quantization for A8/A4 schemes) produces the next layer's inputs. Writes fake-quantized weights plus
``quantization.safetensors`` (codes, scales, zeros, smoothing vectors) and records the scheme.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import torch
from pydantic import Field

from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import QuantRecord
from moecompress.nn.act_quant import ActQuant, ActQuantHandle, install_layer_act_quant
from moecompress.runtime.calibration import collect
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.layer_quant import QuantOptions, quantize_experts, quantize_linears, quantize_router, smooth_layer
from moecompress.runtime.sequential import SequentialRunner
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["SCHEMES", "QuantizeConfig"]

SCHEMES = {"w8a8": (8, 8), "w8a16": (8, None), "w4a16": (4, None), "w3a16": (3, None), "w2a16": (2, None),
           "w4a8": (4, 8), "w4a4": (4, 4), "w3a4": (3, 4)}


class QuantizeConfig(StageConfig):
    """Quantize weights (and simulate activation quantization) with expert-aware GPTQ.

    Example recipe entry::

        - stage: quantize
          scheme: w4a4          # w8a8 w8a16 w4a16 w3a16 w2a16 w4a8 w4a4 w3a4
          method: gptq          # or rtn
          smooth: true          # EAQuant expert-aware smoothing (default: on when activations are quantized)
          router_bits: 8        # quantize the router too (default: keep it in full precision)
    """

    stage: Literal["quantize"] = "quantize"
    scheme: Literal["w8a8", "w8a16", "w4a16", "w3a16", "w2a16", "w4a8", "w4a4", "w3a4"] = "w4a16"
    group_size: int | None = None  # default: 128 for weight-only schemes, -1 (per output channel) otherwise
    method: Literal["gptq", "rtn"] = "gptq"
    symmetric: bool = False
    clip_search: bool = True
    act_order: bool = True
    damp: float = Field(0.01, ge=0.0)
    block_size: int = Field(128, ge=1)
    act_clip: float | None = Field(None, gt=0.0, le=1.0)  # default: 1.0 for A8, 0.9 for A4
    smooth: bool | None = None
    smooth_alpha: float = Field(0.6, ge=0.0, le=1.0)
    smooth_aggregate: Literal["max", "freq", "gate"] = "max"
    smooth_router: bool = False
    smooth_attention: bool = True
    smooth_down: bool = True
    router_bits: int | None = Field(None, ge=2, le=8)
    align_router: bool = True
    balance: bool = True
    balance_ratio: float = Field(2.0, gt=0.0)  # min routed tokens per expert = ratio * seq_len * K / E
    near_miss: int = Field(2, ge=0)  # near-miss ranks k+1 .. k+near_miss
    reserve: float = Field(0.5, ge=0.0)  # reserve windows (for rare experts), as a share of the samples
    batch_size: int = Field(8, ge=1)

    @property
    def bits(self) -> tuple[int, int | None]:
        return SCHEMES[self.scheme]

    def groups(self) -> int:
        return self.group_size if self.group_size is not None else (128 if self.bits[1] is None else -1)

    def check(self, config: Any, arch: Any) -> None:
        from transformers import AutoModelForCausalLM

        gs = self.groups()
        if gs in (-1, 0):
            return
        if gs < 1:
            raise MoecompressError(f"group size {gs} is invalid", "use a positive group size or -1 (per channel)")
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        widths: dict[str, int] = {}
        routers = set()
        for v in arch.moe_blocks(meta):
            routers.update({id(v.router)} | ({id(v.shared_gate)} if v.shared_gate is not None else set()))
            widths[f"layer {v.index} experts (gate/up)"] = v.experts.stacked("gate").shape[2]
            widths[f"layer {v.index} experts (down)"] = v.experts.stacked("down").shape[2]
        experts = {id(p) for v in arch.moe_blocks(meta) for p in v.experts.module.parameters()}
        for name, m in arch.decoder_layers(meta).named_modules():
            if isinstance(m, torch.nn.Linear) and id(m) not in routers and id(m.weight) not in experts:
                widths[f"model layer {name}"] = m.in_features
        for where, c in widths.items():
            if c % gs:
                divisors = [d for d in (256, 128, 64, 32, 16, 8) if all(w % d == 0 for w in widths.values())]
                raise MoecompressError(
                    f"group size {gs} does not divide the input width {c} of {where}",
                    f"use --group-size {divisors[0]} or -1 (per channel)" if divisors else "use --group-size -1")


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


def _split(windows: dict[str, torch.Tensor], samples: int, reserve: int, seed: int) -> tuple[list, list]:
    base, extra = [], []
    g = torch.Generator().manual_seed(seed)
    for w in windows.values():
        perm = torch.randperm(len(w), generator=g)
        base.append(w[perm[:samples].sort().values])
        if reserve:
            extra.append(w[perm[samples:samples + reserve].sort().values])
    return base, extra


@register_stage(QuantizeConfig, modifies_model=True, uses_text=True)
def run(ctx: StageContext, cfg: QuantizeConfig) -> dict[str, Any]:
    """Expert-aware GPTQ/RTN quantization (W8A8, W4A16, W3A16, W2A16, W4A4, W3A4) with EAQuant smoothing,
    router alignment and calibration balance; activation quantization simulated in the forward pass."""
    t0 = time.time()
    model, arch = ctx.model, ctx.arch
    wbits, abits = cfg.bits
    smooth = cfg.smooth if cfg.smooth is not None else abits is not None
    opt = QuantOptions(QuantGrid(wbits, cfg.groups(), cfg.symmetric, cfg.clip_search), cfg.method, cfg.act_order,
                       cfg.damp, cfg.block_size)
    aq = ActQuant(abits, cfg.act_clip or (1.0 if abits >= 8 else 0.9), router=cfg.router_bits is not None) \
        if abits else None
    calib = ctx.windows("calib")
    samples = min(len(w) for w in calib.values())
    n_reserve = int(round(cfg.reserve * samples)) if cfg.balance else 0
    pool = ctx.windows("calib", samples=samples + n_reserve) if n_reserve else calib
    base, extra = _split(pool, samples, n_reserve, 0)
    seq_len = base[0].shape[1]
    batches = [w[i:i + cfg.batch_size] for w in base for i in range(0, len(w), cfg.batch_size)]
    reserve_batches = [w[i:i + cfg.batch_size] for w in extra for i in range(0, len(w), cfg.batch_size)]
    n_base = len(batches)
    probe = torch.cat([w[:2] for w in base])  # routing of the original model, for the agreement report
    with torch.no_grad(), capture_routing(model, arch) as ref_traces:
        model(input_ids=probe)
    layers = arch.moe_layer_indices(model.config)
    views = {v.index: v for v in arch.moe_blocks(model)}
    top_k, E = views[layers[0]].routing.top_k, arch.num_experts(model.config)
    n_min = cfg.balance_ratio * seq_len * top_k / E
    runner = SequentialRunner(model, arch, batches + reserve_batches)
    record = QuantRecord()
    handle = ActQuantHandle()
    report: dict[str, Any] = {"layers": {}}
    with ctx.progress.task(f"quantizing ({cfg.scheme}, {cfg.method})", total=runner.num_layers) as bar:
        for i, layer in enumerate(runner.layers):
            lv = [views[i]] if i in views else []
            attn_norm = getattr(layer, arch.pre_attn_norm, None)
            prefix = f"{arch.layers}.{i}"
            with collect(layer, lv, attn_norm, cfg.near_miss) as stats, _skip_experts(lv):
                runner.run_layer(i, store=False, batches=range(n_base))
                if cfg.balance and lv:  # top up experts short of tokens: reserve text, then near-miss tokens
                    stats.experts.short = set((stats.experts.count < n_min).nonzero().flatten().tolist())
                    if stats.experts.short and reserve_batches:
                        stats.mode = "reserve"
                        runner.run_layer(i, store=False, batches=range(n_base, n_base + len(reserve_batches)))
                    if stats.experts.short and cfg.near_miss:
                        stats.mode = "near"
                        runner.run_layer(i, store=False, batches=range(n_base))
            entry: dict[str, Any] = {}
            if smooth:
                used = smooth_layer(layer, lv, stats, attn_norm, cfg.smooth_alpha, cfg.smooth_aggregate,
                                    cfg.smooth_router, cfg.smooth_attention, cfg.smooth_down)
                for k, vec in used.items():
                    record.add_vector(f"{prefix}.smooth.{k}", vec)
                entry["smoothed"] = sorted(used)
            entry["linears"] = quantize_linears(layer, stats, opt, record, prefix)
            for v in lv:
                block = f"{prefix}.{arch.moe_block}"
                entry["experts"] = quantize_experts(v, stats, opt, record, block, cfg.balance, n_min)
                if cfg.router_bits:
                    entry["router"] = quantize_router(v, stats, cfg.router_bits, cfg.align_router, record, block)
            if aq is not None:
                install_layer_act_quant(layer, lv, aq, handle)
            runner.run_layer(i)
            report["layers"][str(i)] = entry
            bar.advance(1)
    with torch.no_grad(), capture_routing(model, arch) as traces:
        model(input_ids=probe)
    agreement = []
    for layer in layers:
        a = ref_traces[layer].cat()[1].sort(-1).values
        b = traces[layer].cat()[1].sort(-1).values
        agreement.append(float((a == b).all(-1).float().mean()))
    ctx.artifacts["act_quant"] = handle
    meta = {"scheme": cfg.scheme, "weights": {"bits": wbits, "group_size": cfg.groups(), "symmetric": cfg.symmetric,
                                              "method": cfg.method},
            "activations": None if aq is None else {"bits": aq.bits, "clip_ratio": aq.clip_ratio,
                                                    "symmetric": aq.symmetric, "router": aq.router,
                                                    "granularity": "per-token dynamic"},
            "router_bits": cfg.router_bits, "smooth": smooth, "record": "quantization.safetensors"}
    ctx.artifacts.setdefault("sidecar", {})["quantization"] = meta
    if ctx.out_dir is not None:
        record.save(ctx.out_dir)
    fallbacks = {k: len(v.get("experts", {}).get("rtn_fallback", [])) for k, v in report["layers"].items() if "experts" in v}
    return {**meta, "calibration_windows": sum(len(w) for w in base),
            "reserve_windows": sum(len(w) for w in extra), "min_tokens_per_expert": n_min,
            "rtn_fallback_experts_per_layer": fallbacks, "routing_topk_agreement_calib": agreement,
            "seconds": round(time.time() - t0, 2), "layers": report["layers"]}
