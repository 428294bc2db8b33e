"""Quantizing one MoE block's routed experts from its calibration statistics: GPTQ (or RTN) batched over the
experts, with calibration balance (reserve, near-miss and pooled top-ups), sequential pairing toward the
full-precision experts, layer 0's vocabulary prior, and torchrun's expert ownership. The quantization steps
themselves are `runtime.layer_quant`'s.

Shapes: E experts, I expert width, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moecompress.algorithms.gram import routed_gram, with_prior
from moecompress.algorithms.quant_grid import QuantResult, TernaryGrid
from moecompress.algorithms.rare_experts import pooled_hessians
from moecompress.formats.quant_record import QuantRecord
from moecompress.models.base import MoEBlockView
from moecompress.runtime import layer_quant as lq  # lq._quantize looked up per call: benchmarks replace it
from moecompress.runtime.calibration import LayerStats
from moecompress.runtime.expert_stats import routed_hessians
from moecompress.runtime.dist import Dist
from moecompress.runtime.layer_quant import QuantOptions, _blocks, _record
from moecompress.runtime.memory import expert_chunk
from moecompress.runtime.paired import PairStats, paired_rows, target_rows

__all__ = ["chunk_size", "quantize_experts"]


@torch.no_grad()
def quantize_experts(view: MoEBlockView, stats: LayerStats, opt: QuantOptions, record: QuantRecord, prefix: str,
                     balance: bool, n_min: float, rare: str, down_rotation: torch.Tensor | None = None,
                     dist: Dist | None = None,
                     pairs: Callable[[str, torch.Tensor, torch.Tensor, range, bool], PairStats | None] | None = None,
                     prior: tuple | None = None, chunk: int = 0) -> dict[str, Any]:
    """GPTQ the block's experts batched ([E, O, C] with [E, C, C] Hessians), with calibration balance:
    an expert short of ``n_min`` routed tokens is topped up from reserve batches, then near-miss tokens; one
    still short (with balance; without it, one with no token at all) is then, with ``rare="pooled"``, topped up
    to ``n_min`` tokens' worth with the layer's other tokens (`algorithms.rare_experts`), or with ``"rtn"``
    falls back to RTN (clip search).

    ``down_rotation`` ``Q [I, I]``: the down projections are quantized in the rotated basis (``W Q`` with
    Hessian ``Q^T H Q``, as an online Hadamard before them would see), the record keeps those codes and the
    checkpoint the dequantized weights rotated back (``W_hat Q^T``), so a weights-only load stays exact.

    ``dist`` (torchrun): this process quantizes its own experts (``stats.experts.owned``) and the results are
    gathered, so every process ends with the whole quantized block (each expert computed as one process would).

    ``chunk``: the experts are taken that many at a time (0: all at once; `chunk_size`), each chunk's Hessians,
    pairs and GPTQ done before the next's are allocated; every expert's numbers are the same either way.

    ``pairs(which, gate, up, experts, last)`` (GPTQ only; `runtime.paired.collect_pairs`, ``gate, up`` the
    full-precision weights of the chunk ``experts``, ``last`` whether it is the last chunk) runs the calibration
    batches again through the layer as it is now (or replays its experts' calls) and returns those experts'
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
    hessians = opt.method == "gptq" and ex.hessians  # RTN reads no Hessian
    n = ex.count.clone()
    reserve_used, near_used, fallback, pooled, deficit = [], [], [], [], {}
    for e in range(E):
        if balance and n[e] < n_min and ex.res_count[e] > 0:
            n[e] += ex.res_count[e]
            reserve_used.append(e)
        if balance and n[e] < n_min and ex.near_count[e] > 0:
            n[e] += ex.near_count[e]
            near_used.append(e)
        if n[e] == 0 or (balance and n[e] < n_min):
            if rare == "pooled" and ex.sample and hessians:
                deficit[e] = n_min - float(n[e])
                pooled.append(e)
                continue
            fallback.append(e)
    correct = pairs is not None and hessians
    skip = set(reserve_used) | set(near_used) | set(pooled) | set(fallback)
    gate_up_parts, down_parts, err_gu, err_d, done = [], [], {}, {}, {"gate_up": [], "down": []}
    chunks = _chunks(ex.owned, chunk)
    for k, R in enumerate(chunks):
        rows = _Chunk(R, ex.routed or ex.calls is not None)
        H, Hd = _hessians(view, ex, R, reserve_used, near_used, deficit, fallback)
        corrected = [e for e in R if correct and e not in skip and ex.count[e] > 0]
        gate_up, down = _chunk(view, R, opt, H, Hd, rows, corrected, fallback, prior, down_rotation, dist,
                               (lambda which, g, u: pairs(which, g, u, R, k == len(chunks) - 1)) if correct else None,
                               err_gu, err_d, done)
        gate_up_parts.append(gate_up)
        down_parts.append(down)
    I = view.experts.stacked("gate").shape[1]
    res = _gathered(_cat(gate_up_parts), dist, E)
    if dist.active:
        _store(view, "gate_up", 0, res.weight, I)
    error = {"gate_up": _error(err_gu, res, own, isinstance(opt.grid, TernaryGrid))}
    neg = res.neg_scales
    _record(record, f"{prefix}:gate", opt.grid, res.codes[:, :I], res.scales[:, :I], res.zeros[:, :I],
            None if neg is None else neg[:, :I])
    _record(record, f"{prefix}:up", opt.grid, res.codes[:, I:], res.scales[:, I:], res.zeros[:, I:],
            None if neg is None else neg[:, I:])
    del res, neg
    res = _gathered(_cat(down_parts), dist, E)
    if dist.active:
        _store(view, "down", 0, res.weight, I)
    error["down"] = _error(err_d, res, own, isinstance(opt.grid, TernaryGrid))
    _record(record, f"{prefix}:down", opt.grid, res.codes, res.scales, res.zeros, res.neg_scales)
    return {"weight_error": error, "routed_tokens": [int(c) for c in ex.count], "tokens_used": [int(c) for c in n],
            "min_tokens": n_min, "topped_up_reserve": reserve_used, "topped_up_near_miss": near_used,
            "topped_up_pooled": pooled, "rtn_fallback": fallback, "expert_chunks": len(chunks),
            "corrected": {k: sorted(v) for k, v in done.items()}}


def _chunk(view: MoEBlockView, R: range, opt: QuantOptions, H: torch.Tensor, Hd: torch.Tensor,
           rows, corrected: list[int], fallback: list[int], prior: tuple | None, down_rotation: torch.Tensor | None,
           dist: Dist, pairs: Callable | None, err_gu: dict, err_d: dict,
           done: dict) -> tuple[QuantResult, QuantResult]:
    """Experts ``R``'s gate/up, then down projections: (pairing,) GPTQ, stored into the block (one process: as
    each workspace chunk is done; torchrun: the whole chunk, and its result kept for the gather)."""
    a0 = R.start
    gate, up = view.experts.stacked("gate")[a0:R.stop], view.experts.stacked("up")[a0:R.stop]  # [|R|, I, H]
    I, dtype = gate.shape[1], gate.dtype
    fp = (gate.clone(), up.clone()) if pairs is not None else None  # the stores below overwrite the block's storage
    Cg = paired_rows(_with_base(pairs("gate_up", *fp) if fp else None, rows, H, fallback), corrected, rows, H)
    if prior is not None and opt.method == "gptq" and H.numel():
        X, index, weights, share = prior
        for e in R:
            H[rows.row(e)] = with_prior(H[rows.row(e)], routed_gram(X, index, weights, e), share)

    def gate_up_chunk(a: int, b: int) -> torch.Tensor:  # float32 [b - a, 2I, H]: W, or W' for corrected experts
        return target_rows(torch.cat([gate[a:b], up[a:b]], dim=1).float(), a, Cg, opt.damp)

    gate_up = lq._quantize(gate_up_chunk, (gate.shape[0], 2 * I, gate.shape[2]), H, _blocks(opt, I, I), dtype,
                           store=None if dist.active else (lambda a, w: _store(view, "gate_up", a0 + a, w, I)),
                           error=err_gu)  # gate, up: one input
    gate = up = None  # (a copy for experts stored as modules)
    if dist.active:  # this chunk's quantized gate/up, for its down projections' pairing
        _store(view, "gate_up", a0, gate_up.weight, I)
    done["gate_up"] += [a0 + r for r in Cg]
    down = view.experts.stacked("down")[a0:R.stop]  # [|R|, H, I]
    Cd = paired_rows(_with_base(pairs("down", *fp) if fp else None, rows, Hd, fallback),
                     corrected, rows, Hd)  # (C, H_q) unrotated
    fp = None
    done["down"] += [a0 + r for r in Cd]

    def down_chunk(a: int, b: int) -> torch.Tensor:  # float32 [b - a, H, I]: W, or W' for corrected experts
        return target_rows(down[a:b].float(), a, Cd, opt.damp)
    Q = None if down_rotation is None else down_rotation.to(down.device, torch.float32)
    if Q is not None:
        Hd = Q.T @ Hd @ Q if Hd.numel() else Hd  # an all-zero Hessian (RTN fallback) stays all-zero
    res = lq._quantize(lambda a, b: down_chunk(a, b) if Q is None else down_chunk(a, b) @ Q,
                       tuple(down.shape), Hd, opt, down.dtype, None if Q is None else (lambda w: w @ Q.T),
                       None if dist.active else (lambda a, w: _store(view, "down", a0 + a, w, I)), err_d)
    return gate_up, res


def _store(view: MoEBlockView, which: str, a: int, w: torch.Tensor, I: int) -> None:
    """Quantized weights of experts ``a..`` into the block's storage (``"gate_up"``: ``w [n, 2I, H]``)."""
    if which == "gate_up":
        view.experts.set_stacked("gate", w[:, :I], a)
        view.experts.set_stacked("up", w[:, I:], a)
    else:
        view.experts.set_stacked("down", w, a)


@dataclass(frozen=True)
class _Chunk:
    """Row bookkeeping of one chunk of experts (`paired_rows`, `_with_base`): expert ``e`` is row ``e - start``."""

    owned: range
    routed: bool

    def row(self, e: int) -> int:
        return e - self.owned.start


def chunk_size(view: MoEBlockView, chunk: int, experts: int, dist: Dist, from_pairs: bool, sequential: bool) -> int:
    """Experts per chunk: ``chunk`` when given, else as many as fit in the device's share (`memory.expert_chunk`)
    with the float32 statistics one expert of a chunk allocates: its Hessians, with ``from_pairs`` the gate/up
    pairing's quantized and cross moments, with ``sequential`` the down pairing's and the full-precision gate/up
    copy."""
    if chunk:
        return chunk
    g = view.experts.stacked("gate")
    I, C = g.shape[1], g.shape[2]
    per = 4 * (C * C + I * I + (2 * C * C if from_pairs else 0) + (2 * I * I if sequential else 0))
    per += 2 * I * C * g.element_size() if sequential else 0
    return expert_chunk(per, experts, g.device, dist.world)


def _chunks(owned: range, size: int | None) -> list[range]:
    """``owned`` in consecutive ranges of at most ``size`` experts (0 or None: one range)."""
    size = len(owned) if not size else max(1, size)
    return [range(a, min(a + size, owned.stop)) for a in range(owned.start, owned.stop, size)] or [owned]


def _hessians(view: MoEBlockView, ex, R: range, reserve_used: list[int], near_used: list[int],
              deficit: dict[int, float], fallback: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``R``'s gate/up and down Hessians ``[|R|, H, H]``, ``[|R|, I, I]``: the statistics pass's routed
    ones (a view: topped up in place, not used afterwards), computed now from its kept calls, or zeros for a
    pairing pass to fill; then the reserve, near-miss and pooled top-ups; all zero for an RTN fallback."""
    if ex.routed or not ex.hessians:
        H, Hd = ex.H[ex.row(R.start):ex.row(R.stop)], ex.H_down[ex.row(R.start):ex.row(R.stop)]
    elif ex.calls is not None:  # plain GPTQ: the statistics pass's calls, replayed for this chunk
        H, Hd = routed_hessians(ex, view, R)
    else:
        H, Hd = ex.blank(len(R))
    if not ex.hessians:
        return H, Hd
    for e in R:
        r = e - R.start
        if e in reserve_used:
            H[r] += ex.res_H[e]
            Hd[r] += ex.res_H_down[e]
        if e in near_used:
            H[r] += ex.near_H[e]
            Hd[r] += ex.near_H_down[e]
        if e in deficit:
            _pool(view, ex, e, H[r], Hd[r], deficit[e])
        elif e in fallback:
            H[r] = 0  # an all-zero Hessian is the identity in gptq_quantize: RTN with clip search
            Hd[r] = 0
    return H, Hd


def _cat(parts: list[QuantResult]) -> QuantResult:
    """Chunks' results in expert order (a field None in the chunks stays None)."""
    if len(parts) == 1:
        return parts[0]
    fields = ("weight", "codes", "scales", "zeros", "loss", "neg_scales")
    return QuantResult(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                         for f in fields))


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
    """Top expert ``e``'s Hessians ``H [H, H]``, ``Hd [I, I]`` up with ``deficit`` tokens' worth of the layer's
    sampled tokens, weighted by the layer's mean gate score (an expert's Hessian sums gate-weighted tokens)."""
    X = torch.cat(ex.sample)
    gate_mean = float(ex.gate_sum.sum() / ex.count.sum().clamp(min=1)) if ex.count.sum() > 0 else 1.0
    bias = (None if b is None else b[e:e + 1] for b in (view.experts.bias("gate"), view.experts.bias("up")))
    Hx, Hh = pooled_hessians(X, view.experts.weight(e, "gate")[None], view.experts.weight(e, "up")[None],
                             view.activation, *bias)  # expert e's weights only, not a stack of all
    H += deficit * gate_mean * Hx
    Hd += deficit * gate_mean * Hh[0]


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
