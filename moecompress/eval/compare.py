"""Side-by-side evaluation of a (compressed) model against its original on held-out windows.

Per task: perplexity; against a baseline also the next-token KL(baseline || model), top-1 token
agreement, and per MoE layer the routing agreement: Jaccard similarity of the top-k expert sets
and top-1 expert agreement, in the *original* expert numbering (a pruned model's experts are mapped
back through the kept-expert lists in its ``moecompress.json``). Plus size on disk, parameter count,
bits per parameter, peak memory and tokens/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moecompress.errors import MoecompressError
from moecompress.formats.inspect import storage_summary
from moecompress.progress import NullProgress, Progress
from moecompress.runtime.hooks import capture_routing
from moecompress.runtime.memory import peak_rss_bytes
from moecompress.runtime.modelio import LoadedModel

__all__ = ["evaluate_models", "model_size"]


def model_size(loaded: LoadedModel, modified: bool = False) -> dict[str, Any]:
    """Parameters, bytes and bits per parameter: for a directory as it is on disk, exactly as ``inspect``
    counts them (`storage_summary`); for a model changed in memory (or with no files), estimated from its tensors
    in the disk dtype (the pipeline replaces the estimate by the written files' figures)."""
    if loaded.path is not None and not modified:
        return storage_summary(loaded.path)
    per = torch.empty(0, dtype=loaded.disk_dtype).element_size()
    unique = {t.data_ptr(): t for t in loaded.model.state_dict().values()}  # tied weights are stored once
    params = sum(t.numel() for t in unique.values())
    size = params * per
    return {"params": params, "size_bytes": size, "bits_per_param": 8 * size / max(1, params),
            "size_source": f"estimated ({str(loaded.disk_dtype).replace('torch.', '')})"}


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    windows_nll: list | None = None


def _routing_agreement(mine, base, mapping: Mapping[int, list[int]] | None, layer: int) -> tuple[float, float, int]:
    """Sums over tokens of top-k Jaccard and top-1 agreement for one layer (ids mapped to the original)."""
    (idx, w), (bidx, bw) = mine, base
    if mapping is not None and layer in mapping:
        idx = torch.as_tensor(mapping[layer])[idx]
    E = int(max(idx.max(), bidx.max())) + 1
    a = torch.zeros(len(idx), E, dtype=torch.bool).scatter_(1, idx, True)
    b = torch.zeros(len(bidx), E, dtype=torch.bool).scatter_(1, bidx, True)
    jac = ((a & b).sum(1).float() / (a | b).sum(1).float()).sum()
    top1 = (idx.gather(1, w.argmax(1, keepdim=True)) == bidx.gather(1, bw.argmax(1, keepdim=True))).sum()
    return float(jac), float(top1), len(idx)


@torch.no_grad()
def evaluate_models(
    candidate: LoadedModel,
    windows: Mapping[str, torch.Tensor],
    baseline: LoadedModel | None = None,
    kept_experts: Mapping[int, list[int]] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    candidate_modified: bool = False,
) -> dict[str, Any]:
    """Evaluate ``candidate`` (and ``baseline``, on the same windows) per task; see the module docstring.

    Returns the JSON-ready report: ``{"tasks": {task: {...}}, "size_bytes", "params", "bits_per_param",
    "peak_memory_bytes", "tokens_per_second", "baseline": {...}}``.
    """
    progress = progress or NullProgress()
    model, arch = candidate.model, candidate.arch
    layers = arch.moe_layer_indices(model.config)
    same_experts = baseline is not None and (
        kept_experts is not None or arch.num_experts(model.config) == baseline.arch.num_experts(baseline.model.config))
    tasks_out: dict[str, Any] = {}
    base_tasks: dict[str, Any] = {}
    seconds = 0.0
    n_tokens = 0
    total = sum(len(w) for w in windows.values())
    with progress.task("evaluating", total=total) as bar:
        for task, w in windows.items():
            acc, bacc = _Acc(windows_nll=[]), _Acc(windows_nll=[])
            jac = torch.zeros(len(layers))
            top1 = torch.zeros(len(layers))
            routed = 0
            for i in range(0, len(w), batch_size):
                x = w[i:i + batch_size]
                t0 = time.time()
                with capture_routing(model, arch) as traces:
                    logits = model(input_ids=x).logits[:, :-1].float()  # [B, S-1, V]
                seconds += time.time() - t0
                n_tokens += x.numel()
                logp = logits.log_softmax(-1)
                nll = -logp.gather(-1, x[:, 1:, None])[..., 0]  # [B, S-1]
                acc.nll += float(nll.sum())
                acc.windows_nll += nll.mean(1).tolist()
                acc.tokens += nll.numel()
                if baseline is not None:
                    with capture_routing(baseline.model, baseline.arch) as btraces:
                        blogp = baseline.model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
                    bnll = -blogp.gather(-1, x[:, 1:, None])[..., 0]
                    bacc.nll += float(bnll.sum())
                    bacc.windows_nll += bnll.mean(1).tolist()
                    acc.kl += float((blogp.exp() * (blogp - logp)).sum())
                    acc.agree += int((blogp.argmax(-1) == logp.argmax(-1)).sum())
                    if same_experts:
                        for j, layer in enumerate(layers):
                            _, idx, wts = traces[layer].cat()
                            _, bidx, bwts = btraces[layer].cat()
                            a, b, n = _routing_agreement((idx, wts), (bidx, bwts), kept_experts, layer)
                            jac[j] += a
                            top1[j] += b
                        routed += idx.shape[0]
                bar.advance(len(x))
            for who, value in ((candidate.source, acc.nll), (baseline.source if baseline else "", bacc.nll)):
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
                entry.update({
                    "ppl_ratio": entry["ppl"] / base_tasks[task]["ppl"],
                    "nll_diff_ci95": [float(diff.mean()) - half, float(diff.mean()) + half],
                    "kl": acc.kl / acc.tokens,
                    "top1_agreement": acc.agree / acc.tokens,
                    "routing_agreement": [float(v) for v in jac / routed] if routed else None,
                    "routing_top1_agreement": [float(v) for v in top1 / routed] if routed else None,
                })
            tasks_out[task] = entry
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights count once
    weights = sum(t.numel() * t.element_size() for t in unique.values())
    label = f"{candidate.source} (compressed in this run)" if candidate_modified else candidate.source
    report: dict[str, Any] = {"model": label, "tasks": tasks_out, **model_size(candidate, candidate_modified),
                              "memory_weights_bytes": weights, "peak_memory_bytes": peak_rss_bytes(),
                              "peak_memory_note": "peak resident memory of the whole process (both models)",
                              "tokens_per_second": n_tokens / max(seconds, 1e-9), "moe_layers": layers}
    if baseline is not None:
        report["baseline"] = {"model": baseline.source, "tasks": base_tasks, **model_size(baseline)}
        if not same_experts:
            report["routing_note"] = ("routing agreement needs the same expert numbering: the model has fewer "
                                      "experts and no kept-expert map (moecompress.json)")
    return report
