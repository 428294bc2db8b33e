"""Ternary routed experts: weights in {-1, 0, +1} times a per-group scale, after training.

Methods: ``absmean`` (BitNet b1.58's rule, round to nearest), ``twn`` (Ternary Weight Networks' 0.7 mean|w|
threshold with a least-squares scale), ``gptq`` (GPTQ error compensation, batched over experts, on
gate-weighted expert Hessians, QMoE-style) and ``rtn`` (round to nearest); ``grid`` picks the ternary grid of
``gptq`` / ``rtn``: ``twn`` (default), ``absmean`` or ``qmoe`` (QMoE's sparse per-row ``{min, 0, max}`` with
thresholds at half of each: about 90 % zeros, which the ``ternary-dict`` codec stores below 1 bit per weight).
``threshold`` moves any grid's zero threshold (the zero-fraction control). Only routed experts become ternary; attention,
shared experts and dense MLPs stay in full precision or take an ``others`` integer grid (>= 4 bits); the
router, embeddings and LM head are never touched. MoE experts tolerate this far better than dense layers
(QMoE, MoTE), but post-training ternarization is lossy: measure it (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from moecompress.algorithms.quant_grid import QuantGrid, TernaryGrid
from moecompress.errors import MoecompressError
from moecompress.formats.quant_record import RECORD_FILE
from moecompress.runtime.layer_quant import QuantOptions
from moecompress.runtime.quant_plan import QuantPlan
from moecompress.stages.base import StageConfig, StageContext, register_stage
from moecompress.stages.quantize import QuantizeConfig, finish, quantize, split_windows

__all__ = ["TernaryConfig", "plan_of"]


class TernaryConfig(StageConfig):
    """Ternarize the routed experts ({-1, 0, +1} x group scale).

    Example recipe entry::

        - stage: ternary
          method: gptq        # absmean | twn | gptq | rtn
          grid: qmoe          # gptq / rtn: twn (default) | absmean | qmoe
          threshold: 0.5      # optional: the grid's zero threshold factor (more: more zeros, more error)
          group_size: -1      # default 128; qmoe: -1 (per row)
          codec: auto         # ternary-b3 | ternary2 | ternary-dict | auto (per module the smaller)
          others: bf16        # attention / shared experts: bf16 | int8 | int4
    """

    stage: Literal["ternary"] = "ternary"
    method: Literal["absmean", "twn", "gptq", "rtn"] = "gptq"
    grid: Literal["absmean", "twn", "qmoe"] | None = None  # gptq / rtn: default twn
    threshold: float | None = Field(None, gt=0.0)  # the grid's threshold factor (absmean 0.5, twn 0.7, qmoe 0.5)
    group_size: int | None = None  # default 128; qmoe: -1 (one group per row, as QMoE)
    others: Literal["bf16", "int8", "int4"] = "bf16"
    others_group_size: int = 128
    damp: float | None = Field(None, ge=0.0)  # GPTQ damping; default 0.01, qmoe 0.1 (QMoE's percdamp)
    balance: bool = True
    reserve: float = Field(0.5, ge=0.0)
    batch_size: int = Field(8, ge=1)
    save_format: Literal["packed", "fake-quant"] = "packed"  # packed tensors, or dequantized bf16 + the record
    # 5 trits per byte (1.6 bits), the int2 layout, QMoE's dictionary code, or per module the smaller of b3 / dict
    codec: Literal["ternary-b3", "ternary2", "ternary-dict", "auto"] = "ternary-b3"

    @property
    def rule(self) -> str:
        if self.method in ("absmean", "twn"):
            return self.method
        return self.grid or "twn"

    @property
    def groups(self) -> int:
        if self.group_size is not None:
            return self.group_size
        return -1 if self.rule == "qmoe" else 128

    @property
    def damping(self) -> float:
        return self.damp if self.damp is not None else (0.1 if self.rule == "qmoe" else 0.01)

    def check(self, config: Any, arch: Any) -> None:
        if self.method in ("absmean", "twn") and self.grid not in (None, self.method):
            raise MoecompressError(f"--method {self.method} is round-to-nearest on its own grid; it cannot use "
                                   f"--grid {self.grid}", f"use --method gptq (or rtn) --grid {self.grid}")
        # the same divisibility rules as integer quantization, for the experts' and the others' group sizes
        QuantizeConfig(scheme="w4a16", group_size=self.groups).check(config, arch)
        if self.others != "bf16":
            QuantizeConfig(scheme="w4a16", group_size=self.others_group_size).check(config, arch)


def plan_of(cfg: TernaryConfig) -> tuple[QuantPlan, dict[str, Any]]:
    """The quantization plan of a config, and the metadata recorded for loaders (``moecompress.json``)."""
    rule = cfg.rule
    # what this stage does not expose runs as the quantize stage's defaults (GPTQ's act order and block size,
    # the calibration balance's ratio and near-miss ranks); no smoothing, rotation or router quantization
    q = QuantizeConfig(damp=cfg.damping, balance=cfg.balance, batch_size=cfg.batch_size,
                       balance_per_input=0.0)  # the per-input token floor: measured for integer GPTQ only
    experts = QuantOptions.of(TernaryGrid(rule, cfg.groups, cfg.threshold), q,
                              method="gptq" if cfg.method == "gptq" else "rtn",
                              refit=False, code_sweeps=0, gptq_rounds=0)
    others = None
    if cfg.others != "bf16":
        others = QuantOptions.of(QuantGrid(8 if cfg.others == "int8" else 4, cfg.others_group_size), q, method="gptq",
                                 refit=False, code_sweeps=0, gptq_rounds=0)
    plan = QuantPlan.of(q, experts=experts, linears=others, act=None, smooth=False, rotate_intermediate=False,
                        sequential=False)
    meta = {"scheme": f"ternary-{cfg.method}",
            "experts": {"kind": "ternary", "rule": rule, "method": cfg.method, "group_size": cfg.groups,
                        "threshold": cfg.threshold, "damp": cfg.damping, "two_scales": rule == "qmoe"},
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
    out = finish(ctx, result, meta, base, extra, t0, cfg.save_format)
    out["per_layer"] = layer_errors(result.layers)
    return out


def layer_errors(layers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per MoE layer: the routed experts' zero fraction and relative squared reconstruction error (gate/up and
    down weighted by their sizes, which are equal: ``2 E I H`` and ``E H I``)."""
    out = {}
    for k, entry in layers.items():
        err = (entry.get("experts") or {}).get("weight_error")
        if not err:
            continue
        gu, d = err["gate_up"], err["down"]
        out[k] = {"zero_fraction": (2 * gu.get("zero_fraction", 0.0) + d.get("zero_fraction", 0.0)) / 3,
                  "relative_mse": (2 * gu["relative_mse"] + d["relative_mse"]) / 3,
                  "relative_mse_gate_up": gu["relative_mse"], "relative_mse_down": d["relative_mse"]}
    return out
