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
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from moecompress.algorithms.quant_grid import QuantGrid, fractional_zero_bits
from moecompress.algorithms.trellis import SEQ, STATE_BITS, TrellisGrid
from moecompress.errors import MoecompressError
from moecompress.formats.codecs import CODECS
from moecompress.formats.quant_record import RECORD_FILE
from moecompress.kernels.dispatch import resolve_backend
from moecompress.nn.act_quant import ActQuant
from moecompress.runtime.layer_quant import QuantOptions
from moecompress.runtime.pack import FakeQuantSink, PackedSink
from moecompress.runtime.quant_plan import QuantPlan, QuantRun, batches_of, needs_no_statistics
from moecompress.runtime.quantize_run import quantize_stream
from moecompress.runtime.rotate import ResidualRotation, check_rotatable
from moecompress.stages.base import StageConfig, StageContext, register_stage

__all__ = ["SCHEMES", "QuantizeConfig", "finish", "plan_of", "quantize", "split_windows"]

log = logging.getLogger(__name__)
# The torch trellis search's cost per weight and GPTQ pass on one core (2.0-2.4 us measured by
# benchmarks/trellis_search_speed.py on a 2-core x86 box): `warn_trellis_on_cpu`'s estimate
TRELLIS_CPU_SECONDS_PER_WEIGHT = 2.1e-6

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
          refit: true           # after GPTQ: refit each group's scale/zero to the Hessian-weighted error
          code_sweeps: 2        # coordinate-descent sweeps over the codes, each followed by the refit (default:
                                # 2 on attention / dense / shared linears, 0 on the routed experts)
          gptq_rounds: 2        # GPTQ again on the refit grid, each row keeping its better result (default: 2
                                # for 2-bit weights, 0 above)
          clip_floor: 0.8       # the clip search keeps at least this share of each group's range (default: 0.8
                                # for GPTQ at 2 bits, 0.2 otherwise)
          fractional_zeros: true  # zero points in steps of 2^-(8-b) (packed int<b>-fz; default: on at 2 bits)
          rare_experts: pooled  # experts short of tokens: topped up with the layer's tokens (or rtn)
          sequential: true      # each linear fit to its fp outputs from its quantized inputs, in order (GPTAQ)
          linear_bits: 4        # the attention, dense and shared linears at this width (default: the scheme's);
                                # the routed experts keep the scheme's (mixed precision, as QuantMoE-Bench)
          layer_bits: {0: 4}    # whole decoder layers at their own width (default: none)
    """

    stage: Literal["quantize"] = "quantize"
    scheme: Literal["w8a8", "w8a16", "w4a16", "w3a16", "w2a16", "w4a8", "w4a4", "w3a4"] = "w4a16"
    group_size: int | None = None  # default: 128 for weight-only schemes, -1 (per output channel) otherwise
    method: Literal["gptq", "rtn"] = "gptq"
    symmetric: bool = False
    # asymmetric grids: zero points with fraction bits in their byte (`quant_grid.fractional_zero_bits`: steps of
    # 2^-(8-b), so the levels need not include 0; the packed -fz codecs); default: on for 2-bit weights, off above
    fractional_zeros: bool | None = None
    clip_search: bool = True
    # the smallest range factor the clip search tries; default: 0.8 for GPTQ at 2 bits (the range best for
    # rounding alone clips more than suits GPTQ's error feedback: measured on two models), 0.2 otherwise
    clip_floor: float | None = Field(None, ge=0.2, le=1.0)
    act_order: bool = True
    refit: bool = True  # refit each group's scale/zero after GPTQ to the Hessian-weighted error (codes fixed)
    # coordinate-descent sweeps over the codes after GPTQ (QuantEase); default: 2 on the linears outside the routed
    # experts (attention, dense and shared MLPs: a small share of the weights and of the time), 0 on the experts
    code_sweeps: int | None = Field(None, ge=0, le=8)
    # with the refit: GPTQ again on the refit scales/zeros, keeping each row's better result, up to this many times
    # (stops early once a round gains under 0.5 %; `algorithms.refit.alternate`); default: 2 for 2-bit weights, 0
    # above (measured: at 3 and 4 bits they do not pay, and chat got worse on three calibration seeds)
    gptq_rounds: int | None = Field(None, ge=0, le=16)
    damp: float = Field(0.01, ge=0.0)
    block_size: int = Field(128, ge=1)
    act_clip: float | None = Field(None, gt=0.0, le=1.0)  # default: 1.0 for A8, 0.9 for A4
    act_symmetric: bool | None = None  # default: symmetric for A8, asymmetric for A4 (as EAQuant)
    smooth: bool | None = None
    smooth_alpha: float = Field(0.6, ge=0.0, le=1.0)
    smooth_aggregate: Literal["max", "freq", "gate"] = "max"
    smooth_router: bool = False
    smooth_attention: bool = True
    smooth_down: Literal["outlier", "full", "off"] = "outlier"
    rotate: bool = False  # rotate the residual stream offline (QuaRot; RMSNorm families; unties a tied LM head)
    rotate_intermediate: bool | None = None  # online Hadamard before experts' down projections (default: A4)
    rotation_seed: int = 0
    router_bits: int | None = Field(None, ge=2, le=8)
    align_router: bool = True
    align_objective: Literal["topk_rest", "topk"] = "topk_rest"  # topk: EAQuant's own loss (not a divergence)
    balance: bool = True
    balance_ratio: float = Field(2.0, gt=0.0)  # min routed tokens per expert = ratio * seq_len * K / E
    balance_per_input: float = Field(4.0, ge=0.0)  # GPTQ experts: and at least this many per input (hidden) dim
    near_miss: int = Field(2, ge=0)  # near-miss ranks k+1 .. k+near_miss
    reserve: float = Field(0.5, ge=0.0)  # reserve windows (for rare experts), as a share of the samples
    rare_experts: Literal["pooled", "rtn"] = "pooled"  # experts still short of tokens: pooled layer tokens, or RTN
    sequential: bool | None = None  # each linear toward its fp outputs from its quantized inputs (GPTAQ); default:
    # on for weight-only schemes (measured there), off when activations are quantized (not measured)
    sequential_targets: Literal["model", "layer"] = "model"  # fp outputs of the original model, or of the layer
    batch_size: int = Field(8, ge=1)
    save_format: Literal["packed", "fake-quant"] = "packed"  # packed tensors, or dequantized bf16 + the record
    # auto: each width's int<b> codec (ternary codecs belong to the ternary stage); trellis: weights of 2-4 bits in
    # QTIP's bitshift-trellis code (`algorithms.trellis`; packed trellis<b>, the same size as int<b>), others int<b>
    codec: str = "auto"
    # the weight width of every quantized linear outside the routed experts (attention, dense and shared MLPs; a
    # few percent of an MoE's weights, much of its low-bit error); default: the scheme's
    linear_bits: int | None = Field(None, ge=2, le=8)
    # decoder layer index -> the weight width of all its quantized weights (experts and linears), e.g. {0: 4}: the
    # first layers of an MoE carry much of its 2-3-bit error; the other layers keep the scheme's (and linear_bits)
    layer_bits: dict[int, int] = Field(default_factory=dict)

    @field_validator("layer_bits")
    @classmethod
    def _widths(cls, v: dict[int, int]) -> dict[int, int]:
        bad = {i: b for i, b in v.items() if i < 0 or not 2 <= b <= 8}
        if bad:
            raise ValueError(f"layer_bits {bad}: layer indices start at 0 and widths are 2 to 8 bits")
        return dict(sorted(v.items()))

    def rounds(self, bits: int | None = None) -> int:
        """The GPTQ rounds on the refit grid (`gptq_rounds`, or its per-width default) at ``bits`` (default: the
        scheme's weight width)."""
        bits = bits if bits is not None else self.bits[0]
        if self.gptq_rounds is not None:
            return self.gptq_rounds
        if self.trellis(bits):
            return 1  # at 3 bits on three models, 1 round as good as 2 in 25-40 % less time (BENCHMARKS, stop 36)
        # at 2 bits on three models x three seeds, 2 rounds gave a lower summed gap than 4 on all nine (BENCHMARKS,
        # stop 37): the later rounds fit the calibration tokens' Hessians closer without helping held-out text
        return 2 if bits <= 2 else 0

    def trellis(self, bits: int) -> bool:
        """Are ``bits``-wide weights trellis-coded (``codec: trellis``, 2 to 4 bits)?"""
        return self.codec == "trellis" and 2 <= bits <= 4

    def zero_frac(self, bits: int) -> int:
        """Fraction bits of the zero points at ``bits`` (0: integer zeros; `fractional_zeros`, default on at 2 bits)."""
        on = self.fractional_zeros if self.fractional_zeros is not None else bits == 2
        return fractional_zero_bits(bits) if on and not self.symmetric else 0

    def floor(self, bits: int | None = None) -> float:
        """The clip search's smallest range factor (`clip_floor`, or its per-method/width default) at ``bits``."""
        bits = bits if bits is not None else self.bits[0]
        if self.clip_floor is not None:
            return self.clip_floor
        return 0.8 if self.method == "gptq" and bits <= 2 else 0.2

    def linear_width(self) -> int:
        """The weight width of the linears outside the routed experts."""
        return self.linear_bits if self.linear_bits is not None else self.bits[0]

    def sweeps(self, experts: bool) -> int:
        """The code sweeps of the routed experts (``experts``) or of the other linears."""
        return self.code_sweeps if self.code_sweeps is not None else (0 if experts else 2)

    @property
    def bits(self) -> tuple[int, int | None]:
        return SCHEMES[self.scheme]

    def groups(self) -> int:
        return self.group_size if self.group_size is not None else (128 if self.bits[1] is None else -1)

    def check(self, config: Any, arch: Any) -> None:
        from transformers import AutoModelForCausalLM

        if self.codec == "trellis":
            if not self.trellis(self.bits[0]):
                raise MoecompressError(f"--codec trellis codes 2-4-bit weights, but scheme {self.scheme} has "
                                       f"{self.bits[0]}-bit weights", "use a 2-4-bit scheme, or leave --codec auto")
            if self.symmetric:
                raise MoecompressError("--codec trellis stores a zero point per group; it has no symmetric form",
                                       "drop --symmetric, or leave --codec auto")
        elif self.codec not in ("auto", f"int{self.bits[0]}"):
            if self.codec.startswith("ternary"):
                raise MoecompressError(f"--codec {self.codec} stores ternary weights, but scheme {self.scheme} has "
                                       f"{self.bits[0]}-bit integer weights",
                                       f"use `moecompress ternary --codec {self.codec}`, or leave --codec auto")
            raise MoecompressError(f"--codec {self.codec} does not fit scheme {self.scheme}",
                                   f"use --codec auto (int{self.bits[0]}) or --codec trellis")
        if self.save_format == "packed":  # packed checkpoints need an integer codec for every width
            packable = sorted(int(c[3:]) for c in CODECS.names() if c.startswith("int") and c[3:].isdigit())
            given = [(f"--linear-bits {self.linear_bits} (linear_bits)", self.linear_bits)]
            given += [(f"--layer-bits {i}:{b} (layer_bits)", b) for i, b in self.layer_bits.items()]
            widths = ", ".join(map(str, packable))
            for opt, b in given:
                if b is not None and b not in packable:
                    raise MoecompressError(f"{opt}: packed checkpoints store {widths}-bit integer weights, not {b}-bit",
                                           f"use one of {widths}, or --fake-quant (save_format: fake-quant)")
        layers = config.num_hidden_layers
        outside = [i for i in self.layer_bits if i >= layers]
        if outside:
            raise MoecompressError(f"layer_bits names layer {outside[0]}, but the model has {layers} decoder layers "
                                   f"(0 to {layers - 1})", "give layer indices the model has")
        gs = self.groups()
        if gs not in (-1, 0) and gs < 1:
            raise MoecompressError(f"group size {gs} is invalid", "use a positive group size or -1 (per channel)")
        if gs in (-1, 0) and not self.rotate:
            return
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        if self.rotate:
            check_rotatable(arch.decoder_layers(meta), arch)
        if gs in (-1, 0):
            return
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
                    embed_transform=None if rotation is None else rotation.embedding) as stream:
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
    sequential = cfg.sequential if cfg.sequential is not None else abits is None

    def both(ebits: int, lbits: int) -> tuple[QuantOptions, QuantOptions]:  # no code sweeps over trellis paths
        return (replace(options(ebits), code_sweeps=0 if cfg.trellis(ebits) else cfg.sweeps(experts=True)),
                replace(options(lbits), code_sweeps=0 if cfg.trellis(lbits) else cfg.sweeps(experts=False)))

    experts, linears = both(wbits, lbits)
    plan = QuantPlan.of(cfg, experts=experts, linears=linears, act=aq, smooth=smooth,
                        rotate_intermediate=rotate_inter, sequential=sequential,
                        layers={i: both(b, b) for i, b in cfg.layer_bits.items()})
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
