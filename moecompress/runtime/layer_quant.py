"""Quantizing one decoder layer's linears from its calibration statistics (GPTQ or RTN, with the refit, code
sweeps and sequential pairing), and the quantization options and steps `runtime.expert_quant` shares for the
routed experts; smoothing and the router are in `runtime.layer_smooth`.

Everything works through the adapter views; statistics come from `runtime.calibration`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from moecompress.algorithms.asym_calib import corrected_weight
from moecompress.algorithms.coord_descent import refine_codes
from moecompress.algorithms.gptq import gptq_factor, gptq_quantize
from moecompress.algorithms.gram import with_prior
from moecompress.algorithms.quant_grid import QuantGrid, QuantResult, TernaryGrid, rtn_quantize
from moecompress.algorithms.refit import alternate, refit_groups
from moecompress.algorithms.trellis import TrellisGrid, row_order, trellis_rounds
from moecompress.formats.quant_record import QuantRecord
from moecompress.runtime.calibration import LayerStats
from moecompress.runtime.paired import MIN_TOKENS_PER_INPUT

__all__ = ["QuantOptions", "quantize_linears"]


@dataclass(frozen=True)
class QuantOptions:
    """How one group of weights is quantized (every value given: the defaults live in the stage configs)."""

    grid: QuantGrid | TernaryGrid | TrellisGrid
    method: str  # "gptq" or "rtn"
    act_order: bool
    damp: float
    block_size: int
    refit: bool  # refit each group's scale (and zero) after GPTQ, codes fixed (`algorithms.refit`)
    code_sweeps: int  # coordinate-descent sweeps over the codes after GPTQ, each followed by the refit (QuantEase)
    gptq_rounds: int  # with the refit: GPTQ again on the refit grid, up to this many times (`refit.alternate`)

    @classmethod
    def of(cls, grid: QuantGrid | TernaryGrid | TrellisGrid, settings: Any, **given: Any) -> QuantOptions:
        """``grid`` and ``given`` as given, the other fields read by name from ``settings`` (a stage config; its
        ``code_sweeps`` and ``gptq_rounds`` None, the defaults that the stage resolves, read as 0)."""
        names = ("method", "act_order", "damp", "block_size", "refit", "code_sweeps", "gptq_rounds")
        got = {n: getattr(settings, n) for n in names if n not in given}
        for n in ("code_sweeps", "gptq_rounds"):  # None: a per-kind default the stage resolves; here 0
            if got.get(n, 0) is None:
                got[n] = 0
        return cls(grid, **given, **got)


WORKSPACE_BYTES = 2 << 30  # GPTQ's float32 workspace per call: experts are quantized in chunks that fit it


def _quantize(chunk: Callable[[int, int], torch.Tensor], shape: tuple[int, int, int], H: torch.Tensor | None,
              opt: QuantOptions, dtype: torch.dtype, finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
              store: Callable[[int, torch.Tensor], None] | None = None,
              error: dict[str, float] | None = None) -> QuantResult:
    """RTN, or GPTQ over ``shape = (E, O, C)`` weights with ``H [E, C, C]``, in chunks of experts.

    ``chunk(a, b)`` gives experts ``a..b-1`` in float32 (``[b - a, O, C]``): only one chunk is ever held in
    float32. The dequantized weights (after ``finish`` of each float32 chunk) are handed to ``store(a, w)`` as
    each chunk is done (the result's ``weight`` is then None), else returned in ``dtype``. GPTQ holds about six
    ``[C, C]`` and four ``[O, C]`` float32 matrices per expert (eight with GPTQ rounds), so a Mixtral-8x7B down
    projection (C = 14336) is quantized one expert at a time instead of needing about 40 GB at once. Each expert's
    result is the same as in one call. ``error``: the squared error and the squared weights are added to its
    ``num`` and ``den``; with GPTQ rounds, the Hessian-weighted error before and after them to ``rounds_before``
    and ``rounds_after``, and the most rounds a chunk ran to ``rounds``."""
    E, O, C = shape
    trellis = isinstance(opt.grid, TrellisGrid)
    rtn = (opt.method == "rtn" or H is None) and not trellis
    if rtn:  # the clip search holds about six [O, C] float32 copies per expert
        step = max(1, min(E, WORKSPACE_BYTES // 2 // (4 * 6 * O * C)))
    else:
        step = max(1, min(E, WORKSPACE_BYTES // (4 * (6 * C * C + (8 if opt.gptq_rounds else 4) * O * C))))
    out: QuantResult | None = None
    for a in range(0, E, step):
        b = min(E, a + step)
        W = chunk(a, b)
        if trellis:
            res = _trellis(W, None if opt.method == "rtn" or H is None else H[a:b], opt, error)
        elif rtn:
            res = rtn_quantize(W, opt.grid)
        else:
            rounds = isinstance(opt.grid, QuantGrid) and opt.refit and opt.gptq_rounds > 0
            factor = gptq_factor(H[a:b], opt.damp, opt.act_order) if rounds else None  # shared by every round
            res = _gptq(W, H[a:b], opt, factor=factor)
            if isinstance(opt.grid, QuantGrid):
                res = _refine(W, H[a:b], res, opt, error, factor)
            factor = None
        if error is not None:  # relative squared error, summed over chunks (before ``finish``: W's basis)
            error["num"] = error.get("num", 0.0) + float(((W - res.weight) ** 2).sum())
            error["den"] = error.get("den", 0.0) + float((W ** 2).sum())
        del W
        weight = res.weight if finish is None else finish(res.weight)
        if store is not None:
            store(a, weight)
            weight = None
        if out is None:
            out = QuantResult(*(None if t is None else t.new_empty((E, *t.shape[1:]), dtype=d) for t, d in (
                (weight, dtype), (res.codes, None), (res.scales, None), (res.zeros, None), (res.loss, None),
                (res.neg_scales, None))))
        for dst, src in zip((out.weight, out.codes, out.scales, out.zeros, out.loss, out.neg_scales),
                            (weight, res.codes, res.scales, res.zeros, res.loss, res.neg_scales)):
            if dst is not None:
                dst[a:b] = src
        del res, weight
    return out


def _gptq(W: torch.Tensor, H: torch.Tensor, opt: QuantOptions, params: tuple | None = None,
          factor: tuple | None = None) -> QuantResult:
    """GPTQ with ``opt``'s settings (``params``: the groups' scales and zeros to use instead of ``W``'s own;
    ``factor``: `gptq_factor` of ``H``, when computed once for several runs)."""
    return gptq_quantize(W, H, opt.grid, block_size=opt.block_size, damp=opt.damp, act_order=opt.act_order,
                         params=params, factor=factor)


def _trellis(W: torch.Tensor, H: torch.Tensor | None, opt: QuantOptions,
             error: dict[str, float] | None = None) -> QuantResult:
    """Trellis GPTQ (`algorithms.trellis`), then with ``opt.refit`` the refit and up to ``gptq_rounds`` rounds
    (`trellis.trellis_rounds`). ``H`` None (RTN, or no calibration statistics): plain squared error, each column
    searched alone."""
    E, O, C = W.shape
    H = W.new_zeros(E, C, C) if H is None else H  # all-zero: the identity
    factor = gptq_factor(H, opt.damp, opt.act_order)
    res = _gptq(W, H, opt, factor=factor)
    if not opt.refit:
        return res
    res, history = trellis_rounds(W, H, res, opt.grid, lambda p: _gptq(W, H, opt, p, factor), opt.gptq_rounds,
                                  opt.damp)
    if error is not None and opt.gptq_rounds:
        error["rounds_before"] = error.get("rounds_before", 0.0) + history[0]
        error["rounds_after"] = error.get("rounds_after", 0.0) + history[-1]
        error["rounds"] = max(error.get("rounds", 0), len(history) - 1)
    return res


def _record(record: QuantRecord, name: str, grid, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            neg: torch.Tensor | None = None) -> None:
    """One weight's record entry; a trellis code adds its row order and table (`formats.quant_record`)."""
    if isinstance(grid, TrellisGrid):
        record.add(name, codes, scales, zeros, order=row_order(codes.shape[1]), table=grid.table())
    else:
        record.add(name, codes, scales, zeros, neg)


def _blocks(opt: QuantOptions, *rows: int) -> QuantOptions:
    """``opt`` for a matrix of separately stored weights of ``rows`` each (a trellis keeps their sequences apart)."""
    return replace(opt, grid=replace(opt.grid, blocks=tuple(rows))) if isinstance(opt.grid, TrellisGrid) else opt


def _refine(W: torch.Tensor, H: torch.Tensor, res: QuantResult, opt: QuantOptions,
            error: dict[str, float] | None = None, factor: tuple | None = None) -> QuantResult:
    """After GPTQ: the scale/zero refit, up to ``gptq_rounds`` rounds of GPTQ again on the refit grid (each
    refit), then ``code_sweeps`` times a coordinate-descent sweep over the codes and the refit again (block
    coordinate descent on GPTQ's objective; no step increases it). ``error``: see `_quantize`; ``factor``:
    `gptq_factor` of ``H``, shared by the rounds (None: each round factorizes ``H`` again)."""
    frac = opt.grid.zero_frac

    def refit(Wr: torch.Tensor, r: QuantResult) -> QuantResult:
        return refit_groups(Wr, H, r, opt.grid.symmetric, opt.damp, zero_frac=frac)[0]
    if opt.refit:
        res = refit(W, res)
        if opt.gptq_rounds:
            res, history = alternate(W, H, res, lambda Wr, r: refit(Wr, _gptq(Wr, H, opt, (r.scales, r.zeros), factor)),
                                     opt.gptq_rounds)
            if error is not None:
                error["rounds_before"] = error.get("rounds_before", 0.0) + history[0]
                error["rounds_after"] = error.get("rounds_after", 0.0) + history[-1]
                error["rounds"] = max(error.get("rounds", 0), len(history) - 1)
    for _ in range(opt.code_sweeps):
        res = refine_codes(W, H, res, opt.grid.maxq, fractional=frac > 0)
        if opt.refit:
            res = refit(W, res)
    return res


@torch.no_grad()
def quantize_linears(layer: nn.Module, stats: LayerStats, opt: QuantOptions, record: QuantRecord,
                     prefix: str, names: Collection[str] | None = None,
                     pairs: dict[str, list] | None = None,
                     prior: tuple[torch.Tensor, float, Collection[str]] | None = None) -> dict[str, Any]:
    """GPTQ (or RTN) every collected linear of the layer (or those in ``names``) with its own Hessian.

    ``pairs`` (`runtime.paired.pair_linears`, ``{name: [H_q, C, tokens]}``): those linears are quantized toward
    their full-precision outputs from their quantized inputs (``W' = W C H_q^{-1}`` with ``H_q``;
    `algorithms.asym_calib`).

    ``prior = (P [C, C], s, linears)``: GPTQ on those linears runs on ``H + s tr(H) / tr(P) P`` (their target
    is formed first, from ``H`` alone): `algorithms.gram.with_prior`."""
    modules = dict(layer.named_modules())
    out = {}
    groups: list[tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]] = []  # (H, [(name, W)])
    for name, st in stats.linears.items():
        if names is not None and name not in names:
            continue
        w = modules[name].weight.detach()
        p = (pairs or {}).get(name)
        paired = p is not None and p[2] >= MIN_TOKENS_PER_INPUT * w.shape[1] and opt.method == "gptq"
        H = p[0] if paired else (st.H if st.tokens else None)
        W = corrected_weight(w.float()[None], p[1][None], H[None], opt.damp)[0] if paired else w.float()
        if prior is not None and H is not None and name in prior[2]:
            H = with_prior(H, prior[0], prior[1])
        out[name] = {"tokens": st.tokens, "method": opt.method if st.tokens else "rtn", "paired": paired}
        # linears reading one input (q, k, v; a dense MLP's gate and up) have equal Hessians: GPTQ's rows are
        # independent, so they are quantized as one matrix (one factorization of H, one column loop)
        same = next((g for g in groups if _same_hessian(g[0], H) and g[1][0][1].shape[1] == W.shape[1]), None)
        if same is None:
            groups.append((H, [(name, W)]))
        else:
            same[1].append((name, W))
    for H, members in groups:
        Wall = torch.cat([W for _, W in members])[None]  # [1, sum O, C]
        dtype = modules[members[0][0]].weight.dtype
        res = _quantize(lambda a, b, Wall=Wall: Wall, tuple(Wall.shape), None if H is None else H[None],
                        _blocks(opt, *(W.shape[0] for _, W in members)), dtype)
        a = 0
        for name, W in members:
            b = a + W.shape[0]
            modules[name].weight.copy_(res.weight[0, a:b])
            _record(record, f"{prefix}.{name}", opt.grid,
                    *(t[:, a:b].clone() for t in (res.codes, res.scales, res.zeros)))
            a = b
    return out


def _same_hessian(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Both absent (RTN), or the same shape and values."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and (a is b or torch.equal(a, b))
