"""What a quantization run does (`QuantPlan`, every value given by the stage) and what it reports (`QuantRun`);
`runtime.quantize_run` carries a plan out on a `LayerStream`."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch

from moecompress.nn.act_quant import ActQuant, ActQuantHandle
from moecompress.runtime.layer_quant import QuantOptions

__all__ = ["VOCAB_ROWS", "QuantPlan", "QuantRun", "batches_of", "needs_no_statistics"]

# rows of the input embedding behind `QuantPlan.vocab_prior` (every k-th; all of a vocabulary up to this size)
VOCAB_ROWS = 16384


@dataclass(frozen=True)
class QuantPlan:
    """What `quantize_stream` does, every value given: the defaults live in the stage configs only.

    The first five are what a stage derives from its scheme (quantization options, activation quantization,
    smoothing and the intermediate rotation resolved); the others are recipe keys, named as the ``quantize``
    stage config names them, so `of` reads them from a config object."""

    experts: QuantOptions | None  # routed experts (None: keep them in full precision)
    linears: QuantOptions | None  # attention, dense and shared MLPs (None: keep)
    act: ActQuant | None
    smooth: bool
    rotate_intermediate: bool
    smooth_alpha: float
    smooth_aggregate: str
    smooth_router: bool
    smooth_attention: bool
    smooth_down: str
    router_bits: int | None
    align_router: bool
    align_objective: str
    balance: bool
    balance_ratio: float  # min routed tokens per expert = ratio * seq_len * K / E
    balance_per_input: float  # GPTQ experts: min routed tokens also >= this * the experts' input width
    near_miss: int
    rare_experts: str  # experts still short of tokens: "pooled" (the layer's other tokens) or "rtn"
    sequential: bool  # each linear toward its full-precision outputs from its quantized inputs (GPTAQ)
    sequential_targets: str  # "model": the original model's outputs (a second stream); "layer": this layer's
    rotate: bool
    rotation_seed: int
    batch_size: int
    # per decoder layer: (experts, linears) options replacing the two above in that layer (mixed precision by
    # depth); resolved by the stage, empty by default
    layers: dict[int, tuple[QuantOptions | None, QuantOptions | None]] = field(default_factory=dict)
    # the first layer's attention-norm readers: this share (by trace) of the vocabulary's Hessian added to theirs
    # (add-alpha smoothing over the tokens the calibration text lacks); 0: none
    vocab_prior: float = 0.0
    # the first layer's routed experts: this share of each one's Hessian over the vocabulary's one-token sequences
    expert_prior: float = 0.0
    # the routed experts this many at a time (`runtime.expert_quant`); 0: as many as fit (`memory.expert_chunk`)
    expert_chunk: int = 0

    @classmethod
    def of(cls, settings: Any, **resolved: Any) -> QuantPlan:
        """The plan of a stage config: ``resolved`` (at least the five derived fields) as given, every other
        field without a default read by name from ``settings``."""
        return cls(**resolved, **{f.name: getattr(settings, f.name) for f in fields(cls) if f.name not in resolved
                                  and f.default is MISSING and f.default_factory is MISSING})

    def at(self, i: int) -> QuantPlan:
        """The plan of decoder layer ``i`` (its own options where `layers` has them)."""
        if i not in self.layers:
            return self
        experts, linears = self.layers[i]
        return replace(self, experts=experts, linears=linears, layers={})


@dataclass
class QuantRun:
    act_handle: ActQuantHandle  # simulated activation quantization left on a model held in memory
    layers: dict[str, Any] = field(default_factory=dict)
    routing_agreement: list[float] = field(default_factory=list)
    min_tokens_per_expert: float = 0.0
    rotated_residual: bool = False
    untied_lm_head: bool = False
    rotation_max_change: float = 0.0  # largest relative change of a rotated layer's outputs (checked per layer)
    expert_codes: int = 0  # routed experts' codes written
    expert_code_ones: int = 0  # of which equal to 1 (ternary: the trit 0)
    probe_only: bool = False  # RTN without smoothing/router: only the probe windows ran (no statistics needed)

    def fallbacks(self, kind: str = "rtn_fallback") -> dict[str, int]:
        """Experts per layer that fell back to RTN (``kind="topped_up_pooled"``: were topped up with pooled tokens)."""
        return {k: len(v["experts"].get(kind, [])) for k, v in self.layers.items() if "experts" in v}


def batches_of(windows: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``[N, S]`` windows per task cut into batches of at most ``size`` windows (tasks never mixed)."""
    return [w[i:i + size] for w in windows for i in range(0, len(w), size)]


def needs_no_statistics(plan: QuantPlan) -> bool:
    """Round-to-nearest without smoothing or a quantized router needs no calibration statistics: only the probe
    windows run (for the routing agreement), so the command is bound by reading and writing the weights."""
    return not plan.smooth and not plan.router_bits and all(
        o is None or o.method == "rtn" for o in (plan.experts, plan.linears))
