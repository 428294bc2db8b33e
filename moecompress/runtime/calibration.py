"""Calibration statistics of one decoder layer, collected with hooks while the layer runs.

* Every ``nn.Linear`` outside the routed experts and the router (attention, dense and shared MLPs): the
  input Hessian ``sum x x^T`` (shared experts: weighted by their sigmoid gate, as MoEQuant does), the
  per-channel input max, and which norm's output it reads (so smoothing can fold into that norm).
* Routed experts, per expert (`runtime.expert_stats`): the gate-weighted Hessian of its routed inputs
  ``sum_t g_t x_t x_t^T`` (MoEQuant's affinity-guided Hessian), the same for the down-projection input
  (computed from the routed tokens), routed-token counts, per-channel maxima of both inputs; plus, kept apart,
  the same sums over *near-miss* tokens (the expert ranked k+1..k+m, weighted by its routing probability) and
  over *reserve* batches, which only experts short of tokens use (EAQuant's calibration balance).
* The router's input: per-channel max over all tokens and a token sample spread over every batch (for router
  alignment, the smoothing-strength search and the pooled Hessians of rare experts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.algorithms.gram import gram
from moecompress.models.base import MoEBlockView
from moecompress.models.calls import experts_call_args
from moecompress.runtime import token_weights
from moecompress.runtime.expert_stats import ExpertStats, expert_step

__all__ = ["LayerStats", "LinearStats", "collect", "dense_linears", "norm_sources"]


@dataclass
class LinearStats:
    H: torch.Tensor  # [C, C]
    act_max: torch.Tensor  # [C]
    tokens: int = 0
    source: str | None = None  # "attn_norm" / "moe_norm" when it reads that norm's output directly


@dataclass
class LayerStats:
    linears: dict[str, LinearStats] = field(default_factory=dict)  # by module name inside the layer
    experts: ExpertStats | None = None
    mode: str = "routed"  # "routed" (base batches), "near" (near-miss tokens of base batches), "reserve"
    sample_tokens: int = 8192


def _accumulate(stats: LinearStats, x: torch.Tensor, weight: torch.Tensor | None = None,
                cache: dict | None = None) -> None:
    """``cache`` (cleared per layer call): linears reading the same tensor with the same weighting (q, k, v)
    share one Gram matrix and maximum per call."""
    tw = token_weights.current(x.device)
    if tw is not None:
        weight = tw if weight is None else weight.reshape(-1).float() * tw
    key = (x.data_ptr(), tuple(x.shape), None if weight is None else (weight.data_ptr(), tw is not None))
    if cache is None or key not in cache:
        x2 = x.reshape(-1, x.shape[-1]).float()
        xw = x2 if weight is None else x2 * weight.reshape(-1, 1).float().sqrt()
        got = (x, weight, gram(xw), x2.abs().amax(0), x2.shape[0])  # x, weight held: their addresses stay theirs
        if cache is None:
            cache = {}
        cache[key] = got
    _, _, G, m, n = cache[key]
    stats.H += G
    stats.act_max = torch.maximum(stats.act_max, m)
    stats.tokens += n


def dense_linears(layer: nn.Module, views: list[MoEBlockView]) -> dict[str, nn.Linear]:
    """The layer's linears quantized on their own Hessians, by name: all but routers, shared-expert gates and
    the routed experts."""
    skip: set[int] = set()
    for v in views:
        skip.update({id(m) for m in v.router.modules()} | {id(v.experts.module)})  # a router may wrap a Linear (HunYuan gate.wg)
        if v.shared_gate is not None:
            skip.add(id(v.shared_gate))
    experts_params = {id(p) for v in views for p in v.experts.module.parameters()}
    return {name: m for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in skip and id(m.weight) not in experts_params}


@contextlib.contextmanager
def collect(layer: nn.Module, views: list[MoEBlockView], attn_norm: nn.Module | None, near_miss: int,
            sample_tokens: int = 8192, owned: range | None = None, hessians: bool = True,
            routed_hessians: bool = True, linears: bool = True, keep_calls: bool = False) -> Iterator[LayerStats]:
    """Hooks that fill a `LayerStats` while ``layer`` runs; removed on exit. Statistics live on the layer's device
    (float32). ``near_miss``: the routing ranks past top-k recorded for topping up rare experts (the ``near_miss``
    recipe key); ``owned``: the experts whose statistics this process computes (default all).
    ``routed_hessians=False``: the experts' Hessians over the base batches' routed tokens (and ``h_max``) are
    left at zero, for a caller that takes them from a later pass (`runtime.paired.collect_pairs`); the reserve
    and near-miss top-ups are still collected, and with ``keep_calls`` the base batches' experts calls are kept
    for `expert_stats.routed_hessians` (plain GPTQ a chunk of experts at a time). ``linears=False``: only the
    router's and experts' statistics (the caller has the linears' from elsewhere:
    `runtime.paired.norm_reader_pairs`, `pair_linears`)."""
    stats = LayerStats(sample_tokens=sample_tokens)
    handles: list = []
    norm_out: dict[str, torch.Tensor] = {}
    grams: dict[tuple, tuple] = {}  # per layer call: one Gram matrix per distinct linear input (`_accumulate`)
    handles += [layer.register_forward_pre_hook(lambda m, a: grams.clear()),
                layer.register_forward_hook(lambda m, a, out: grams.clear())]
    shared_linears: set[int] = set()
    shared_gate_value: dict[str, torch.Tensor] = {}  # per-token sigmoid(shared gate) of the current call
    for v in views:
        if v.shared_gate is not None:
            shared_linears.update(id(m) for m in v.shared.module.modules())
            handles.append(v.shared.module.register_forward_pre_hook(
                lambda m, a, g=v.shared_gate: shared_gate_value.__setitem__("w", torch.sigmoid(g(a[0])).detach())))
        C = v.router_weight.shape[1]
        E, I = v.num_experts, v.experts.stacked("down").shape[2]
        stats.experts = ExpertStats.empty(E, C, I, v.router_weight.device, owned, hessians, routed_hessians)
        stats.experts.calls = [] if keep_calls and not routed_hessians else None
    handles += _norm_hooks(norm_out, attn_norm, views)
    for name, m in (dense_linears(layer, views) if linears else {}).items():

        def pre(mod, args, name=name):
            x = args[0]
            st = stats.linears.get(name)
            if st is None:
                C = x.shape[-1]
                st = stats.linears[name] = LinearStats(torch.zeros(C, C, device=x.device),
                                                       torch.zeros(C, device=x.device), 0, _source(norm_out, x))
            if stats.mode != "routed":
                return
            weight = shared_gate_value.get("w") if id(mod) in shared_linears else None
            _accumulate(st, x, weight, grams)

        handles.append(m.register_forward_pre_hook(pre))
    for v in views:
        last: dict[str, torch.Tensor] = {}
        handles.append(v.router.register_forward_hook(
            lambda m, a, out, last=last: last.__setitem__("logits", (out[0] if isinstance(out, tuple) else out).detach())))

        def on_experts(mod, args, kwargs, v=v, last=last):
            x, index, weights = experts_call_args(args, kwargs)
            logits = last.pop("logits").reshape(-1, v.num_experts)
            with torch.no_grad():
                expert_step(stats.experts, v, x.reshape(-1, x.shape[-1]), logits, index.reshape(-1, index.shape[-1]),
                            weights.reshape(-1, weights.shape[-1]).float(), near_miss, stats.mode, stats.sample_tokens)

        handles.append(v.experts.module.register_forward_pre_hook(on_experts, with_kwargs=True))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _norm_hooks(norm_out: dict[str, torch.Tensor], attn_norm: nn.Module | None,
                views: list[MoEBlockView]) -> list:
    """Hooks keeping the latest output of the attention norm and the MoE block's norm in ``norm_out`` (held, so
    that no other tensor can reuse its memory meanwhile)."""
    handles = []
    for tag, norm in (("attn_norm", attn_norm), ("moe_norm", views[0].pre_moe_norm if views else None)):
        if norm is not None:
            handles.append(norm.register_forward_hook(
                lambda m, a, out, tag=tag: norm_out.__setitem__(tag, out.detach())))
    return handles


def _source(norm_out: dict[str, torch.Tensor], x: torch.Tensor) -> str | None:
    """The tag of the norm whose output ``x`` is (the same tensor), or None."""
    return next((t for t, o in norm_out.items() if o.data_ptr() == x.data_ptr() and o.shape == x.shape), None)


@contextlib.contextmanager
def norm_sources(layer: nn.Module, views: list[MoEBlockView], attn_norm: nn.Module | None,
                 modules: dict[str, nn.Module]) -> Iterator[dict[str, str | None]]:
    """While ``layer`` runs: ``{name: "attn_norm" / "moe_norm" / None}`` for each of ``modules`` called, the norm
    whose output it reads directly at its first call (as `collect`'s `LinearStats.source`)."""
    norm_out: dict[str, torch.Tensor] = {}
    out: dict[str, str | None] = {}
    handles = _norm_hooks(norm_out, attn_norm, views)
    handles += [layer.register_forward_hook(lambda m, a, o: norm_out.clear())]

    def pre(mod, args, name):
        if name not in out:
            out[name] = _source(norm_out, args[0])

    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: pre(mod, a, name)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
