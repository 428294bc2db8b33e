"""Expert-aware post-training quantization, one decoder layer at a time, streamed.

For each layer (read from disk alone): one calibration pass collects statistics (inputs come from the
already-quantized previous layers), optional EAQuant smoothing is folded in, every linear is quantized with
GPTQ (or RTN) on its own Hessian, all routed experts at once on their gate-weighted Hessians with calibration
balance, the router optionally (with logit alignment); then the quantized layer (with simulated activation
quantization for A8/A4 schemes) produces the next layer's inputs and is written at once: in the packed format
(docs/FORMAT.md), or as fake-quantized weights plus the quantization record (codes, scales, zeros, smoothing
vectors; ``quantization.safetensors``, sharded with an index when large). See `runtime.quantize_run`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from moecompress.algorithms.quant_grid import QuantGrid
from moecompress.algorithms.trellis import SEQ, STATE_BITS, TrellisGrid
from moecompress.formats.quant_record import RECORD_FILE
from moecompress.kernels.dispatch import resolve_backend
from moecompress.nn.act_quant import ActQuant
from moecompress.runtime.layer_quant import QuantOptions
from moecompress.runtime.pack import FakeQuantSink, PackedSink
from moecompress.runtime.quant_plan import VOCAB_ROWS, QuantPlan, QuantRun, batches_of, needs_no_statistics
from moecompress.runtime.quantize_run import quantize_stream
from moecompress.runtime.rotate import ResidualRotation
from moecompress.stages.base import StageContext, register_stage
from moecompress.stages.quantize_config import SCHEMES, QuantizeConfig

__all__ = ["SCHEMES", "QuantizeConfig", "finish", "plan_of", "quantize", "split_windows"]

log = logging.getLogger(__name__)
# The torch trellis search's cost per weight and GPTQ pass on one core (2.0-2.4 us measured by
# benchmarks/trellis_search_speed.py on a 2-core x86 box): `warn_trellis_on_cpu`'s estimate
TRELLIS_CPU_SECONDS_PER_WEIGHT = 2.1e-6


def split_windows(ctx: StageContext, reserve_share: float, seed: int = 0) -> tuple[list, list]:
    """The recipe's calibration windows per task, plus reserve windows (a share of them, drawn from the rest of
    the calibration text) for experts short of tokens."""
    calib = ctx.windows("calib")
    samples = min(len(w) for w in calib.values())
    n_reserve = int(round(reserve_share * samples))
    pool = ctx.windows("calib", samples=samples + n_reserve) if n_reserve else calib
    base, extra = [], []
    g = torch.Generator().manual_seed(seed)
    for w in pool.values():
        perm = torch.randperm(len(w), generator=g)
        base.append(w[perm[:samples].sort().values])
        if n_reserve:
            extra.append(w[perm[samples:samples + n_reserve].sort().values])
    return base, extra


def quantize(ctx: StageContext, plan: QuantPlan, base: list, extra: list, meta: dict[str, Any], save_format: str,
             label: str, ternary_codec: str = "ternary-b3") -> QuantRun:
    """Stream the model through the quantization plan into the stage's output (packed, or fake-quant plus the
    record), one decoder layer at a time; the written model becomes the context's model."""
    batches, reserve = batches_of(base, plan.batch_size), batches_of(extra, plan.batch_size)
    probe = batches_of([torch.cat([w[:2] for w in base])], plan.batch_size)  # routing agreement vs the original
    if needs_no_statistics(plan):
        batches, reserve = [], []
    rotation = ResidualRotation(ctx.config.hidden_size, plan.rotation_seed) if plan.rotate else None
    if save_format == "packed":
        sink = PackedSink(ctx.source, ctx.write_to, meta, ternary_codec, writer=ctx.dist.writer)
    else:  # the record goes with the written model (in place: into the run's output directory, if any)
        record_dir = ctx.write_to if ctx.write_to is not None else ctx.out_dir
        sink = FakeQuantSink(ctx.sink(), record_dir if ctx.dist.writer else None)
    n = len(batches) + len(reserve)
    with ctx.stream(batches + reserve + probe,
                    embed_transform=None if rotation is None else rotation.embedding,
                    vocab_rows=VOCAB_ROWS if max(plan.vocab_prior, plan.expert_prior) > 0 and batches else 0) as stream:
        result = quantize_stream(stream, sink, plan, len(batches), len(reserve), range(n, n + len(probe)), rotation,
                                 ctx.progress, label, ctx.dist)
    config = ctx.config
    if result.untied_lm_head:  # the rotated head is written on its own
        if not ctx.source.in_memory:  # the source's config stays the source's
            config = copy.deepcopy(config)
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    ctx.adopt(sink, config)
    if isinstance(sink, FakeQuantSink) and sink.record_file is not None:
        meta["record"] = sink.record_file
    if isinstance(sink, PackedSink) and sink.stats is not None:
        ctx.artifacts.setdefault("sidecar", {})["packed"] = sink.stats
    return result


def finish(ctx: StageContext, result: QuantRun, meta: dict[str, Any], base: list, extra: list, t0: float,
           save_format: str = "packed") -> dict:
    """Record the scheme for loaders and return the stage summary."""
    ctx.artifacts["act_quant"] = result.act_handle
    ctx.artifacts["save_format"] = save_format
    ctx.artifacts.setdefault("sidecar", {})["quantization"] = meta
    out = {**meta, "calibration_windows": sum(len(w) for w in base), "reserve_windows": sum(len(w) for w in extra),
           "min_tokens_per_expert": result.min_tokens_per_expert,
           "rtn_fallback_experts_per_layer": result.fallbacks(),
           "pooled_experts_per_layer": result.fallbacks("topped_up_pooled"),
           "routing_topk_agreement_calib": result.routing_agreement, "seconds": round(time.time() - t0, 2),
           "layers": result.layers}
    packed = ctx.artifacts.get("sidecar", {}).get("packed")
    if packed and packed["modules"]:  # the written sizes: what mixed widths cost
        weights = sum(m["weights"] for m in packed["modules"].values())
        out["packed_weights"] = weights
        out["packed_bits_per_weight"] = round(8 * packed["packed_bytes"] / weights, 4)
    if result.rotated_residual:
        out["rotation_max_relative_change"] = result.rotation_max_change
    if result.probe_only:  # round-to-nearest needs no statistics: the calibration windows were not run
        out["calibration_windows"], out["reserve_windows"] = 0, 0
        out["note"] = "round-to-nearest: no calibration statistics needed; only the routing-agreement probe ran"
    return out


def act_meta(aq: ActQuant | None) -> dict[str, Any] | None:
    return None if aq is None else {"bits": aq.bits, "clip_ratio": aq.clip_ratio, "symmetric": aq.symmetric,
                                    "router": aq.router, "granularity": "per-token dynamic",
                                    "intermediate_rotation_seed": aq.inter_rotation_seed}


def plan_of(cfg: QuantizeConfig) -> tuple[QuantPlan, dict[str, Any]]:
    """The quantization plan of a config, and the metadata recorded for loaders (``moecompress.json``)."""
    wbits, abits = cfg.bits
    lbits = cfg.linear_width()
    smooth = cfg.smooth if cfg.smooth is not None else abits is not None

    def options(bits: int) -> QuantOptions:
        if cfg.trellis(bits):
            return QuantOptions.of(TrellisGrid(bits, cfg.groups()), cfg, gptq_rounds=cfg.rounds(bits))
        frac = cfg.zero_frac(bits)
        grid = QuantGrid(bits, cfg.groups(), cfg.symmetric, cfg.clip_search, cfg.floor(bits), frac)
        return QuantOptions.of(grid, cfg, gptq_rounds=cfg.rounds(bits))
    rotate_inter = cfg.rotate_intermediate if cfg.rotate_intermediate is not None else bool(abits and abits <= 4)
    aq = None
    if abits:
        sym = cfg.act_symmetric if cfg.act_symmetric is not None else abits >= 8
        aq = ActQuant(abits, cfg.act_clip or (1.0 if abits >= 8 else 0.9), sym, router=cfg.router_bits is not None,
                      inter_rotation_seed=cfg.rotation_seed if rotate_inter else None)
    # at 4 bits and above the targets' correction fits the calibration tokens more than it helps held-out text
    # (docs/BENCHMARKS.md, stop 41); with mixed widths the narrowest decides
    narrowest = min([wbits, lbits, *cfg.layer_bits.values()])
    sequential = cfg.sequential if cfg.sequential is not None else abits is None and narrowest <= 3

    def both(ebits: int, lbits: int) -> tuple[QuantOptions, QuantOptions]:  # no code sweeps over trellis paths
        return (replace(options(ebits), code_sweeps=0 if cfg.trellis(ebits) else cfg.sweeps(experts=True)),
                replace(options(lbits), code_sweeps=0 if cfg.trellis(lbits) else cfg.sweeps(experts=False)))

    experts, linears = both(wbits, lbits)
    plan = QuantPlan.of(cfg, experts=experts, linears=linears, act=aq, smooth=smooth,
                        rotate_intermediate=rotate_inter, sequential=sequential,
                        layers={i: both(b, b) for i, b in cfg.layer_bits.items()}, vocab_prior=cfg.prior(),
                        expert_prior=cfg.expert_prior, expert_chunk=cfg.expert_chunk)
    meta = {"scheme": cfg.scheme,
            "weights": {"kind": "int", "bits": lbits, "group_size": cfg.groups(), "symmetric": cfg.symmetric,
                        "method": cfg.method},
            "experts": {"kind": "int", "bits": wbits, "group_size": cfg.groups(), "symmetric": cfg.symmetric},
            "activations": act_meta(aq),
            "rotation": {"residual": cfg.rotate, "intermediate": rotate_inter, "seed": cfg.rotation_seed,
                         "note": "experts' down codes are in the rotated basis W Q; the checkpoint stores W_hat Q^T"
                         if rotate_inter else None},
            "router_bits": cfg.router_bits, "smooth": smooth, "sequential": sequential,
            "gptq_rounds": cfg.rounds(), "linear_gptq_rounds": cfg.rounds(lbits),
            "code_sweeps": {"experts": cfg.sweeps(True), "linears": cfg.sweeps(False)},
            "record": RECORD_FILE if cfg.save_format == "fake-quant" else None}
    if cfg.codec == "trellis":  # the packed writer codes these widths as trellis<b>
        for key in ("weights", "experts"):
            meta[key]["code"] = {"kind": "trellis", "widths": [2, 3, 4], "state_bits": STATE_BITS, "seq": SEQ}
    if cfg.prior():
        meta["vocab_prior"] = cfg.prior()
    if cfg.expert_prior:
        meta["expert_prior"] = cfg.expert_prior
    if cfg.layer_bits:  # the packed writer's per-layer widths (JSON keys are strings)
        meta["layer_bits"] = {str(i): b for i, b in cfg.layer_bits.items()}
    for key, bits in (("weights", lbits), ("experts", wbits)):  # only where used: other metadata keeps its bytes
        if cfg.zero_frac(bits):
            meta[key]["zero_fraction_bits"] = cfg.zero_frac(bits)
    for i, b in cfg.layer_bits.items():
        if cfg.zero_frac(b):
            meta.setdefault("layer_zero_fraction_bits", {})[str(i)] = cfg.zero_frac(b)
    return plan, meta


@register_stage(QuantizeConfig, modifies_model=True, uses_text=True, needs_original=True, changes="weights")
def run(ctx: StageContext, cfg: QuantizeConfig) -> dict[str, Any]:
    """Expert-aware GPTQ/RTN quantization (W8A8, W4A16, W3A16, W2A16, W4A4, W3A4) with EAQuant smoothing,
    router alignment and calibration balance; activation quantization simulated in the forward pass."""
    t0 = time.time()
    plan, meta = plan_of(cfg)
    warn_trellis_on_cpu(ctx, cfg)
    base, extra = split_windows(ctx, cfg.reserve if cfg.balance else 0.0)
    result = quantize(ctx, plan, base, extra, meta, cfg.save_format, f"quantizing ({cfg.scheme})")
    return finish(ctx, result, meta, base, extra, t0, cfg.save_format)


def warn_trellis_on_cpu(ctx: StageContext, cfg: QuantizeConfig) -> None:
    """``--codec trellis`` where its search cannot run on Triton (a CPU): one warning with the expected time (the
    torch search costs about `TRELLIS_CPU_SECONDS_PER_WEIGHT` per weight and pass, up to ``1 + rounds`` passes)."""
    device = ctx.placement.device
    if cfg.codec != "trellis" or resolve_backend(None, device) == "triton":
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        layers = ctx.source.arch.decoder_layers(AutoModelForCausalLM.from_config(ctx.source.config))
    weights = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    minutes = weights * TRELLIS_CPU_SECONDS_PER_WEIGHT * (1 + cfg.rounds(cfg.bits[0])) / 60
    took = f"about {minutes:,.0f} min" if minutes >= 1 else "under a minute"
    log.warning("--codec trellis on %s: the trellis search runs in torch here, %s for %.3g weights (one core of a "
                "2-core x86 machine); on a CUDA GPU it runs in Triton (--device cuda)", device, took, weights)
