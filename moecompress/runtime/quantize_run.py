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
from typing import Any

import torch

from moecompress.formats.quant_record import QuantRecord
from moecompress.nn.act_quant import ActQuantHandle, install_layer_act_quant, rotation_matrix
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.calibration import LayerStats, LinearStats, collect, dense_linears, norm_sources
from moecompress.runtime.dist import Dist
from moecompress.runtime.executor import LayerStream
from moecompress.runtime.paired import capture_inputs, collect_pairs, norm_reader_pairs, pair_linears
from moecompress.runtime.quant_plan import QuantPlan, QuantRun, needs_no_statistics
from moecompress.runtime.replay import record_output_replay, replaying
from moecompress.runtime.layer_passes import (
    expert_prior,
    forward_layer,
    output_pass,
    prior_readers,
    reference_pass,
    skip_experts,
    vocab_prior,
)
from moecompress.runtime.expert_quant import chunk_size, quantize_experts
from moecompress.runtime.layer_quant import quantize_linears
from moecompress.runtime.layer_smooth import quantize_router, smooth_layer
from moecompress.runtime.rotate import ResidualRotation, check_rotatable, rotate_outside

__all__ = ["quantize_stream"]


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
            vocab = vocab_prior(stream, i, plan, attn_norm)
            # 1. the original layer on the original probe stream: routing reference (and norm readers)
            ref_traces, ref = reference_pass(stream, i, layer, lv, ref, probe, rotation, out, park)
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
                last = skip_experts(lv) if i == stream.num_layers - 1 else contextlib.nullcontext()
                with capture_inputs(layer, dense, lv[0].experts.module if lv else None, park) as fp_in, \
                        norm_sources(layer, lv, attn_norm, dense) as sources, last:
                    for j, b in enumerate(base):
                        fp_hidden[j] = park(forward_layer(layer, fp_hidden[j], stream.kwargs[i][b], stream.device))
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
            gptq = plan.experts is not None and plan.experts.method == "gptq"
            from_pairs = fp_hidden is not None and gptq
            # the experts a chunk at a time (`expert_quant.chunk_size`); plain GPTQ's routed Hessians then come from
            # the statistics pass's calls, a chunk at a time, unless every expert fits at once
            n_own = len(owned) if owned is not None else E
            chunk = chunk_size(lv[0], plan.expert_chunk, n_own, dist, from_pairs, plan.sequential and not rtn_only) \
                if lv and gptq else 0
            lazy = from_pairs or (gptq and not plan.smooth and chunk < n_own)

            def statistics(run, linears=True, replay_of=lambda got: None):
                """``run()`` under `collect` (the experts' statistics summed over processes), then the rare
                experts' top-ups (reserve batches, near-miss tokens: the base batches again, their attention
                output replayed where ``replay_of(run's result)`` recorded it)."""
                with collect(layer, lv, attn_norm, plan.near_miss, owned=owned, hessians=not rtn_only,
                             routed_hessians=not lazy, linears=linears, keep_calls=not from_pairs) as stats, \
                        skip_experts(lv):
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
                                                    prefix, names=first, pairs=got0, prior=prior_readers(vocab, first_stats))
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
                                                    pairs=got0 if fp_hidden is not None else None,
                                                    prior=prior_readers(vocab, stats.linears))
                inner = {n: m for n, m in dense.items() if n in stats.linears and n not in first}
                # the attention is final once its output projection is: later passes replay that projection (not
                # with simulated activation quantization, installed before the output pass)
                attn = {n for n in first if stats.linears[n].source == "attn_norm"} if plan.act is None else set()
                with pair_linears(inner, fp_in) as got, skip_experts(lv), \
                        record_output_replay(layer, inner, attn, park) as found:
                    stream.run_layer(i, store=False, batches=base)
                replay, found = found[0], None
                entry["linears"].update(quantize_linears(layer, stats, plan.linears, record, prefix, names=inner,
                                                         pairs=got))
                del got
            elif plan.linears is not None:
                entry["linears"] = quantize_linears(layer, stats, plan.linears, record, prefix,
                                                    prior=prior_readers(vocab, stats.linears))
            fp_experts = fp_in.pop("experts", None) if paired else None
            fp_in = got0 = None
            for v in lv:  # the routed experts, then the router
                prior = expert_prior(stream, i, layer, v, plan)  # layer 0's experts: the vocabulary's inputs
                entry.update(_experts_and_router(stream, i, v, plan, stats, record, f"{prefix}.{arch.moe_block}",
                                                 balance, n_min, chunk, dist, base, fp_experts, replay,
                                                 plan.sequential and not rtn_only, prior))
                prior = None
            del stats, fp_experts
            stream.drop_vocab()  # layer 0's alone: not held through the other layers
            for k, t in record.tensors.items():
                if ".experts:" in k and k.endswith(".codes"):
                    out.expert_codes += t.numel()
                    out.expert_code_ones += int((t == 1).sum())
            # 4. activation quantization, then every batch through the quantized layer
            handle = out.act_handle if stream.source.in_memory else ActQuantHandle()
            if plan.act is not None:
                install_layer_act_quant(layer, lv, plan.act, handle)
            agreement = output_pass(stream, i, bool(lv), probe_set, replay, ref_traces)
            replay = None
            if agreement is not None:
                out.routing_agreement.append(agreement)
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


def _experts_and_router(stream: LayerStream, i: int, v, plan: QuantPlan, stats: LayerStats, record: QuantRecord,
                        block: str, balance: bool, n_min: float, chunk: int, dist: Dist, base: Sequence[int],
                        fp: list | None, replay, sequential: bool, prior: tuple | None) -> dict[str, Any]:
    """Step 3's MoE block ``v`` of layer ``i``: its routed experts (with ``sequential``, each projection paired
    over the calibration batches ``base`` again: the gate/up pass's experts calls replayed for the down
    projections; ``fp``: the experts' full-precision inputs per call; ``prior``: `layer_passes.expert_prior`'s;
    ``chunk`` experts at a time, 0: all), then its router; their record entries."""
    arch, entry = stream.arch, {}
    if plan.experts is not None:
        q_inter = rotation_matrix(v.experts.stacked("down").shape[2], plan.rotation_seed) \
            if plan.rotate_intermediate else None
        calls: list = []  # the first pass's experts calls, replayed for the later pairings

        def pairs(which, gate, up, experts, last):
            """The calibration batches again for the chunk ``experts``; once a pass has run, its experts' calls
            replayed (the attention, hence the experts' inputs and routing, no longer change)."""
            if which == "gate_up" and fp is None:
                return None  # the gate/up inputs are the statistics pass's own
            if calls:
                with collect_pairs(v, which, gate, up, experts, fp, replay=calls) as got:
                    if which == "down" and last:
                        calls.clear()
                    return got
            keep = calls if which == "gate_up" or not last else None  # later chunks replay them
            with collect_pairs(v, which, gate, up, experts, fp, keep=keep) as got, skip_experts([v]), \
                    replaying(replay, stream.device):
                stream.run_layer(i, store=False, batches=base)
            return got

        entry["experts"] = quantize_experts(v, stats, plan.experts, record, f"{block}.{arch.experts}", balance, n_min,
                                            plan.rare_experts, q_inter, dist, pairs if sequential else None, prior,
                                            chunk)
    if plan.router_bits:
        entry["router"] = quantize_router(v, stats, plan.router_bits, plan.align_router, record,
                                          f"{block}.{arch.router}", plan.align_objective)
    return entry
