"""The `quantize` stage's options (`QuantizeConfig`: the recipe keys and CLI flags, their per-width defaults, and
the checks a model must pass before any work starts) and its `SCHEMES`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from moecompress.algorithms.quant_grid import fractional_zero_bits
from moecompress.errors import MoecompressError
from moecompress.formats.codecs import CODECS
from moecompress.runtime.rotate import check_rotatable
from moecompress.stages.base import StageConfig

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
          refit: true           # after GPTQ: refit each group's scale/zero to the Hessian-weighted error
          code_sweeps: 2        # coordinate-descent sweeps over the codes, each followed by the refit (default:
                                # 2 on attention / dense / shared linears, 0 on the routed experts)
          gptq_rounds: 2        # GPTQ again on the refit grid, each row keeping its better result (default: 2
                                # for 2-bit weights, 0 above)
          clip_floor: 0.8       # the clip search keeps at least this share of each group's range (default: 0.8
                                # for GPTQ at 2 bits, 0.2 otherwise)
          fractional_zeros: true  # zero points in steps of 2^-(8-b) (packed int<b>-fz; default: on at 2 bits)
          rare_experts: pooled  # experts short of tokens: topped up with the layer's tokens (or rtn)
          sequential: true      # each linear fit to its fp outputs from its quantized inputs, in order (GPTAQ;
                                # default: on for weight-only schemes of 2-3-bit weights)
          linear_bits: 4        # the attention, dense and shared linears at this width (default: the scheme's);
                                # the routed experts keep the scheme's (mixed precision, as QuantMoE-Bench)
          layer_bits: {0: 4}    # whole decoder layers at their own width (default: none)
          vocab_prior: 0.1      # layer 0's query/key/value Hessian smoothed toward the whole vocabulary's, this
                                # share (default: 0.1 where layer 0's linears take 3-bit scalar codes, else 0)
          expert_prior: 0.1     # the same for layer 0's routed experts (default: 0, off)
          expert_chunk: 32      # routed experts' statistics and GPTQ this many experts at a time (default 0:
                                # as many as fit in 40 % of the device's memory; the same bytes either way)
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
    # the first decoder layer's query/key/value (every linear reading its attention norm) read a function of the
    # token alone: this share of the Hessian of the whole vocabulary's normalized embeddings, scaled to the
    # calibration Hessian's trace, is added to theirs, so tokens the calibration text lacks are not ignored
    # (docs/BENCHMARKS.md, stops 42-43); 0: off; default: `prior()`
    vocab_prior: float | None = Field(None, ge=0.0, le=10.0)
    # the same for the first decoder layer's routed experts (their input is mostly the token's): the vocabulary's
    # tokens through layer 0 as one-token sequences, and each expert's gate/up Hessian given this share of its
    # gate-weighted Hessian over the tokens routed to it; 0: off (the default: at 3 bits on four trained models x
    # three calibration seeds a tie, lower on the demo model only; docs/BENCHMARKS.md, stop 44)
    expert_prior: float = Field(0.0, ge=0.0, le=10.0)
    # the routed experts' Hessians, pairing statistics and GPTQ, this many experts of a layer at a time (each chunk's
    # freed before the next's are allocated: DeepSeek-V3's 256 experts at hidden 7168 need 53 GB per [E, H, H]
    # float32 tensor, and the sequential pairing holds three); 0: as many as fit in 40 % of the device's memory
    # (`runtime.memory.expert_chunk`). Every expert's numbers are the same whatever the chunk.
    expert_chunk: int = Field(0, ge=0)
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
    # on for weight-only schemes of 2-3-bit weights (measured there), off at 4 bits and above (measured: as good or
    # better without, in 60 % of the time) and when activations are quantized (not measured)
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

    def prior(self) -> float:
        """The vocabulary prior's share (`vocab_prior`, or its default: 0.1 where layer 0's linears take 3-bit
        scalar-coded weights under GPTQ with full-precision activations, else 0). Measured at 3 bits on four trained
        models x three calibration seeds; at 2 bits a tie, at 4 worse; not with the trellis code
        (docs/BENCHMARKS.md, stops 42-43)."""
        if self.vocab_prior is not None:
            return self.vocab_prior
        width = self.layer_bits.get(0, self.linear_width())
        measured = width == 3 and not self.trellis(width) and self.method == "gptq" and self.bits[1] is None
        return 0.1 if measured else 0.0

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
