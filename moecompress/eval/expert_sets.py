"""Next-token loss of several candidate expert sets in ONE streamed pass (``prune --score auto``).

Each candidate is a keep plan ``{MoE layer: kept expert ids}``. Per decoder layer ``i`` (read once):

    for every candidate c:  h_c <- layer_i pruned to c's experts (h_c)     a copy of the layer, cut by the
                                                                            adapters' surgery, then dropped
    h_ref <- layer_i (h_ref)                                                the unpruned model, for reference

then the final norm and LM head turn every ``h_c`` into per-window next-token NLL. The pruned layer is the
very layer ``prune`` writes (router rows sliced, softmax or sigmoid over the kept experts, group routing kept),
so each candidate's loss is exactly the loss of the model that candidate would produce.

With ``layerwise`` a further model is built as it goes: at each pruned layer, every distinct candidate set runs
on that model's hidden states and the one whose outputs come closest to the unpruned model's (mean relative
squared error per token) is kept for it, so the layers may follow different scores.

Cost: one read of the model, ``C + 1`` forwards per layer (``2C + 2`` with ``layerwise``), one extra layer copy
at a time, and ``C + 1`` sets of hidden states of the held-out windows (``C + 3`` with ``layerwise``; host memory
with ``--offload-hidden``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from moecompress.models.base import MoEBlockView
from moecompress.models.surgery import keep_layer, set_expert_count
from moecompress.progress import ProgressTask

__all__ = ["LAYERWISE", "UNPRUNED", "expert_set_losses"]

UNPRUNED = "unpruned"
LAYERWISE = "layerwise"  # each layer pruned to the candidate set closest to the unpruned model there


@torch.no_grad()
def expert_set_losses(stream, sets: Mapping[str, Mapping[int, Sequence[int]]], regroup: bool = False,
                      bar: ProgressTask | None = None, layerwise: dict[int, dict[str, Any]] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Per-window mean next-token NLL ``[N]`` (N = windows over ``stream.batches``, in order) of the model pruned
    to each of ``sets`` and, under `UNPRUNED`, of the model as it is. ``stream`` must not have run a layer yet;
    ``bar`` advances once per decoder layer.

    With ``layerwise`` (an empty dict, filled): also the model pruned layer by layer to whichever candidate's
    experts bring that layer's outputs closest to the unpruned model's (`LAYERWISE`, see `_closest`): its NLL
    under `LAYERWISE`, and per pruned layer ``layerwise[i] = {"chosen": name, "error": {name: error}}``."""
    if UNPRUNED in sets or LAYERWISE in sets:
        raise ValueError(f"{UNPRUNED!r} and {LAYERWISE!r} are not candidate names")
    if stream.next_layer != 0:
        raise RuntimeError("the stream has already run some layers")
    arch = stream.arch
    hidden = {name: list(stream.hidden) for name in sets}
    mixed = list(stream.hidden) if layerwise is not None else None
    for i in range(stream.num_layers):
        layer = stream.load(i)
        stream.run_layer(i)  # the unpruned model: its outputs are what the layerwise choice compares with
        errors: dict[str, float] = {}  # distinct sets at this layer, tried on the layerwise stream
        tried: set[tuple] = set()
        best: tuple[str, float, list[torch.Tensor]] | None = None
        for name, plan in sets.items():
            if i in plan:
                pruned = _pruned_copy(arch, stream.model.config, i, layer, plan[i], regroup)
                _run(stream, pruned, i, hidden[name])
                if mixed is not None and tuple(plan[i]) not in tried:
                    tried.add(tuple(plan[i]))
                    out = list(mixed)
                    _run(stream, pruned, i, out)
                    errors[name] = _closest(out, stream.hidden)
                    if best is None or errors[name] < best[1]:  # the first listed among equals
                        best = (name, errors[name], out)
                    del out
                del pruned
            else:
                _run(stream, layer, i, hidden[name])
        if mixed is not None:
            if best is not None:
                layerwise[i] = {"chosen": best[0], "error": errors}
                mixed = best[2]
            else:
                _run(stream, layer, i, mixed)
            best = None
        stream.release(i)
        if bar is not None:
            bar.advance(1)
    stream.load_head()
    out = {name: _nll(stream, h) for name, h in hidden.items()}
    if mixed is not None:
        out[LAYERWISE] = _nll(stream, mixed)
    out[UNPRUNED] = _nll(stream, stream.hidden)
    return out


def _closest(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Mean over tokens of ``|got - want|^2 / |want|^2`` (each token's relative error, so the few tokens with huge
    hidden states do not decide alone)."""
    total, n = 0.0, 0
    for a, b in zip(got, want):
        a, b = a.float(), b.to(a.device).float()
        total += float(((a - b).square().sum(-1) / b.square().sum(-1).clamp(min=1e-12)).sum())
        n += a.shape[0] * a.shape[1]
    return total / max(n, 1)


def _pruned_copy(arch, config, i: int, layer: torch.nn.Module, ids: Sequence[int], regroup: bool) -> torch.nn.Module:
    """A copy of decoder layer ``i`` keeping routed experts ``ids`` (the surgery ``prune`` applies)."""
    pruned = copy.deepcopy(layer)
    view = MoEBlockView(arch, config, i, pruned)
    old = view.num_experts
    keep_layer(view, ids, regroup)
    for m in pruned.modules():  # modules that read counts from a config hold their own copy now
        if isinstance(getattr(m, "config", None), PretrainedConfig) and arch.num_experts(m.config) == old:
            set_expert_count(m.config, arch, len(ids), regroup)
    return pruned


def _run(stream, layer: torch.nn.Module, i: int, hidden: list[torch.Tensor]) -> None:
    """``layer`` (decoder layer ``i`` or a pruned copy) on each batch's hidden states, replaced by its outputs."""
    for b in range(len(hidden)):
        out = layer(hidden[b].to(stream.device), **stream.kwargs[i][b])
        out = out[0] if isinstance(out, tuple) else out
        hidden[b] = out.cpu() if stream.placement.offload else out


def _nll(stream, hidden: list[torch.Tensor]) -> torch.Tensor:
    """``[N]`` mean NLL of tokens 2..S of each window (as ``eval.perplexity.score_windows`` counts them)."""
    out = []
    for b, h in enumerate(hidden):
        x = stream.batches[b].to(stream.device)
        logits = stream.logits_of(h)[:, :-1].float()  # [B, S-1, V]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none").view(len(x), -1)
        out.append(nll.mean(1).cpu())
    return torch.cat(out)
