"""Smoothing folds and router quantization of one decoder layer (the steps of `runtime.layer_quant` that are not
GPTQ of the linears and experts).

Smoothing is folded exactly (the full-precision function is unchanged) and the collected Hessians are transformed
to match (``x' = x / s`` gives ``H' = H / (s s^T)``), so statistics are collected once per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moecompress.algorithms.quant_grid import QuantGrid, rtn_quantize
from moecompress.algorithms.router_align import align_router
from moecompress.algorithms.smooth import (down_outlier_scales, fold_down, fold_into_columns, fold_into_norm,
                                           moe_smooth_scales, smooth_scales)
from moecompress.formats.quant_record import QuantRecord
from moecompress.models.base import MoEBlockView
from moecompress.runtime.calibration import LayerStats

__all__ = ["quantize_router", "smooth_layer"]


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: torch.Tensor) -> None:
    weight, bias = fold_into_norm(norm.weight, getattr(norm, "bias", None), s)
    norm.weight.copy_(weight)
    if bias is not None:
        norm.bias.copy_(bias)


@torch.no_grad()
def _fold_columns(weight: torch.Tensor, s: torch.Tensor) -> None:
    weight.copy_(fold_into_columns(weight, s))


def _smooth_stats(st, s: torch.Tensor) -> None:
    """A linear's statistics after its input is divided by ``s``: ``H' = H / (s s^T)``, ``max|x'| = max|x| / s``."""
    st.H /= s[:, None] * s[None, :]
    st.act_max /= s


@torch.no_grad()
def smooth_layer(layer: nn.Module, views: list[MoEBlockView], stats: LayerStats, attn_norm: nn.Module | None,
                 alpha: float, aggregate: str, router_term: bool, attention: bool, down: str) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant / EAQuant smoothing into the layer and its statistics; returns the vectors used.

    The vectors and the folds are `algorithms.smooth`; this writes them into the modules through the adapter
    views and keeps the collected statistics consistent with the folded weights.

    ``down``: ``outlier`` (EAQuant: scale only outlier channels of each expert's down input), ``full``
    (SmoothQuant per expert on its down input: each expert's intermediate is its own, so no aggregation is
    needed) or ``off``."""
    used: dict[str, torch.Tensor] = {}
    modules = dict(layer.named_modules())
    if attention and attn_norm is not None and getattr(attn_norm, "weight", None) is not None:
        consumers = [n for n, st in stats.linears.items() if st.source == "attn_norm"]
        if consumers:
            act = torch.stack([stats.linears[n].act_max for n in consumers]).amax(0)
            wmax = torch.stack([modules[n].weight.abs().amax(0).float() for n in consumers]).amax(0)
            s = smooth_scales(act, wmax, alpha)
            _fold_norm(attn_norm, s)
            for n in consumers:
                _fold_columns(modules[n].weight, s)
                _smooth_stats(stats.linears[n], s)
            used["attn"] = s
    for v in views:
        ex = stats.experts
        gate, up = v.experts.stacked("gate").float(), v.experts.stacked("up").float()  # [E, I, H]
        w_max = torch.maximum(gate.abs().amax(1), up.abs().amax(1))  # [E, H]
        weights = ex.count if aggregate == "freq" else ex.gate_sum
        router_w_max = v.router_weight.abs().amax(0).float() if router_term else None
        s = moe_smooth_scales(ex.act_max, w_max, ex.count, alpha, aggregate, weights, ex.router_act_max, router_w_max)
        if s is None:  # no expert saw a token
            continue
        _fold_norm(v.pre_moe_norm, s)
        _fold_columns(v.router_weight, s)
        for proj, w in (("gate", gate), ("up", up)):
            v.experts.set_stacked(proj, fold_into_columns(w, s))
        if v.shared is not None:
            for proj in ("gate", "up"):
                v.shared.set_stacked(proj, fold_into_columns(v.shared.stacked(proj).float(), s))
        if v.shared_gate is not None:
            _fold_columns(v.shared_gate.weight, s)
        for st in stats.linears.values():
            if st.source == "moe_norm":
                _smooth_stats(st, s)
        ex.rescale(s)
        ex.act_max /= s
        ex.router_act_max /= s
        ex.sample = [x / s for x in ex.sample]
        used["moe"] = s
        if down != "off" and v.activation.kind == "glu":  # act(g) * u is linear in u: fold 1/s into up rows
            if down == "full":
                wd = v.experts.stacked("down").float().abs().amax(1)  # [E, I] column maxima
                sd = smooth_scales(ex.h_max, wd, alpha)
            else:
                sd = down_outlier_scales(ex.h_max)  # [E, I]
            if bool((sd != 1).any()):
                b = v.experts.bias("up")
                up_new, down_new, b_new = fold_down(v.experts.stacked("up").float(),
                                                    v.experts.stacked("down").float(), sd, b)
                v.experts.set_stacked("up", up_new)
                if b is not None:
                    b.copy_(b_new)
                v.experts.set_stacked("down", down_new)
                ex.rescale(sd, down=True)
                ex.h_max /= sd
                used["down"] = sd
    return used


@torch.no_grad()
def quantize_router(view: MoEBlockView, stats: LayerStats, bits: int, align: bool, record: QuantRecord,
                    prefix: str, objective: str) -> dict[str, Any]:
    """Quantize the router per row (asymmetric); with ``align``, search each row's clip ratio to minimise
    the top-k KL of routing probabilities on calibration inputs."""
    W = view.router_weight
    X = torch.cat(stats.experts.sample) if stats.experts.sample else torch.zeros(0, W.shape[1], device=W.device)
    rule = view.routing
    score = "sigmoid" if rule.score == "sigmoid" else "softmax"
    if align and len(X):
        Wq, ratios, rep = align_router(W.detach(), X, bits, rule.top_k, score, view.router_bias,
                                       objective=objective)
    else:
        res = rtn_quantize(W.detach().float()[None], QuantGrid(bits, -1, False, True))
        Wq, rep = res.weight[0], {}
    W.copy_(Wq.to(W.dtype))
    res = rtn_quantize(W.detach().float()[None], QuantGrid(bits, -1, False, False))  # codes of the chosen grid
    record.add(f"{prefix}:router", res.codes, res.scales, res.zeros)
    return {"bits": bits, "aligned": bool(align and len(X)), **rep}
