"""Quantize a model one decoder layer at a time on a `LayerStream`, following a `QuantPlan`, writing each layer
as soon as it is done.

Per decoder layer ``i`` (loaded from disk, or the layer of a model in memory):

1. the *original* layer runs on the probe windows' original hidden states (a second stream of the probe
   windows through the original layers), recording its routing for the agreement report; with ``rotate``
   the layer is then rotated (QuaRot; its norm readers seen on that forward) and checked against it;
2. statistics pass(es) on the calibration batches (their inputs come from the already-quantized previous
   layers; rare experts topped up from reserve batches and near-miss tokens when calibration balance is on);
3. optional smoothing folded in, every other linear quantized on its own Hessian, all routed experts at once on
   their gate-weighted Hessians, the router optionally (with logit alignment). With ``sequential``
   (`runtime.paired`, `algorithms.asym_calib`) the layer is quantized in order, one more pass of the
   calibration batches before each step: the linears reading a norm; the others (attention output) toward
   their full-precision outputs from their now quantized inputs; the experts' gate/up likewise; their down
   projections likewise (with smoothing, whose folds the captured inputs would miss, only the last step).
   The full-precision side is, with ``sequential_targets="model"`` (GPTAQ), the original model's: the
   calibration batches also run through the original layers (a second stream, like the probe's), so every
   linear, the norm readers included, also takes up what the earlier layers' quantization changed; with
   ``"layer"`` (or a residual rotation) it is this layer in full precision on the quantized stream. With model
   targets, where every linear that reads a norm reads the attention's (no shared expert or dense MLP reading
   the MoE block's norm), there is no separate statistics pass: the norm readers' statistics are the attention
   norm applied to the stream (`runtime.paired.norm_reader_pairs`), and the router's and experts' come from the
   pass that pairs the attention output (its inputs, so a linear too short of tokens to be paired gets GPTQ on
   the Hessian of its inputs once q, k, v are quantized: GPTQ's "true sequential");
4. simulated activation quantization installed; the quantized layer produces the next layer's inputs for every
   batch (the probe windows' quantized stream among them: its routing against step 1's is the agreement);
5. the layer is written (its record entries with it) and released.

Nothing kept grows with depth but small per-layer summaries: the record is written with each layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from moecompress.formats.quant_record import QuantRecord
from moecompress.nn.act_quant import ActQuant, ActQuantHandle, install_layer_act_quant, rotation_matrix
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.calibration import LayerStats, LinearStats, collect, dense_linears, norm_sources
from moecompress.runtime.dist import Dist
from moecompress.runtime.executor import LayerStream
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.paired import capture_inputs, collect_pairs, norm_reader_pairs, pair_linears
from moecompress.runtime.replay import record_output_replay, replaying
from moecompress.runtime.layer_quant import QuantOptions, quantize_experts, quantize_linears
from moecompress.runtime.layer_smooth import quantize_router, smooth_layer
from moecompress.runtime.rotate import (
    ResidualRotation,
    check_layer,
    check_rotatable,
    norm_readers,
    rotate_layer,
    rotate_outside,
)

__all__ = ["QuantPlan", "QuantRun", "batches_of", "needs_no_statistics", "quantize_stream"]


@dataclass(frozen=True)
class QuantPlan:
    """What `quantize_stream` does, every value given: the defaults live in the stage configs only.

    The first five are what a stage derives from its scheme (quantization options, activation quantization,
    smoothing and the intermediate rotation resolved); the others are recipe keys, named as the ``quantize``
    stage config names them, so `of` reads them from a config object."""

    experts: QuantOptions | None  # routed experts (None: keep them in full precision)
    linears: QuantOptions | None  # attention, dense and shared MLPs (None: keep)
    act: ActQuant | None
    smooth: bool
    rotate_intermediate: bool
    smooth_alpha: float
    smooth_aggregate: str
    smooth_router: bool
    smooth_attention: bool
    smooth_down: str
    router_bits: int | None
    align_router: bool
    align_objective: str
    balance: bool
    balance_ratio: float  # min routed tokens per expert = ratio * seq_len * K / E
    balance_per_input: float  # GPTQ experts: min routed tokens also >= this * the experts' input width
    near_miss: int
    rare_experts: str  # experts still short of tokens: "pooled" (the layer's other tokens) or "rtn"
    sequential: bool  # each linear toward its full-precision outputs from its quantized inputs (GPTAQ)
    sequential_targets: str  # "model": the original model's outputs (a second stream); "layer": this layer's
    rotate: bool
    rotation_seed: int
    batch_size: int
    # per decoder layer: (experts, linears) options replacing the two above in that layer (mixed precision by
    # depth); resolved by the stage, empty by default
    layers: dict[int, tuple[QuantOptions | None, QuantOptions | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Any, **resolved: Any) -> QuantPlan:
        """The plan of a stage config: ``resolved`` (at least the five derived fields) as given, every other
        field without a default read by name from ``settings``."""
        return cls(**resolved, **{f.name: getattr(settings, f.name) for f in fields(cls) if f.name not in resolved
                                  and f.default is MISSING and f.default_factory is MISSING})

    def at(self, i: int) -> QuantPlan:
        """The plan of decoder layer ``i`` (its own options where `layers` has them)."""
        if i not in self.layers:
            return self
        experts, linears = self.layers[i]
        return replace(self, experts=experts, linears=linears, layers={})


@dataclass
class QuantRun:
    act_handle: ActQuantHandle  # simulated activation quantization left on a model held in memory
    layers: dict[str, Any] = field(default_factory=dict)
    routing_agreement: list[float] = field(default_factory=list)
    min_tokens_per_expert: float = 0.0
    rotated_residual: bool = False
    untied_lm_head: bool = False
    rotation_max_change: float = 0.0  # largest relative change of a rotated layer's outputs (checked per layer)
    expert_codes: int = 0  # routed experts' codes written
    expert_code_ones: int = 0  # of which equal to 1 (ternary: the trit 0)
    probe_only: bool = False  # RTN without smoothing/router: only the probe windows ran (no statistics needed)

    def fallbacks(self, kind: str = "rtn_fallback") -> dict[str, int]:
        """Experts per layer that fell back to RTN (``kind="topped_up_pooled"``: were topped up with pooled tokens)."""
        return {k: len(v["experts"].get(kind, [])) for k, v in self.layers.items() if "experts" in v}


@contextlib.contextmanager
def _skip_experts(views):
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


def batches_of(windows: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``[N, S]`` windows per task cut into batches of at most ``size`` windows (tasks never mixed)."""
    return [w[i:i + size] for w in windows for i in range(0, len(w), size)]


def needs_no_statistics(plan: QuantPlan) -> bool:
    """Round-to-nearest without smoothing or a quantized router needs no calibration statistics: only the probe
    windows run (for the routing agreement), so the command is bound by reading and writing the weights."""
    return not plan.smooth and not plan.router_bits and all(
        o is None or o.method == "rtn" for o in (plan.experts, plan.linears))


def _forward(layer: nn.Module, h: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    out = layer(h.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _topk(traces, i: int) -> torch.Tensor:
    return torch.cat(traces[i].index).sort(-1).values  # [T, K] chosen experts, as sets


@torch.no_grad()
def quantize_stream(stream: LayerStream, sink, plan: QuantPlan, n_base: int, n_reserve: int, probe: Sequence[int],
                    rotation: ResidualRotation | None = None, progress: Progress | None = None,
                    label: str = "quantizing", dist: Dist | None = None) -> QuantRun:
    """Quantize the model ``stream`` runs, layer by layer, into ``sink`` (`runtime.pack.PackedSink` or
    `FakeQuantSink`); see the module doc.

    The stream's batches are: ``n_base`` calibration batches, then ``n_reserve`` reserve batches (only experts
    short of tokens use them), then the ``probe`` batches (indices) whose routing is compared with the
    original model's. With ``rotation`` the stream must have computed its first-layer inputs with the rotated
    embedding (``embed_transform=rotation.embedding``). The caller opens the stream and closes the sink.

    ``dist`` (torchrun): each process collects statistics and runs GPTQ for its share of every MoE layer's
    experts; counts and maxima are summed and quantized experts gathered, so all processes run identical
    forwards (`runtime.dist`)."""
    progress = progress or NullProgress()
    dist = dist or Dist()
    arch, model = stream.arch, stream.model
    config = model.config
    moe = arch.moe_layer_indices(config)
    seq_len = stream.batches[0].shape[1]
    top_k, E = arch.routing(config, moe[0]).top_k, arch.num_experts(config)
    n_min = plan.balance_ratio * seq_len * top_k / E
    if plan.experts is not None and plan.experts.method == "gptq":  # fewer tokens than inputs: GPTQ fits noise
        n_min = max(n_min, plan.balance_per_input * arch.block(model, moe[0]).router_weight.shape[1])
    if rotation is not None:
        check_rotatable(stream.layers, arch)
    keep = stream.placement.offload and stream.device.type != "cpu"
    park = (lambda t: t.cpu()) if keep else (lambda t: t)
    # the probe windows through the original layers (with a rotation: its inverse gives the original inputs)
    ref = [park(stream.hidden[b].clone() if rotation is None else rotation.undo(stream.hidden[b])) for b in probe]
    probe_set = set(probe)
    out = QuantRun(ActQuantHandle(), min_tokens_per_expert=n_min, rotated_residual=rotation is not None)
    base, reserve = range(n_base), range(n_base, n_base + n_reserve)
    rtn_only = needs_no_statistics(plan)
    if rtn_only:  # the stream holds the probe windows only (`needs_no_statistics`): they find the linears
        if n_base or n_reserve:
            raise ValueError("a round-to-nearest plan streams the probe windows only")
        base = list(probe)
    balance = plan.balance and not rtn_only
    out.probe_only = rtn_only
    # sequential targets from the full-precision model: the calibration batches through the original layers too
    paired = plan.sequential and not rtn_only and not plan.smooth
    fp_hidden = [park(stream.hidden[b].clone()) for b in base] \
        if paired and plan.sequential_targets == "model" and rotation is None else None
    root = plan
    with progress.task(label, total=stream.num_layers) as bar:
        for i in range(stream.num_layers):
            plan = root.at(i)
            layer = stream.load(i)
            lv = [arch.block(model, i)] if i in moe else []
            attn_norm = getattr(layer, arch.pre_attn_norm, None)
            prefix = f"{arch.layers}.{i}"
            # 1. the original layer on the original probe stream: routing reference (and norm readers)
            readers_cm = norm_readers(layer, arch) if rotation is not None else contextlib.nullcontext()
            with capture_routing(model, arch, layers=[i]) as ref_traces, readers_cm as readers:
                ref_out = [_forward(layer, h, stream.kwargs[i][b], stream.device) for h, b in zip(ref, probe)]
            if rotation is not None:
                rotate_layer(layer, arch, lv[0] if lv else None, readers, rotation)
                with capture_routing(model, arch, layers=[i]) as rot_traces:
                    got = [_forward(layer, rotation.apply(h.to(stream.device)), stream.kwargs[i][b], stream.device)
                           for h, b in zip(ref, probe)]
                expected = torch.cat([rotation.apply(y).reshape(-1, y.shape[-1]) for y in ref_out])
                got = torch.cat([y.reshape(-1, y.shape[-1]) for y in got])
                change = check_layer(arch, i, expected, got, _topk(ref_traces, i) if lv else None,
                                     _topk(rot_traces, i) if lv else None)
                out.rotation_max_change = max(out.rotation_max_change, change)
                del got, expected
            ref = [park(y) for y in ref_out]
            del ref_out
            # 2. statistics
            owned = dist.experts(E) if dist.active else None
            # sequential: the full-precision inputs of every linear and of the experts, kept; from the original
            # model's stream ("model": the norm readers are paired in the statistics pass too), else this pass's
            fp_in = None
            dense = dense_linears(layer, lv) if paired else {}
            sources: dict[str, str | None] = {}
            if fp_hidden is not None:
                # after the last layer nothing reads the original stream: its experts' inputs are kept, their
                # outputs need not be computed
                last = _skip_experts(lv) if i == stream.num_layers - 1 else contextlib.nullcontext()
                with capture_inputs(layer, dense, lv[0].experts.module if lv else None, park) as fp_in, \
                        norm_sources(layer, lv, attn_norm, dense) as sources, last:
                    for j, b in enumerate(base):
                        fp_hidden[j] = park(_forward(layer, fp_hidden[j], stream.kwargs[i][b], stream.device))
            # the linears reading a norm all read the attention's: their statistics come from that norm alone
            # (no statistics pass), the experts' and router's from the attention output's pass
            early = fp_hidden is not None and plan.linears is not None and attn_norm is not None and \
                "attn_norm" in sources.values() and "moe_norm" not in sources.values()

            def capture(st):
                """The statistics pass's pairing ("model": only the norm readers, the others are paired in their own
                pass; `collect`'s hook runs first) or input capture ("layer")."""
                if fp_hidden is not None:
                    return pair_linears(dense, fp_in, want=lambda n: st.linears[n].source is not None)
                if paired:
                    return capture_inputs(layer, dense, lv[0].experts.module if lv else None, park)
                return contextlib.nullcontext()
            # with model targets the experts' routed Hessians come from the pairing passes (`_with_base`)
            from_pairs = fp_hidden is not None and plan.experts is not None and plan.experts.method == "gptq"

            def statistics(run, linears=True, replay_of=lambda got: None):
                """``run()`` under `collect` (the experts' statistics summed over processes), then the rare
                experts' top-ups (reserve batches, near-miss tokens: the base batches again, their attention
                output replayed where ``replay_of(run's result)`` recorded it)."""
                with collect(layer, lv, attn_norm, plan.near_miss, owned=owned, hessians=not rtn_only,
                             routed_hessians=not from_pairs, linears=linears) as stats, _skip_experts(lv):
                    got = run(stats)
                    if lv:
                        stats.experts.sum_over(dist, ("count", "gate_sum", "act_max", "h_max"))
                    if balance and lv and plan.experts is not None:  # top up rare experts: reserve, near-miss
                        stats.experts.short = set((stats.experts.count < n_min).nonzero().flatten().tolist())
                        if stats.experts.short and n_reserve:
                            stats.mode = "reserve"
                            stream.run_layer(i, store=False, batches=reserve)
                            stats.experts.sum_over(dist, ("res_count",))
                        if stats.experts.short and plan.near_miss:
                            stats.mode = "near"
                            with replaying(replay_of(got), stream.device):
                                stream.run_layer(i, store=False, batches=base)
                            stats.experts.sum_over(dist, ("near_count",))
                return stats, got

            def stats_pass(st):
                with capture(st) as got:
                    stream.run_layer(i, store=False, batches=base)
                return got

            record = QuantRecord()
            entry: dict[str, Any] = {}
            if early:  # the norm readers from the norm, quantized; the attention output's pass for the rest
                first = [n for n, src in sources.items() if src == "attn_norm"]
                first_stats, got0 = norm_reader_pairs(
                    attn_norm, ((stream.hidden[b], None if stream.token_weights is None else stream.token_weights(i, b))
                                for b in base), {n: fp_in[n] for n in first}, stream.device)
                entry["linears"] = quantize_linears(layer, LayerStats(linears=first_stats), plan.linears, record,
                                                    prefix, names=first, pairs=got0)
                inner = {n: m for n, m in dense.items() if n not in first}
                attn = set(first) if plan.act is None else set()

                def attention_pass(st):
                    with pair_linears(inner, fp_in) as got, record_output_replay(layer, inner, attn, park) as found:
                        stream.run_layer(i, store=False, batches=base)
                    return got, found[0]
                stats, (got, replay) = statistics(attention_pass, linears=False, replay_of=lambda got: got[1])
                stats.linears.update(first_stats)
                stats.linears.update({n: LinearStats(p[0], torch.zeros_like(p[0][0]), p[2]) for n, p in got.items()})
                entry["linears"].update(quantize_linears(layer, stats, plan.linears, record, prefix, names=inner,
                                                         pairs=got))
                got = got0 = None
            else:
                stats, got0 = statistics(stats_pass)
                fp_in = got0 if fp_in is None else fp_in
                replay = None  # the attention's output projection on its recorded inputs (`runtime.replay`)
            # 3. smoothing, linears, experts, router
            if plan.smooth:
                used = smooth_layer(layer, lv, stats, attn_norm, plan.smooth_alpha, plan.smooth_aggregate,
                                    plan.smooth_router, plan.smooth_attention, plan.smooth_down)
                for k, vec in used.items():
                    record.add_vector(f"{prefix}.smooth.{k}", vec)
                entry["smoothed"] = sorted(used)
            if early:
                pass  # done above
            elif plan.linears is not None and paired:  # first those reading a norm, then the others on their inputs
                first = [n for n, st in stats.linears.items() if st.source is not None]
                entry["linears"] = quantize_linears(layer, stats, plan.linears, record, prefix, names=first,
                                                    pairs=got0 if fp_hidden is not None else None)
                inner = {n: m for n, m in dense.items() if n in stats.linears and n not in first}
                # the attention is final once its output projection is: later passes replay that projection (not
                # with simulated activation quantization, installed before the output pass)
                attn = {n for n in first if stats.linears[n].source == "attn_norm"} if plan.act is None else set()
                with pair_linears(inner, fp_in) as got, _skip_experts(lv), \
                        record_output_replay(layer, inner, attn, park) as found:
                    stream.run_layer(i, store=False, batches=base)
                replay, found = found[0], None
                entry["linears"].update(quantize_linears(layer, stats, plan.linears, record, prefix, names=inner,
                                                         pairs=got))
                del got
            elif plan.linears is not None:
                entry["linears"] = quantize_linears(layer, stats, plan.linears, record, prefix)
            fp_experts = fp_in.pop("experts", None) if paired else None
            fp_in = got0 = None
            for v in lv:
                block = f"{prefix}.{arch.moe_block}"
                if plan.experts is not None:
                    q_inter = rotation_matrix(v.experts.stacked("down").shape[2], plan.rotation_seed) \
                        if plan.rotate_intermediate else None

                    gate_up_calls: list = []  # the gate/up pass's experts calls, replayed for the down projections

                    def pairs(which, gate, up, v=v, i=i, owned=owned, fp=fp_experts, calls=gate_up_calls):
                        """The calibration batches again (for the down projections: the gate/up pass's calls)."""
                        if which == "gate_up" and fp is None:
                            return None  # the gate/up inputs are the statistics pass's own
                        if which == "down" and calls:
                            with collect_pairs(v, which, gate, up, owned, fp, replay=calls) as got:
                                calls.clear()
                                return got
                        with collect_pairs(v, which, gate, up, owned, fp, keep=calls if which == "gate_up" else None) \
                                as got, _skip_experts([v]), replaying(replay, stream.device):
                            stream.run_layer(i, store=False, batches=base)
                        return got

                    entry["experts"] = quantize_experts(v, stats, plan.experts, record, f"{block}.{arch.experts}",
                                                        balance, n_min, plan.rare_experts, q_inter, dist,
                                                        pairs if plan.sequential and not rtn_only else None)
                if plan.router_bits:
                    entry["router"] = quantize_router(v, stats, plan.router_bits, plan.align_router, record,
                                                      f"{block}.{arch.router}", plan.align_objective)
            del stats, fp_experts
            for k, t in record.tensors.items():
                if ".experts:" in k and k.endswith(".codes"):
                    out.expert_codes += t.numel()
                    out.expert_code_ones += int((t == 1).sum())
            # 4. activation quantization, then every batch through the quantized layer
            handle = out.act_handle if stream.source.in_memory else ActQuantHandle()
            if plan.act is not None:
                install_layer_act_quant(layer, lv, plan.act, handle)
            calls = {"n": 0}
            quant_index: list[torch.Tensor] = []
            # through the last layer only the probe batches: nothing reads the others' outputs
            every = i < stream.num_layers - 1 or probe_set >= set(range(len(stream.hidden)))
            order = range(len(stream.hidden)) if every else sorted(probe_set)

            def on_route(layer_index, x, logits, index, weights, calls=calls, quant_index=quant_index, order=order):
                if order[calls["n"]] in probe_set:
                    quant_index.append(index.cpu())
                calls["n"] += 1

            with capture_routing(model, arch, layers=[i], on_route=on_route, store=False), \
                    replaying(replay if every else None, stream.device):
                stream.run_layer(i, batches=None if every else order)  # the calibration batches first: replayed
            replay = None
            if lv:
                if calls["n"] != len(order):
                    raise RuntimeError(f"layer {i}'s MoE block ran {calls['n']} times for {len(order)} batches")
                a = _topk(ref_traces, i)
                b = torch.cat(quant_index).sort(-1).values
                out.routing_agreement.append(float((a == b).all(-1).float().mean()))
            out.layers[str(i)] = entry
            # 5. write, free
            sink.layer(stream, i, record, lv)
            del record
            if handle is not out.act_handle:
                handle.remove()
            stream.release(i)
            bar.advance(1)
    if rotation is not None:
        stream.outside_state()  # the embedding, final norm and head, loaded
        out.untied_lm_head = rotate_outside(model, arch, rotation)
        sink.outside(stream, model.state_dict())
    else:
        sink.outside(stream)
    return out
