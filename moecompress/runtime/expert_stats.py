"""The routed experts' calibration statistics of one MoE block (`ExpertStats`), filled call by call while the
layer runs (`runtime.calibration.collect` installs the hook): per expert the gate-weighted Hessian of its routed
inputs ``sum_t g_t x_t x_t^T`` (MoEQuant's affinity-guided Hessian) and of its down projection's inputs,
routed-token counts and per-channel maxima; kept apart, the same sums over near-miss tokens and reserve batches
for experts short of tokens (EAQuant's calibration balance); a token sample of the router's input. Or, for a
chunk of experts at a time, the calls kept and replayed (`routed_hessians`).

Shapes: T tokens of a call, C hidden, I expert width, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moecompress.algorithms.gram import gram
from moecompress.algorithms.moe_math import RoutedTokens, expert_intermediate
from moecompress.models.base import MoEBlockView
from moecompress.runtime import token_weights

__all__ = ["ExpertStats", "expert_step", "routed_hessians"]


@dataclass
class ExpertStats:
    """Per-expert statistics of one MoE block. Hessians are kept for the experts this process computes
    (``owned``, all of them in one process; `runtime.dist`): ``H[j]`` is expert ``owned[j]``'s. The near-miss and
    reserve Hessians exist only for experts that were topped up (``{expert: [C, C]}``). Counts and maxima cover
    every expert (summed over processes after each pass)."""

    H: torch.Tensor  # [E_own, C, C] gate-weighted, routed tokens (base batches)
    H_down: torch.Tensor  # [E_own, I, I]
    count: torch.Tensor  # [E] routed tokens (base batches)
    gate_sum: torch.Tensor  # [E]
    act_max: torch.Tensor  # [E, C] over routed tokens
    h_max: torch.Tensor  # [E, I]
    near_count: torch.Tensor  # [E]
    res_count: torch.Tensor  # [E]
    router_act_max: torch.Tensor  # [C] over all tokens
    owned: range = range(0)
    routed: bool = True  # the base batches' routed Hessians (and ``h_max``) collected; else none (the caller's)
    near_H: dict[int, torch.Tensor] = field(default_factory=dict)  # near-miss tokens, weighted by routing probability
    near_H_down: dict[int, torch.Tensor] = field(default_factory=dict)
    res_H: dict[int, torch.Tensor] = field(default_factory=dict)  # reserve batches (routed)
    res_H_down: dict[int, torch.Tensor] = field(default_factory=dict)
    short: set[int] = field(default_factory=set)  # experts to top up in "near" / "reserve" passes
    # router inputs [n, C]: a hashed share of every base batch's tokens (`_add_sample`), at most `sample_tokens`
    sample: list[torch.Tensor] = field(default_factory=list)
    sample_ids: list[torch.Tensor] = field(default_factory=list)  # their token numbers in call order [n]
    seen: int = 0  # tokens the sample has been drawn from
    sample_level: int = 0  # a token is kept when its hash is below 2^(32 - level)
    # without routed Hessians, the base batches' experts calls ``(x, index, weights, token weights)`` kept for
    # `routed_hessians` to compute them a chunk of experts at a time (None: not kept)
    calls: list | None = None

    @classmethod
    def empty(cls, E: int, C: int, I: int, device: torch.device | str = "cpu",
              owned: range | None = None, hessians: bool = True, routed: bool = True) -> ExpertStats:
        """``hessians=False``: no Hessians (``H``, ``H_down`` of size 0; round-to-nearest needs none).
        ``routed=False``: the routed Hessians come from a later pass, a chunk of experts at a time
        (`runtime.expert_quant`): ``H``, ``H_down`` hold no expert (``[0, C, C]``, ``[0, I, I]``)."""
        owned = range(E) if owned is None else owned

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device)

        C2, I2 = (C, I) if hessians else (0, 0)
        n = len(owned) if routed else 0
        return cls(z(n, C2, C2), z(n, I2, I2), z(E), z(E), z(E, C), z(E, I), z(E), z(E), z(C), owned, routed)

    @property
    def hessians(self) -> bool:
        """Whether Hessians are collected (GPTQ; not round-to-nearest)."""
        return self.H.shape[-1] > 0

    def blank(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero gate/up and down Hessians ``[n, C, C]``, ``[n, I, I]`` for ``n`` experts."""
        C, I = self.H.shape[-1], self.H_down.shape[-1]
        return torch.zeros(n, C, C, device=self.H.device), torch.zeros(n, I, I, device=self.H_down.device)

    def row(self, e: int) -> int:
        """Index of expert ``e`` in ``H``/``H_down``."""
        return e - self.owned.start

    def extra(self, which: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s near-miss (``near``) or reserve (``res``) Hessians, allocated at first use."""
        Hs, Hds = getattr(self, f"{which}_H"), getattr(self, f"{which}_H_down")
        if e not in Hs:
            H, Hd = self.blank(1)
            Hs[e], Hds[e] = H[0], Hd[0]
        return Hs[e], Hds[e]

    def rescale(self, s: torch.Tensor, down: bool = False) -> None:
        """Hessians of inputs divided by ``s`` (``[C]``, or per expert ``[E, I]`` with ``down``): ``H / (s s^T)``."""
        own = slice(self.owned.start, self.owned.stop)
        if down:
            ss = s[:, :, None] * s[:, None, :]
            self.H_down /= ss[own]
            tables = (self.near_H_down, self.res_H_down)
        else:
            ss = s[:, None] * s[None, :]
            self.H /= ss
            tables = (self.near_H, self.res_H)
        for table in tables:
            for e, M in table.items():
                M /= ss[e] if down else ss

    def sum_over(self, dist, fields: tuple[str, ...]) -> None:
        """Counts / maxima filled by each process for its own experts (zeros elsewhere), summed exactly."""
        for f in fields:
            setattr(self, f, dist.all_sum(getattr(self, f)))


_HASH = 0x9E3779B1  # Fibonacci hashing: token number * this mod 2^32, its high bits spread evenly


def _kept(ids: torch.Tensor, level: int) -> torch.Tensor:
    """Which token numbers ``ids`` a sample at ``level`` keeps: about one in ``2^level``, the same ones for
    every run, and each level's tokens a subset of the level below."""
    return (ids * _HASH) % (1 << 32) < (1 << (32 - level))


def _add_sample(st: ExpertStats, x: torch.Tensor, sample_tokens: int) -> None:
    """Add the share of one call's tokens ``x [T, C]`` that the sample keeps; while the sample holds more than
    ``sample_tokens``, go one level up (keep about half). So the sample is spread over every batch (tasks are
    batched apart: the first batches alone would be one task's tokens) and never larger than ``sample_tokens``."""
    ids = torch.arange(st.seen, st.seen + x.shape[0], device=x.device)
    st.seen += x.shape[0]
    keep = _kept(ids, st.sample_level)
    st.sample.append(x[keep])  # boolean indexing copies
    st.sample_ids.append(ids[keep])
    while sum(len(s) for s in st.sample) > sample_tokens:
        st.sample_level += 1
        masks = [_kept(i, st.sample_level) for i in st.sample_ids]
        st.sample = [s[m] for s, m in zip(st.sample, masks)]
        st.sample_ids = [i[m] for i, m in zip(st.sample_ids, masks)]


def expert_step(st: ExpertStats, view: MoEBlockView, x: torch.Tensor, logits: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor, near_miss: int, mode: str, sample_tokens: int) -> None:
    """One experts call ``x [T, C]``, router ``logits [T, E]``, top-k ``index, weights [T, K]`` into ``st`` by
    ``mode``: "routed" (base batches), "reserve" or "near" (the short experts' top-ups)."""
    x = x.float()
    E = st.count.shape[0]
    K = index.shape[1]
    w = view.experts.weights()
    act = view.activation
    tw = token_weights.current(x.device)
    if mode == "routed":
        st.router_act_max = torch.maximum(st.router_act_max, x.abs().amax(0))
        _add_sample(st, x, sample_tokens)
        if st.calls is not None:
            st.calls.append((x, index, weights, tw))
        _routed_counts(st, x, index, weights, tw)
        if not st.routed:  # no routed Hessians: the counts, gate sums and maxima are all
            return
    if mode == "near":
        probs = logits.float().sigmoid() if view.routing.score == "sigmoid" else logits.float().softmax(-1)
        order = logits.float().argsort(dim=-1, descending=True)  # [T, E] experts by logit
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(E, device=order.device).expand_as(order))  # [T, E] ranks
    groups = None if mode == "near" else RoutedTokens.group(index, weights, E)
    for e in st.owned:
        if mode != "routed" and e not in st.short:
            continue
        if groups is None:  # "near"
            sel = ((rank[:, e] >= K) & (rank[:, e] < K + near_miss) & ~(index == e).any(1)).nonzero().squeeze(-1)
            g, target = probs[sel, e], "near"
        else:
            (sel, g), target = groups.of(e), ("reserve" if mode == "reserve" else "routed")
        if len(sel) == 0:
            continue
        xs, g = x[sel], g.float()
        if tw is not None:
            g = g * tw[sel]
        xw, h, hw = _terms(xs, g, w, e, act)
        if target in ("near", "reserve"):
            He, Hde = st.extra("near" if target == "near" else "res", e)
            He += gram(xw)
            Hde += gram(hw)
            (st.near_count if target == "near" else st.res_count)[e] += len(sel)
        else:
            if st.H.numel():
                st.H[st.row(e)] += gram(xw)
                st.H_down[st.row(e)] += gram(hw)
            st.h_max[e] = torch.maximum(st.h_max[e], h.abs().amax(0))


def _routed_counts(st: ExpertStats, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                   tw: torch.Tensor | None) -> None:
    """`expert_step`'s counts, gate sums and input maxima of the owned experts for one base call (``x [T, C]``,
    ``index, weights [T, K]``, token weights ``[T]`` or None), without a loop over experts (many narrow experts
    get a few hundred tokens each per call, and a loop spends its time on the host); with or without routed
    Hessians, so their sums are the same either way (a chunked run's and an unchunked one's bytes)."""
    E = st.count.shape[0]
    own = (index >= st.owned.start) & (index < st.owned.stop)  # [T, K]
    g = weights.float() if tw is None else weights.float() * tw[:, None]
    e = index[own]
    st.count += torch.bincount(e, minlength=E)[:E].to(st.count.dtype)
    st.gate_sum.index_add_(0, e, g[own].to(st.gate_sum.dtype))
    a = x.abs()
    for k in range(index.shape[1]):  # one top-k slot at a time: [T, C], not [T K, C]
        src = a if bool(own[:, k].all()) else a * own[:, k, None]  # another process's expert: 0 changes no maximum
        st.act_max.scatter_reduce_(0, index[:, k, None].expand_as(a), src, "amax")


def _terms(xs: torch.Tensor, g: torch.Tensor, w, e: int, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``e``'s gate-weighted Hessian factors of its tokens ``xs [n, C]`` with gates ``g [n]``: the inputs
    ``x sqrt(g)``, the intermediates ``h`` and ``h sqrt(g)``."""
    h = expert_intermediate(xs, w.gate[e], w.up[e], None if w.gate_bias is None else w.gate_bias[e],
                            None if w.up_bias is None else w.up_bias[e], act, w.gate.dtype)
    return xs * g.sqrt()[:, None], h, h * g.sqrt()[:, None]


@torch.no_grad()
def routed_hessians(st: ExpertStats, view: MoEBlockView, experts: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed Hessians ``[|experts|, C, C]``, ``[|experts|, I, I]`` of a chunk of experts from the calls the
    statistics pass kept (``st.calls``), with the block's weights as they are now (full precision: before the
    chunk is quantized): what that pass computes for them, call by call in the same order."""
    H, Hd = st.blank(len(experts))
    w, act = view.experts.weights(), view.activation
    for x, index, weights, tw in st.calls or []:
        groups = RoutedTokens.group(index, weights, st.count.shape[0])
        for e in experts:
            sel, g = groups.of(e)
            if len(sel) == 0:
                continue
            xs, g = x[sel], g.float()
            if tw is not None:
                g = g * tw[sel]
            xw, _, hw = _terms(xs, g, w, e, act)
            H[e - experts.start] += gram(xw)
            Hd[e - experts.start] += gram(hw)
    return H, Hd
