"""Ternary routed experts: weights in {-1, 0, +1} times a per-group scale, after training.

Methods: ``absmean`` (BitNet b1.58's rule, round to nearest), ``twn`` (Ternary Weight Networks' 0.7 mean|w|
threshold with a least-squares scale) and ``gptq`` (TWN's groups with GPTQ error compensation, batched over
experts, on gate-weighted expert Hessians, QMoE-style). Only routed experts become ternary; attention,
shared experts and dense MLPs stay in full precision or take an ``others`` integer grid (>= 4 bits); the
router, embeddings and LM head are never touched. MoE experts tolerate this far better than dense layers
(QMoE, MoTE), but post-training ternarization is lossy: measure it (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from moecompress.algorithms.quant_grid import QuantGrid, TernaryGrid
from moecompress.formats.quant_record import RECORD_FILE
from moecompress.runtime.layer_quant import QuantOptions
from moecompress.runtime.quantize_run import QuantPlan
from moecompress.stages.base import StageConfig, StageContext, register_stage
from moecompress.stages.quantize import QuantizeConfig, finish, quantize, split_windows

__all__ = ["TernaryConfig", "plan_of"]


class TernaryConfig(StageConfig):
    """Ternarize the routed experts ({-1, 0, +1} x group scale).

    Example recipe entry::

        - stage: ternary
          method: gptq        # absmean | twn | gptq
          group_size: 128
          others: bf16        # attention / shared experts: bf16 | int8 | int4
    """

    stage: Literal["ternary"] = "ternary"
    method: Literal["absmean", "twn", "gptq"] = "gptq"
    group_size: int = 128
    others: Literal["bf16", "int8", "int4"] = "bf16"
    others_group_size: int = 128
    damp: float = Field(0.01, ge=0.0)
    balance: bool = True
    reserve: float = Field(0.5, ge=0.0)
    batch_size: int = Field(8, ge=1)
    save_format: Literal["packed", "fake-quant"] = "packed"  # packed tensors, or dequantized bf16 + the record
    codec: Literal["ternary-b3", "ternary2"] = "ternary-b3"  # 5 trits per byte (1.6 bits), or the int2 layout

    def check(self, config: Any, arch: Any) -> None:
        # the same divisibility rules as integer quantization, for the experts' and the others' group sizes
        QuantizeConfig(scheme="w4a16", group_size=self.group_size).check(config, arch)
        if self.others != "bf16":
            QuantizeConfig(scheme="w4a16", group_size=self.others_group_size).check(config, arch)


def plan_of(cfg: TernaryConfig) -> tuple[QuantPlan, dict[str, Any]]:
    """The quantization plan of a config, and the metadata recorded for loaders (``moecompress.json``)."""
    rule = "absmean" if cfg.method == "absmean" else "twn"
    # what this stage does not expose runs as the quantize stage's defaults (GPTQ's act order and block size,
    # the calibration balance's ratio and near-miss ranks); no smoothing, rotation or router quantization
    q = QuantizeConfig(damp=cfg.damp, balance=cfg.balance, batch_size=cfg.batch_size)
    experts = QuantOptions.of(TernaryGrid(rule, cfg.group_size), q, method="gptq" if cfg.method == "gptq" else "rtn",
                              refit=False, code_sweeps=0)
    others = None
    if cfg.others != "bf16":
        others = QuantOptions.of(QuantGrid(8 if cfg.others == "int8" else 4, cfg.others_group_size), q, method="gptq",
                                 refit=False, code_sweeps=0)
    plan = QuantPlan.of(q, experts=experts, linears=others, act=None, smooth=False, rotate_intermediate=False)
    meta = {"scheme": f"ternary-{cfg.method}",
            "experts": {"kind": "ternary", "rule": rule, "method": cfg.method, "group_size": cfg.group_size},
            "weights": None if others is None else {"kind": "int", "bits": others.grid.bits,
                                                    "group_size": cfg.others_group_size, "symmetric": False,
                                                    "method": "gptq"},
            "activations": None, "rotation": None, "router_bits": None, "smooth": False,
            "zero_fraction": None,
            "record": RECORD_FILE if cfg.save_format == "fake-quant" else None}
    return plan, meta


@register_stage(TernaryConfig, modifies_model=True, uses_text=True, needs_original=True, changes="weights")
def run(ctx: StageContext, cfg: TernaryConfig) -> dict[str, Any]:
    """Ternarize routed experts (absmean, TWN, or GPTQ-ternary); other linears bf16 or >= 4-bit."""
    t0 = time.time()
    plan, meta = plan_of(cfg)
    base, extra = split_windows(ctx, cfg.reserve if cfg.balance else 0.0)
    ctx.artifacts["ternary_codec"] = cfg.codec
    result = quantize(ctx, plan, base, extra, meta, cfg.save_format, f"ternarizing ({cfg.method})", cfg.codec)
    meta["zero_fraction"] = result.expert_code_ones / max(1, result.expert_codes)  # ternary code 1 is the trit 0
    return finish(ctx, result, meta, base, extra, t0, cfg.save_format)
