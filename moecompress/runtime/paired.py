"""Full-precision inputs of a layer's linears, paired token by token with their inputs once the linears before
them are quantized (GPTAQ's asymmetric calibration, arXiv:2504.02692; `algorithms.asym_calib`).

`capture_inputs` records, while the layer still runs in full precision (the statistics pass), the inputs of
chosen linears and of the routed experts, per call; `pair_linears` then accumulates, while the partly
quantized layer runs the same batches in the same order, ``H_q = sum x_q x_q^T`` and ``C = sum x x_q^T`` for
each of those linears, so each can be quantized toward its full-precision output from its quantized inputs
(``W' = W C H_q^{-1}``, then GPTQ on ``W'`` with ``H_q``). The experts' pairs are taken by
`collect_pairs`, per routed token. Inputs are held as float32 on ``park``'s device
(one tensor per distinct input of a call: linears reading the same tensor share it).

Shapes: T tokens of a call, C a linear's input width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moecompress.algorithms.asym_calib import corrected_weight
from moecompress.algorithms.gram import gram
from moecompress.algorithms.moe_math import RoutedTokens, expert_intermediate
from moecompress.models.base import MoEBlockView
from moecompress.models.calls import experts_call_args
from moecompress.runtime import token_weights
from moecompress.runtime.calibration import LinearStats

__all__ = ["MIN_TOKENS_PER_INPUT", "PairStats", "capture_inputs", "collect_pairs", "norm_reader_pairs", "pair_linears",
           "paired_rows", "target_rows"]

# A pair is used only with at least this many tokens per input dimension; with fewer, ``W'`` fits the
# calibration tokens' noise (tiny test models calibrated on 128 tokens, about 1.3 tokens per input per expert,
# doubled their held-out logit error), and the linear keeps plain GPTQ on its own Hessian.
MIN_TOKENS_PER_INPUT = 4

# `collect_pairs` accumulates the experts' calls a group at a time, their tokens concatenated: each expert's products
# over the group at once, not per call (64-256 experts at top-8 get a few hundred tokens each per call: thin products
# and host time per expert and call). A group closes once its experts average `GROUP_TOKENS` routed tokens or its
# quantized and full-precision inputs take `GROUP_BYTES`. Pair products' seconds per W2 run, demo (8 experts, top-2,
# 512 tokens each per call) / fine-grained (64, top-8, 256): one call at a time 2.37-2.53 / 6.8-7.7, 1024 tokens
# 2.29-2.33 / 6.7, 2048 2.37-2.66 / 5.8-6.2, 8192 2.53-2.81 on the demo (`benchmarks/pair_groups.py`, stop 47)
GROUP_TOKENS = 1024
GROUP_BYTES = 256 << 20


@contextlib.contextmanager
def capture_inputs(layer: nn.Module, modules: dict[str, nn.Module], experts: nn.Module | None = None,
                   park: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Iterator[dict[str, list]]:
    """While ``layer`` runs: ``{name: [x [T, C] per call]}`` for ``modules`` (linears) and, under the key
    ``"experts"``, the routed experts module's hidden-state input per call."""
    store: dict[str, list] = {n: [] for n in modules}
    if experts is not None:
        store["experts"] = []
    # inputs of the current layer call (linears reading one tensor share it), each with the tensor itself: held
    # until the call ends, so that no later tensor of the call can reuse its memory and match its address
    seen: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in seen:
            seen[key] = (x, park(x.detach().reshape(-1, x.shape[-1]).float().clone()))
        store[name].append(seen[key][1])

    handles = [layer.register_forward_pre_hook(lambda m, a: seen.clear()),
               layer.register_forward_hook(lambda m, a, out: seen.clear())]
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda m, a, name=name: keep(name, a[0])))
    if experts is not None:
        handles.append(experts.register_forward_pre_hook(
            lambda m, a, kw: keep("experts", experts_call_args(a, kw)[0]), with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        seen.clear()


@contextlib.contextmanager
def pair_linears(modules: dict[str, nn.Linear], fp: dict[str, list],
                 want: Callable[[str], bool] | None = None) -> Iterator[dict[str, list]]:
    """While the layer runs the captured batches again: ``{name: [H_q [C, C], C [C, C], tokens]}``, call ``j`` of
    each linear paired with its captured call ``j``. Linears reading one tensor paired with one captured input
    (q, k, v) share the products; ``want(name)``: False skips that linear (asked at each call)."""
    out: dict[str, list] = {}
    calls = {n: 0 for n in modules}
    last: dict[str, Any] = {}  # the previous linear's input, captured input and products

    def pre(m, args, name):
        x = args[0]
        xf = fp[name][calls[name]]
        calls[name] += 1
        if want is not None and not want(name):
            return
        key = (id(xf), x.data_ptr(), tuple(x.shape))
        if last.get("key") != key:
            xq = x.detach().reshape(-1, x.shape[-1]).float()
            xf = xf.to(xq.device)
            tw = token_weights.current(xq.device)
            xw = xq if tw is None else xq * tw[:, None]
            Hq = gram(xq if tw is None else xq * tw.sqrt()[:, None])
            last.update(key=key, x=x, xf=xf, Hq=Hq, C=xf.T @ xw, n=xq.shape[0])
        if name not in out:
            out[name] = [torch.zeros_like(last["Hq"]), torch.zeros_like(last["C"]), 0]
        out[name][0] += last["Hq"]
        out[name][1] += last["C"]
        out[name][2] += last["n"]

    handles = [m.register_forward_pre_hook(lambda m, a, name=name: pre(m, a, name)) for name, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        last.clear()


@torch.no_grad()
def norm_reader_pairs(norm: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                      fp: dict[str, list[torch.Tensor]], device: torch.device
                      ) -> tuple[dict[str, LinearStats], dict[str, list]]:
    """The statistics and pairs of linears that read ``norm``'s output directly (the attention's q, k, v), from
    the norm alone: ``batches`` yields each calibration batch's layer input ``h [B, S, C]`` and token weights
    (`runtime.token_weights`, or None); ``fp {name: [x [T, C] per batch]}`` the full-precision inputs captured
    for them (`capture_inputs`). Returns what a statistics pass under `collect` and `pair_linears` would have
    given them (the same products, shared by the linears: their input is one tensor), without running the
    layer's attention and MoE block."""
    names = list(fp)
    H = C = amax = None
    n = 0
    for j, (h, tw) in enumerate(batches):
        x = norm(h.to(device))
        x2 = x.reshape(-1, x.shape[-1]).float()
        xf = fp[names[0]][j].to(x2.device)
        if tw is not None:
            tw = tw.reshape(-1).float().to(x2.device)
        xw = x2 if tw is None else x2 * tw.sqrt()[:, None]
        G, Cj, m = gram(xw), xf.T @ (x2 if tw is None else x2 * tw[:, None]), x2.abs().amax(0)
        H, C, amax = (G, Cj, m) if H is None else (H + G, C + Cj, torch.maximum(amax, m))
        n += x2.shape[0]
    if H is None:
        return {}, {}
    return ({k: LinearStats(H, amax, n, "attn_norm") for k in names}, {k: [H, C, n] for k in names})


@dataclass
class PairStats:
    """Per owned expert, once the projections before ``which`` are quantized (`collect_pairs`): the quantized
    inputs' ``H_q = sum g x_q x_q^T`` and the cross moments ``C = sum g x x_q^T`` with the full-precision inputs
    ``x`` of the same tokens, and the routed tokens seen. ``which="down"``: the inputs are the intermediates;
    ``"gate_up"``: the block's hidden states."""

    Hq: torch.Tensor  # [E_own, D, D]
    C: torch.Tensor  # [E_own, D, D]
    count: torch.Tensor  # [E_own]


@contextlib.contextmanager
def collect_pairs(view: MoEBlockView, which: str, gate: torch.Tensor, up: torch.Tensor, owned: range | None = None,
                  fp_inputs: list[torch.Tensor] | None = None, keep: list | None = None,
                  replay: list | None = None) -> Iterator[PairStats]:
    """Hooks that fill a `PairStats` while the layer of ``view`` runs (its experts' forward may be skipped).
    ``gate, up [E_own, I, C]``: the owned experts' full-precision weights (for ``"down"`` the block holds the
    quantized ones; biases are not quantized, so both read the block's). ``fp_inputs``: the experts' hidden
    states of each call in the full-precision layer (`capture_inputs`); without them the full-precision side
    reads this pass's hidden states (only the expert's own gate/up error is seen).

    ``keep``: each call's ``(x, index, weights)`` is appended to it; ``replay``: such calls are accumulated at
    once, no hook is installed and the layer need not run (the down projections' pass after the gate/up pass:
    the attention, hence the experts' inputs and routing, did not change in between). The products are complete
    when the context exits (calls are accumulated in groups, `GROUP_TOKENS`)."""
    owned = range(view.num_experts) if owned is None else owned
    D = gate.shape[1] if which == "down" else gate.shape[2]
    dev = view.router_weight.device
    st = PairStats(torch.zeros(len(owned), D, D, device=dev), torch.zeros(len(owned), D, D, device=dev),
                   torch.zeros(len(owned), device=dev))
    calls = {"n": 0}
    pending: list[tuple] = []  # calls not yet accumulated: (x, xf or None without fp_inputs, index, weights)

    def flush() -> None:
        if pending:
            xs, xfs, index, weights = zip(*pending)
            pending.clear()

            def cat(ts):
                return torch.cat(ts) if len(ts) > 1 else ts[0]
            x = cat(xs)
            _accumulate_pairs(st, view, which, gate, up, owned, x, x if fp_inputs is None else cat(xfs), cat(index),
                              cat(weights))

    def on_experts(mod, args, kwargs):
        x, index, weights = experts_call_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1]).float()
        tw = token_weights.current(x.device) if mod is not None else None  # replayed calls carry theirs
        if tw is not None:
            weights = weights * tw[:, None]
        if keep is not None:
            keep.append((x, index, weights))
        xf = None if fp_inputs is None else fp_inputs[calls["n"]].to(x.device)  # None: this pass's own inputs
        calls["n"] += 1
        pending.append((x, xf, index, weights))
        tokens = sum(p[0].shape[0] for p in pending)
        if tokens * index.shape[-1] >= GROUP_TOKENS * view.num_experts or tokens * x.shape[-1] * 8 >= GROUP_BYTES:
            flush()

    if replay is not None:
        for x, index, weights in replay:
            on_experts(None, (x, index, weights), {})
        flush()
        yield st
        return
    handle = view.experts.module.register_forward_pre_hook(on_experts, with_kwargs=True)
    try:
        yield st
    finally:
        handle.remove()
    flush()  # the calls since the last group (not after a failed pass)


@torch.no_grad()
def _accumulate_pairs(st: PairStats, view: MoEBlockView, which: str, gate: torch.Tensor, up: torch.Tensor,
                      owned: range, x: torch.Tensor, xf_all: torch.Tensor, index: torch.Tensor,
                      weights: torch.Tensor) -> None:
    """One call's routed tokens into ``st`` (``x, xf_all [T, C]`` quantized / full-precision hidden states,
    ``index, weights [T, K]``)."""
    w = view.experts.weights()
    groups = RoutedTokens.group(index, weights, view.num_experts)
    for j, e in enumerate(owned):
        sel, g = groups.of(e)
        if len(sel) == 0:
            continue
        xs, xf, g = x[sel], xf_all[sel], g.sqrt()[:, None]
        if which == "down":
            gb = None if w.gate_bias is None else w.gate_bias[e]
            ub = None if w.up_bias is None else w.up_bias[e]
            xq = expert_intermediate(xs, w.gate[e], w.up[e], gb, ub, view.activation, w.gate.dtype) * g
            xf = expert_intermediate(xf, gate[j], up[j], gb, ub, view.activation, w.gate.dtype) * g
        else:
            xq, xf = xs * g, xf * g
        st.Hq[j] += gram(xq)
        st.C[j] += xf.T @ xq
        st.count[j] += len(sel)


def paired_rows(ps: PairStats | None, experts: list[int], ex, H: torch.Tensor) -> dict[int, tuple]:
    """``{row: (C, H_q)}`` for this process's ``experts`` that saw enough tokens in the pairing pass
    (`MIN_TOKENS_PER_INPUT`); their Hessians in
    ``H`` become ``H_q`` (what GPTQ on the target ``W'`` must see)."""
    out = {}
    if ps is None:
        return out
    for e in experts:
        if e in ex.owned and ps.count[ex.row(e)] >= MIN_TOKENS_PER_INPUT * ps.Hq.shape[-1]:
            r = ex.row(e)
            H[r] = ps.Hq[r]
            out[r] = (ps.C[r], ps.Hq[r])
    return out


def target_rows(W: torch.Tensor, a: int, pairs: dict[int, tuple], damp: float) -> torch.Tensor:
    """Rows ``a..`` of the stacked weights ``W``, each paired expert's replaced by its target ``W'``."""
    for j in range(a, a + W.shape[0]):
        if j in pairs:
            W[j - a] = corrected_weight(W[j - a][None], pairs[j][0][None], pairs[j][1][None], damp)[0]
    return W
