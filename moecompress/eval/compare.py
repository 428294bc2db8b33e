"""Side-by-side evaluation of a (compressed) model against its original on held-out windows, layer-streamed.

Per task: perplexity; against a baseline also the next-token KL(baseline || model), top-1 token
agreement, and per MoE layer the routing agreement: Jaccard similarity of the top-k expert sets
and top-1 expert agreement, in the *original* expert numbering (a pruned model's experts are mapped
back through the kept-expert lists in its ``moecompress.json``). Plus size (as ``inspect`` counts it),
parameter count, bits per parameter, peak memory and tokens/s.

Both models run through the layer-streaming executor (`runtime.executor.LayerStream`), one after the other,
on the same batches::

    baseline:  embeddings -> layer 0 .. L-1, one at a time (each MoE layer's routing kept: top-k ids and the
               top-1 slot per token, small integers) -> final hidden states of every batch kept
    candidate: embeddings -> layer 0 .. L-1 (each MoE layer's routing compared with the baseline's as the layer
               runs) -> final hidden states kept
    per batch: final norm + LM head of each model -> logits -> NLL, KL, token agreement

so at most one decoder layer (of one model), the final hidden states of both models (on the device, or in
host memory with ``offload``), both heads and one batch of logits per model are in memory. The numbers equal
a whole-model forward bit for bit in float32: the same modules run on the same inputs, and every sum is
accumulated in the same batch order.

A checkpoint runs as it was saved: packed (``quant_method: moecompress``) modules are built on the skeleton and
each packed tensor is checked against its recorded checksum as its layer loads; a fake-quantized checkpoint
whose ``moecompress.json`` records activation quantization has it simulated in every layer.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.formats.checkpoint import QUANT_METHOD, READABLE_VERSIONS
from moecompress.formats.inspect import storage_summary
from moecompress.formats.spec import module_specs
from moecompress.io.checkpoint import layer_of
from moecompress.io.model import LoadedModel, recorded_activations
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.executor import LayerStream, ModelSource, Placement
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.memory import memory_report, peak_rss_bytes

__all__ = ["as_source", "evaluate_models", "model_size"]

COMPRESSED = "(compressed in this run)"
OpenStream = Callable[..., LayerStream]  # (batches, source=..., **kw) -> LayerStream, as Context.stream


def as_source(model: LoadedModel | ModelSource) -> ModelSource:
    """A model held in memory as a (non-streamed) source; a source as it is."""
    if isinstance(model, ModelSource):
        return model
    return ModelSource(model.model.config, model.arch, model=model.model, tokenizer=model.tokenizer,
                       stored_dtype=model.disk_dtype, label=model.source, path=model.path)


def model_size(source: ModelSource | LoadedModel, modified: bool = False) -> dict[str, Any]:
    """Parameters, bytes and bits per parameter: for a directory, exactly as ``inspect`` counts them
    (`storage_summary`); for a model held in memory that this run changed (or that has no files), estimated
    from its tensors in the stored dtype (the pipeline replaces the estimate by the written files' figures)."""
    source = as_source(source)
    if source.directory is not None:
        return storage_summary(source.directory)
    if source.path is not None and not modified:
        return storage_summary(source.path)
    dtype = source.stored_dtype or torch.float32
    per = torch.empty(0, dtype=dtype).element_size()
    unique = {t.data_ptr(): t for t in source.model.state_dict().values()}  # tied weights are stored once
    params = sum(t.numel() for t in unique.values())
    size = params * per
    return {"params": params, "size_bytes": size, "bits_per_param": 8 * size / max(1, params),
            "expert_bits_per_weight": None, "size_source": f"estimated ({str(dtype).replace('torch.', '')})"}


# ---------------------------------------------------------------------------------------------- routing
def _agreement(idx: torch.Tensor, top1: torch.Tensor, bidx: torch.Tensor, btop1: torch.Tensor,
               mapping: Mapping[int, list[int]] | None, layer: int) -> tuple[float, float, int]:
    """Sums over tokens of top-k Jaccard and top-1 agreement for one layer: ``idx [T, K]`` and ``top1 [T]``
    (expert ids) of the model, mapped to the original numbering, against the baseline's."""
    idx, top1, bidx, btop1 = idx.long(), top1.long(), bidx.long(), btop1.long()
    if mapping is not None and layer in mapping:
        ids = torch.as_tensor(mapping[layer], device=idx.device)
        idx, top1 = ids[idx], ids[top1]
    E = int(max(idx.max(), bidx.max())) + 1
    a = torch.zeros(len(idx), E, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
    b = torch.zeros(len(bidx), E, dtype=torch.bool, device=bidx.device).scatter_(1, bidx, True)
    jac = ((a & b).sum(1).float() / (a | b).sum(1).float()).sum()
    return float(jac), float((top1 == btop1).sum()), len(idx)


def _routing_agreement(mine, base, mapping: Mapping[int, list[int]] | None, layer: int) -> tuple[float, float, int]:
    """`_agreement` from ``(index [T, K], weights [T, K])`` pairs (the top-1 expert is the heaviest slot)."""
    (idx, w), (bidx, bw) = mine, base
    return _agreement(idx, idx.gather(1, w.argmax(1, keepdim=True))[:, 0], bidx,
                      bidx.gather(1, bw.argmax(1, keepdim=True))[:, 0], mapping, layer)


def _compact(index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [T, K], top-1 id [T])`` on the host in the narrowest integer type that holds them."""
    top1 = index.gather(1, weights.argmax(1, keepdim=True))[:, 0]
    dtype = torch.int16 if int(index.max()) < 2 ** 15 else torch.int32
    return index.to("cpu", dtype), top1.to("cpu", dtype)


# ---------------------------------------------------------------------------------------------- checkpoints
class _AsSaved:
    """What a checkpoint directory needs beyond its weights to run as it was saved (a model already in memory
    was prepared by its loader): packed modules on the skeleton, each packed tensor checked against its
    recorded checksum as its layer loads; or the simulated activation quantization a fake-quantized checkpoint
    records (``activations``: the record of a checkpoint written in this run, whose ``moecompress.json`` is
    written at the end), installed per layer."""

    def __init__(self, source: ModelSource, activations: dict | None = None) -> None:
        self.source = source
        self.kwargs: dict[str, Any] = {}
        self.checksums: dict[str, str] = {}
        self.act = None
        if source.in_memory:
            return
        qc = getattr(source.config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
        if qc is not None and qc.get("quant_method") == QUANT_METHOD:
            if qc.get("format_version") not in READABLE_VERSIONS:
                raise MoecompressError(f"{self.where}: moecompress packed format version "
                                       f"{qc.get('format_version')!r} is not supported (this moecompress reads "
                                       f"versions {', '.join(map(str, READABLE_VERSIONS))})",
                                       "upgrade moecompress, or re-pack the model")
            self.kwargs = {"packed_modules": module_specs(qc["modules"]), "packed_activations": qc.get("activations")}
            self.checksums = dict(qc.get("checksums") or {})
            return
        if activations is None:
            activations = recorded_activations(source.directory)
        if activations:
            from moecompress.nn.act_quant import ActQuant

            self.act = ActQuant.from_record(activations)

    @property
    def where(self) -> str:
        return repr(str(self.source.path or self.source.directory or self.source.label))

    def _verify(self, stream: LayerStream, keys: Sequence[str]) -> None:
        from moecompress.nn.hf_quantizer import verify_packed

        try:
            verify_packed(stream.model, {k: self.checksums[k] for k in keys})
        except ValueError as e:
            raise MoecompressError(f"{self.where}: {e}", "the packed checkpoint is damaged: copy it again, or "
                                   "pack the model again from its original") from None

    def layer(self, stream: LayerStream, i: int):
        """Check layer ``i`` as loaded; returns the activation-quantization handle to remove after it ran."""
        if self.source.in_memory:
            return None
        self._verify(stream, [k for k in self.checksums if layer_of(k, stream.arch.layers) == i])
        layer = stream.layers[i]  # finite: checked as read (LayerStream)
        if self.act is None:
            return None
        from moecompress.nn.act_quant import ActQuantHandle, install_layer_act_quant

        handle = ActQuantHandle()
        moe = stream.arch.moe_layer_indices(stream.model.config)
        install_layer_act_quant(layer, [stream.arch.block(stream.model, i)] if i in moe else [], self.act, handle)
        return handle

    def head(self, stream: LayerStream) -> None:
        """Check what lies outside the decoder layers (final norm, head) once loaded."""
        if self.source.in_memory:
            return
        self._verify(stream, [k for k in self.checksums if layer_of(k, stream.arch.layers) is None])


# ---------------------------------------------------------------------------------------------- streaming
RouteFn = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (layer, batch, index [T, K], weights [T, K])


def _unique_bytes(tensors) -> int:
    seen: dict[Any, torch.Tensor] = {}
    for name, t in tensors:
        seen[name if t.is_meta else t.data_ptr()] = t  # tied weights count once
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.no_grad()
def _stream_model(open_stream: OpenStream, source: ModelSource, xs: list[torch.Tensor], on_route: RouteFn | None,
                  as_saved: _AsSaved, progress: Progress, who: str) -> tuple[LayerStream, int]:
    """Run ``xs`` through every decoder layer of ``source`` and load its head; returns the stream (final hidden
    states kept, layers released) and the bytes its weights take in memory (all layers counted)."""
    stream = open_stream(xs, source=source, **as_saved.kwargs)
    weight_bytes = 0
    try:
        arch, config = stream.arch, stream.model.config
        moe = set(arch.moe_layer_indices(config))
        with progress.task(f"evaluating {who}, layer by layer", total=stream.num_layers) as bar:
            for i, layer in stream.layers_in_order():
                handle = as_saved.layer(stream, i)
                try:
                    if on_route is not None and i in moe:
                        calls = itertools.count()

                        def route(li, x, logits, index, weights, calls=calls):
                            on_route(li, next(calls), index, weights)

                        with capture_routing(stream.model, arch, layers=[i], on_route=route, store=False):
                            stream.run_layer(i)
                    else:
                        stream.run_layer(i)
                finally:
                    if handle is not None:
                        handle.remove()
                prefix = f"{arch.layers}.{i}."
                weight_bytes += _unique_bytes((prefix + k, v) for k, v in layer.state_dict().items())
                bar.advance(1)
        stream.load_head()
        as_saved.head(stream)
        weight_bytes += _unique_bytes((k, v) for k, v in stream.model.state_dict().items()
                                      if layer_of(k, arch.layers) is None)
    except BaseException:
        stream.close()
        raise
    return stream, weight_bytes


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    windows_nll: list = field(default_factory=list)


def _default_stream(batches, source=None, **kw) -> LayerStream:
    return LayerStream(source, batches, Placement(), **kw)


@torch.no_grad()
def evaluate_models(
    candidate: ModelSource | LoadedModel,
    windows: Mapping[str, torch.Tensor],
    baseline: ModelSource | LoadedModel | None = None,
    kept_experts: Mapping[int, list[int]] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    candidate_modified: bool = False,
    open_stream: OpenStream | None = None,
    activations: dict | None = None,
) -> dict[str, Any]:
    """Evaluate ``candidate`` (and ``baseline``, on the same windows) per task; see the module docstring.

    ``open_stream(batches, source=...)`` makes the layer streams (default: on the CPU; a run passes
    ``Context.stream``, its device and dtype). ``activations``: the candidate's activation-quantization record
    when its directory has no ``moecompress.json`` yet. Returns the JSON-ready report: ``{"tasks": {task:
    {...}}, "size_bytes", "params", "bits_per_param", "peak_memory_bytes", "tokens_per_second", "baseline":
    {...}}``.
    """
    progress = progress or NullProgress()
    open_stream = open_stream or _default_stream
    candidate = as_source(candidate)
    baseline = as_source(baseline) if baseline is not None else None
    arch, config = candidate.arch, candidate.config
    layers = arch.moe_layer_indices(config)
    if baseline is not None and getattr(baseline.config, "vocab_size", None) != getattr(config, "vocab_size", None):
        raise MoecompressError(f"{baseline.label!r} has another vocabulary than {candidate.label!r} "
                               f"({baseline.config.vocab_size} vs {config.vocab_size} tokens)",
                               "compare with the model this one was made from (--baseline)")
    same_experts = baseline is not None and baseline.arch.moe_layer_indices(baseline.config) == layers and (
        kept_experts is not None or arch.num_experts(config) == baseline.arch.num_experts(baseline.config))
    batches = [(task, w[i:i + batch_size]) for task, w in windows.items() for i in range(0, len(w), batch_size)]
    xs = [x for _, x in batches]
    jac = {t: torch.zeros(len(layers)) for t in windows}
    top1 = {t: torch.zeros(len(layers)) for t in windows}
    streams: list[LayerStream] = []
    try:
        bstream = None
        if baseline is not None:
            kept_routes: dict[int, list] = {layer: [] for layer in layers}

            def keep(layer: int, b: int, index: torch.Tensor, weights: torch.Tensor) -> None:
                kept_routes[layer].append(_compact(index, weights))

            bstream, _ = _stream_model(open_stream, baseline, xs, keep if same_experts else None,
                                       _AsSaved(baseline), progress, "the baseline")
            streams.append(bstream)

            def compare(layer: int, b: int, index: torch.Tensor, weights: torch.Tensor) -> None:
                bidx, btop1 = kept_routes[layer][b]
                kept_routes[layer][b] = None  # compared: free it
                idx, t1 = _compact(index, weights)
                a, c, _ = _agreement(idx, t1, bidx, btop1, kept_experts, layer)
                j = layers.index(layer)
                jac[batches[b][0]][j] += a
                top1[batches[b][0]][j] += c

        t0 = time.perf_counter()
        stream, weight_bytes = _stream_model(open_stream, candidate, xs, compare if same_experts else None,
                                             _AsSaved(candidate, activations), progress, "the model")
        streams.append(stream)
        seconds = time.perf_counter() - t0
        accs = {t: _Acc() for t in windows}
        baccs = {t: _Acc() for t in windows}
        with progress.task("scoring", total=sum(len(w) for w in windows.values())) as bar:
            for b, (task, x) in enumerate(batches):
                acc, bacc = accs[task], baccs[task]
                t0 = time.perf_counter()
                logits = stream.logits(b)[:, :-1].float()  # [B, S-1, V]
                seconds += time.perf_counter() - t0
                y = x[:, 1:, None].to(logits.device)
                logp = logits.log_softmax(-1)
                del logits
                nll = -logp.gather(-1, y)[..., 0]  # [B, S-1]
                acc.nll += float(nll.sum())
                acc.windows_nll += nll.mean(1).tolist()
                acc.tokens += nll.numel()
                if bstream is not None:
                    blogp = bstream.logits(b)[:, :-1].float().log_softmax(-1)
                    bnll = -blogp.gather(-1, y)[..., 0]
                    bacc.nll += float(bnll.sum())
                    bacc.windows_nll += bnll.mean(1).tolist()
                    acc.kl += float((blogp.exp() * (blogp - logp)).sum())
                    acc.agree += int((blogp.argmax(-1) == logp.argmax(-1)).sum())
                    del blogp
                del logp
                bar.advance(len(x))
        device, dtype = stream.device, stream.dtype
    finally:
        for s in streams:
            s.close()
    n_tokens = sum(x.numel() for x in xs)
    tasks_out: dict[str, Any] = {}
    base_tasks: dict[str, Any] = {}
    for task, w in windows.items():
        acc, bacc = accs[task], baccs[task]
        for who, value in ((candidate.label, acc.nll), (baseline.label if baseline else "", bacc.nll)):
            if not math.isfinite(value):
                raise MoecompressError(f"the log-likelihood of {who} on {task!r} is not finite (its outputs hold "
                                       "NaN or infinite values)", "check the model's weights; no report was written")
        entry: dict[str, Any] = {"windows": len(w), "tokens": acc.tokens, "nll": acc.nll / acc.tokens,
                                 "ppl": float(torch.exp(torch.tensor(acc.nll / acc.tokens)))}
        if baseline is not None:
            b_nll = bacc.nll / acc.tokens
            base_tasks[task] = {"nll": b_nll, "ppl": float(torch.exp(torch.tensor(b_nll)))}
            diff = torch.tensor(acc.windows_nll) - torch.tensor(bacc.windows_nll)
            half = 1.96 * float(diff.std()) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            routed = int(w.numel()) if same_experts else 0
            entry.update({
                "ppl_ratio": entry["ppl"] / base_tasks[task]["ppl"],
                "nll_diff_ci95": [float(diff.mean()) - half, float(diff.mean()) + half],
                "kl": acc.kl / acc.tokens,
                "top1_agreement": acc.agree / acc.tokens,
                "routing_agreement": [float(v) for v in jac[task] / routed] if routed else None,
                "routing_top1_agreement": [float(v) for v in top1[task] / routed] if routed else None,
            })
        tasks_out[task] = entry
    label = candidate.label
    if candidate_modified and COMPRESSED not in label:
        label = f"{label} {COMPRESSED}"
    streamed = not candidate.in_memory
    report: dict[str, Any] = {
        "model": label, "tasks": tasks_out, **model_size(candidate, candidate_modified),
        "memory_weights_bytes": weight_bytes,
        "peak_memory_bytes": peak_rss_bytes(),
        "peak_memory_note": "peak resident memory of the whole process" + (
            " (the models are streamed one decoder layer at a time)" if streamed else " (both models)"),
        "tokens_per_second": n_tokens / max(seconds, 1e-9),
        "tokens_per_second_note": "streamed forward of the model, one decoder layer at a time, disk reads "
                                  "included" if streamed else "forward of the model held in memory",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "moe_layers": layers,
    }
    if device.type == "cuda":
        report["peak_gpu_bytes"] = memory_report()["peak_gpu_bytes"]
    if baseline is not None:
        report["baseline"] = {"model": baseline.label, "tasks": base_tasks, **model_size(baseline)}
        if not same_experts:
            report["routing_note"] = ("routing agreement needs the same expert numbering: the model has fewer "
                                      "experts and no kept-expert map (moecompress.json)")
    return report
