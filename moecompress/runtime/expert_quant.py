"""Quantizing one MoE block's routed experts from its calibration statistics: GPTQ (or RTN) batched over the
experts, with calibration balance (reserve, near-miss and pooled top-ups), sequential pairing toward the
full-precision experts, layer 0's vocabulary prior, and torchrun's expert ownership. The quantization steps
themselves are `runtime.layer_quant`'s.

Shapes: E experts, I expert width, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moecompress.algorithms.gram import routed_gram, with_prior
from moecompress.algorithms.quant_grid import QuantResult, TernaryGrid
from moecompress.algorithms.rare_experts import pooled_hessians
from moecompress.formats.quant_record import QuantRecord
from moecompress.models.base import MoEBlockView
from moecompress.runtime import layer_quant as lq  # lq._quantize looked up per call: benchmarks replace it
from moecompress.runtime.calibration import LayerStats
from moecompress.runtime.dist import Dist
from moecompress.runtime.layer_quant import QuantOptions, _blocks, _record
from moecompress.runtime.paired import PairStats, paired_rows, target_rows

__all__ = ["quantize_experts"]


@torch.no_grad()
def quantize_experts(view: MoEBlockView, stats: LayerStats, opt: QuantOptions, record: QuantRecord, prefix: str,
                     balance: bool, n_min: float, rare: str, down_rotation: torch.Tensor | None = None,
                     dist: Dist | None = None,
                     pairs: Callable[[str, torch.Tensor, torch.Tensor], PairStats | None] | None = None,
                     prior: tuple | None = None) -> dict[str, Any]:
    """GPTQ all experts of the block at once ([E, O, C] with [E, C, C] Hessians), with calibration balance:
    an expert short of ``n_min`` routed tokens is topped up from reserve batches, then near-miss tokens; one
    still short (with balance; without it, one with no token at all) is then, with ``rare="pooled"``, topped up
    to ``n_min`` tokens' worth with the layer's other tokens (`algorithms.rare_experts`), or with ``"rtn"``
    falls back to RTN (clip search).

    ``down_rotation`` ``Q [I, I]``: the down projections are quantized in the rotated basis (``W Q`` with
    Hessian ``Q^T H Q``, as an online Hadamard before them would see), the record keeps those codes and the
    checkpoint the dequantized weights rotated back (``W_hat Q^T``), so a weights-only load stays exact.

    ``dist`` (torchrun): this process quantizes its own experts (``stats.experts.owned``) and the results are
    gathered, so every process ends with the whole quantized block (each expert computed as one process would).

    ``pairs(which, gate, up)`` (GPTQ only; `runtime.paired.collect_pairs`, ``gate, up`` the full-precision
    weights) runs the calibration batches again through the layer as it is now and returns the experts'
    quantized and cross input moments for ``which``: ``"gate_up"`` before the gate/up projections are quantized
    (None when the layer's full-precision inputs were not captured), ``"down"`` after they are stored. Every
    expert quantized on its own routed tokens (not topped up, pooled or RTN) then has those projections
    quantized toward the full-precision expert's outputs from their quantized inputs (`algorithms.asym_calib`).

    ``prior`` ``(X [N, H], index, weights [N, K], share)`` (`layer_passes.expert_prior`: layer 0's experts on the
    vocabulary): each GPTQ expert's gate/up Hessian gets ``share`` (by trace) of its gate-weighted Gram matrix of
    the rows routed to it (`algorithms.gram.with_prior`; an RTN fallback's zero Hessian stays zero)."""
    ex = stats.experts
    E = view.num_experts
    dist = dist or Dist()
    own = slice(ex.owned.start, ex.owned.stop)
    H, Hd, n = ex.H, ex.H_down, ex.count.clone()  # the Hessians are topped up in place (not used afterwards)
    reserve_used, near_used, fallback, pooled = [], [], [], []
    for e in range(E):
        mine = e in ex.owned
        if balance and n[e] < n_min and ex.res_count[e] > 0:
            if mine:
                H[ex.row(e)] += ex.res_H[e]
                Hd[ex.row(e)] += ex.res_H_down[e]
            n[e] += ex.res_count[e]
            reserve_used.append(e)
        if balance and n[e] < n_min and ex.near_count[e] > 0:
            if mine:
                H[ex.row(e)] += ex.near_H[e]
                Hd[ex.row(e)] += ex.near_H_down[e]
            n[e] += ex.near_count[e]
            near_used.append(e)
        if n[e] == 0 or (balance and n[e] < n_min):
            if rare == "pooled" and ex.sample and opt.method == "gptq" and H.numel():  # RTN reads no Hessian
                if mine:
                    _pool(view, ex, e, H, Hd, n_min - float(n[e]))
                pooled.append(e)
                continue
            if mine:
                H[ex.row(e)] = 0  # an all-zero Hessian is the identity in gptq_quantize: RTN with clip search
                Hd[ex.row(e)] = 0
            fallback.append(e)
    gate, up = view.experts.stacked("gate")[own], view.experts.stacked("up")[own]  # [E_own, I, H]
    I, dtype = gate.shape[1], gate.dtype
    correct = pairs is not None and opt.method == "gptq" and H.numel() > 0
    fp = (gate.clone(), up.clone()) if correct else None  # the stores below overwrite the block's storage
    skip = set(reserve_used) | set(near_used) | set(pooled) | set(fallback)
    corrected = [e for e in range(E) if correct and e not in skip and ex.count[e] > 0]
    Cg = paired_rows(_with_base(pairs("gate_up", *fp) if correct else None, ex, H, fallback), corrected, ex, H)
    if prior is not None and opt.method == "gptq" and H.numel():
        X, index, weights, share = prior
        for e in ex.owned:
            H[ex.row(e)] = with_prior(H[ex.row(e)], routed_gram(X, index, weights, e), share)

    def gate_up_chunk(a: int, b: int) -> torch.Tensor:  # float32 [b - a, 2I, H]: W, or W' for corrected experts
        return target_rows(torch.cat([gate[a:b], up[a:b]], dim=1).float(), a, Cg, opt.damp)
    ternary = isinstance(opt.grid, TernaryGrid)

    def store_gate_up(a: int, w: torch.Tensor) -> None:  # one process: straight into the layer's storage
        view.experts.set_stacked("gate", w[:, :I], a)
        view.experts.set_stacked("up", w[:, I:], a)

    err_gu: dict[str, float] = {}
    res = _gathered(lq._quantize(gate_up_chunk,  # gate, up: one input
                                 (gate.shape[0], 2 * I, gate.shape[2]), H, _blocks(opt, I, I), dtype,
                                 store=None if dist.active else store_gate_up, error=err_gu), dist, E)
    gate = up = None  # (a copy for experts stored as modules)
    if dist.active:
        store_gate_up(0, res.weight)
    error = {"gate_up": _error(err_gu, res, own, ternary)}
    neg = res.neg_scales
    _record(record, f"{prefix}:gate", opt.grid, res.codes[:, :I], res.scales[:, :I], res.zeros[:, :I],
            None if neg is None else neg[:, :I])
    _record(record, f"{prefix}:up", opt.grid, res.codes[:, I:], res.scales[:, I:], res.zeros[:, I:],
            None if neg is None else neg[:, I:])
    del res, neg
    down = view.experts.stacked("down")[own]  # [E_own, H, I]
    Cd = paired_rows(_with_base(pairs("down", *fp) if correct else None, ex, Hd, fallback),
                     corrected, ex, Hd)  # (C, H_q) unrotated
    fp = None

    def down_chunk(a: int, b: int) -> torch.Tensor:  # float32 [b - a, H, I]: W, or W' for corrected experts
        return target_rows(down[a:b].float(), a, Cd, opt.damp)
    Q = None if down_rotation is None else down_rotation.to(down.device, torch.float32)
    if Q is not None:
        Hd = Q.T @ Hd @ Q if Hd.numel() else Hd  # an all-zero Hessian (RTN fallback) stays all-zero

    def store_down(a: int, w: torch.Tensor) -> None:
        view.experts.set_stacked("down", w, a)

    err_d: dict[str, float] = {}
    res = _gathered(lq._quantize(lambda a, b: down_chunk(a, b) if Q is None else down_chunk(a, b) @ Q,
                                 tuple(down.shape), Hd, opt, down.dtype, None if Q is None else (lambda w: w @ Q.T),
                                 None if dist.active else store_down, err_d), dist, E)
    down = None
    if dist.active:
        store_down(0, res.weight)
    error["down"] = _error(err_d, res, own, ternary)
    _record(record, f"{prefix}:down", opt.grid, res.codes, res.scales, res.zeros, res.neg_scales)
    return {"weight_error": error, "routed_tokens": [int(c) for c in ex.count], "tokens_used": [int(c) for c in n], "min_tokens": n_min,
            "topped_up_reserve": reserve_used, "topped_up_near_miss": near_used, "topped_up_pooled": pooled,
            "rtn_fallback": fallback, "corrected": {"gate_up": sorted({ex.owned.start + r for r in Cg} if Cg else []),
                                                    "down": sorted({ex.owned.start + r for r in Cd} if Cd else [])}}


def _with_base(ps: PairStats | None, ex, H: torch.Tensor, fallback: list[int]) -> PairStats | None:
    """Without the statistics pass's routed Hessians (``ex.routed`` False), each expert's base Hessian is the
    pairing pass's ``H_q`` over the same routed tokens (added to its top-ups; RTN fallbacks keep zero)."""
    if not ex.routed:
        if ps is None:
            raise RuntimeError("the experts' routed Hessians were not collected and no pairing pass ran")
        for e in ex.owned:
            if e not in fallback:
                H[ex.row(e)] += ps.Hq[ex.row(e)]
    return ps


def _pool(view: MoEBlockView, ex, e: int, H: torch.Tensor, Hd: torch.Tensor, deficit: float) -> None:
    """Top expert ``e``'s Hessians up with ``deficit`` tokens' worth of the layer's sampled tokens, weighted by
    the layer's mean gate score (an expert's Hessian sums gate-weighted tokens)."""
    X = torch.cat(ex.sample)
    gate_mean = float(ex.gate_sum.sum() / ex.count.sum().clamp(min=1)) if ex.count.sum() > 0 else 1.0
    bias = (None if b is None else b[e:e + 1] for b in (view.experts.bias("gate"), view.experts.bias("up")))
    Hx, Hh = pooled_hessians(X, view.experts.weight(e, "gate")[None], view.experts.weight(e, "up")[None],
                             view.activation, *bias)  # expert e's weights only, not a stack of all
    H[ex.row(e)] += deficit * gate_mean * Hx
    Hd[ex.row(e)] += deficit * gate_mean * Hh[0]


def _error(err: dict[str, float], res: QuantResult, own: slice, ternary: bool) -> dict[str, float]:
    """Reconstruction error of this process's experts (``err``: `_quantize`'s sums): relative squared error
    ``|W - W_hat|^2 / |W|^2`` and, for ternary codes (``t + 1``), the zero fraction."""
    out = {"relative_mse": err.get("num", 0.0) / max(err.get("den", 0.0), 1e-30)}
    if "rounds" in err:  # GPTQ rounds: how many ran, and the share of the Hessian-weighted error they removed
        out["gptq_rounds"] = err["rounds"]
        out["gptq_rounds_gain"] = 1.0 - err["rounds_after"] / max(err["rounds_before"], 1e-30)
    if ternary:
        out["zero_fraction"] = float((res.codes[own] == 1).float().mean())
    return out


def _gathered(res: QuantResult, dist: Dist, E: int) -> QuantResult:
    """Every process's experts of ``res``, in expert order (``res`` itself in one process)."""
    if not dist.active:
        return res
    neg = None if res.neg_scales is None else dist.gather(res.neg_scales, E)
    return QuantResult(*(dist.gather(t, E) for t in (res.weight, res.codes, res.scales, res.zeros)), neg_scales=neg)
