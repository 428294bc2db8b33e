"""The passes and helpers `runtime.quantize_run` runs per decoder layer besides its statistics and pairing:
the original layer on the probe windows (routing reference, rotation check), the quantized layer's output pass,
layer 0's vocabulary priors (its attention's readers, its experts), and the experts' skip during statistics passes.

Shapes: T tokens, K top-k, H hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moecompress.algorithms.gram import gram
from moecompress.models.calls import experts_call_args
from moecompress.runtime.executor import VOCAB_CHUNK, LayerStream
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.quant_plan import QuantPlan, QuantRun
from moecompress.runtime.replay import replaying
from moecompress.runtime.rotate import ResidualRotation, check_layer, norm_readers, rotate_layer

__all__ = ["expert_prior", "forward_layer", "output_pass", "prior_readers", "reference_pass", "skip_experts",
           "topk_sets", "vocab_prior"]


@contextlib.contextmanager
def skip_experts(views):
    """During a statistics pass the block output is discarded: the hooks see the experts' inputs, so the
    experts themselves need not run (their statistics are computed from routed tokens only)."""
    saved = []
    for v in views:
        m = v.experts.module
        saved.append((m, m.__dict__.get("forward")))
        m.forward = lambda *args, **kwargs: torch.zeros_like(args[0] if args else kwargs["hidden_states"])
    try:
        yield
    finally:
        for m, f in saved:
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f


def forward_layer(layer: nn.Module, h: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    out = layer(h.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def topk_sets(traces, i: int) -> torch.Tensor:
    return torch.cat(traces[i].index).sort(-1).values  # [T, K] chosen experts, as sets


def vocab_prior(stream: LayerStream, i: int, plan: QuantPlan, attn_norm: nn.Module | None
                 ) -> tuple[torch.Tensor, float] | None:
    """``(P [H, H], share)`` for the first decoder layer with ``plan.vocab_prior``: ``P`` the mean outer product of
    its attention norm's outputs on the stream's vocabulary rows (what that norm's readers see for any token); the
    rows are released once read."""
    if i != 0 or plan.vocab_prior <= 0 or stream.vocab is None or attn_norm is None:
        return None
    x = attn_norm(stream.vocab).float()
    return gram(x) / max(len(x), 1), plan.vocab_prior


def expert_prior(stream: LayerStream, i: int, layer: nn.Module, v, plan: QuantPlan) -> tuple | None:
    """``(X [N, H], index [N, K], weights [N, K], share)`` for the first decoder layer's MoE block ``v`` with
    ``plan.expert_prior``: the vocabulary rows through layer ``i`` as it is now (its attention quantized), each a
    one-token sequence, and the experts' inputs and routing captured (the experts themselves skipped): what
    layer 0's experts see for any token alone. `expert_quant.quantize_experts` smooths each expert's Hessian
    toward its gate-weighted share of it."""
    if i != 0 or plan.expert_prior <= 0 or stream.vocab is None or plan.experts is None:
        return None
    got = []
    handle = v.experts.module.register_forward_pre_hook(
        lambda m, a, kw: got.append(experts_call_args(a, kw)), with_kwargs=True)
    try:
        with skip_experts([v]):
            for rows, kw in zip(stream.vocab.split(VOCAB_CHUNK), stream.vocab_kwargs, strict=True):
                forward_layer(layer, rows[:, None], kw, stream.device)
    finally:
        handle.remove()
    X, index, weights = (torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for ts in zip(*got))
    return X.float(), index, weights.float(), plan.expert_prior


def prior_readers(vocab: tuple[torch.Tensor, float] | None, linears: dict) -> tuple | None:
    """`quantize_linears`'s ``prior`` from `vocab_prior`: for the linears reading the attention norm."""
    if vocab is None:
        return None
    return vocab[0], vocab[1], {n for n, st in linears.items() if st.source == "attn_norm"}


def reference_pass(stream: LayerStream, i: int, layer: nn.Module, lv: list, ref: list, probe: Sequence[int],
               rotation: ResidualRotation | None, out: QuantRun, park) -> tuple[Any, list]:
    """Step 1: the original layer ``i`` on the probe windows' original hidden states ``ref``: its routing traces
    (the agreement's reference) and the probe's next original hidden states. With ``rotation`` the layer is
    then rotated (its norm readers seen on that forward) and checked against the original's outputs."""
    arch, model = stream.arch, stream.model
    readers_cm = norm_readers(layer, arch) if rotation is not None else contextlib.nullcontext()
    with capture_routing(model, arch, layers=[i]) as ref_traces, readers_cm as readers:
        ref_out = [forward_layer(layer, h, stream.kwargs[i][b], stream.device) for h, b in zip(ref, probe)]
    if rotation is not None:
        rotate_layer(layer, arch, lv[0] if lv else None, readers, rotation)
        with capture_routing(model, arch, layers=[i]) as rot_traces:
            got = [forward_layer(layer, rotation.apply(h.to(stream.device)), stream.kwargs[i][b], stream.device)
                   for h, b in zip(ref, probe)]
        expected = torch.cat([rotation.apply(y).reshape(-1, y.shape[-1]) for y in ref_out])
        got = torch.cat([y.reshape(-1, y.shape[-1]) for y in got])
        change = check_layer(arch, i, expected, got, topk_sets(ref_traces, i) if lv else None,
                             topk_sets(rot_traces, i) if lv else None)
        out.rotation_max_change = max(out.rotation_max_change, change)
    return ref_traces, [park(y) for y in ref_out]


def output_pass(stream: LayerStream, i: int, moe: bool, probe_set: set[int], replay, ref_traces) -> float | None:
    """Step 4: the batches through the quantized layer ``i`` (the calibration batches first, the attention
    replayed where ``replay`` recorded it); through the last layer only the probe batches, since nothing reads
    the others' outputs. Returns the probe's routing agreement with the original layer's (an MoE layer)."""
    calls = {"n": 0}
    quant_index: list[torch.Tensor] = []
    every = i < stream.num_layers - 1 or probe_set >= set(range(len(stream.hidden)))
    order = range(len(stream.hidden)) if every else sorted(probe_set)

    def on_route(layer_index, x, logits, index, weights):
        if order[calls["n"]] in probe_set:
            quant_index.append(index.cpu())
        calls["n"] += 1

    with capture_routing(stream.model, stream.arch, layers=[i], on_route=on_route, store=False), \
            replaying(replay if every else None, stream.device):
        stream.run_layer(i, batches=None if every else order)
    if not moe:
        return None
    if calls["n"] != len(order):
        raise RuntimeError(f"layer {i}'s MoE block ran {calls['n']} times for {len(order)} batches")
    a = topk_sets(ref_traces, i)
    b = torch.cat(quant_index).sort(-1).values
    return float((a == b).all(-1).float().mean())
