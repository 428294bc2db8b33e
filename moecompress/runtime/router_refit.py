"""Layer-wise router recalibration after expert pruning, one decoder layer at a time.

For every pruned MoE layer ``i`` (in order, so its inputs come from the already pruned and recalibrated layers
before it, as GPTQ propagates its error), with the layer's unpruned weights loaded:

    X_i  = the MoE block's inputs on the calibration batches (through the pruned model so far)
    Y_i  = the ORIGINAL block (every expert) on X_i
    cut  = the surgery (keep the chosen experts, router rows sliced)
    min over the kept router's weight (and bias, if the family has one) of
        L(W) = sum_t || block_pruned(X_i[t]; W) - Y_i[t] ||^2 / sum_t || Y_i[t] ||^2
    with Adam (full batch: every calibration token at every step, gradients accumulated over the batches, so the
    result is deterministic and needs no seed), keeping the best of the ``steps + 1`` iterates (step 0 is the
    sliced router, so the error never grows); experts, attention and norms stay frozen.

The gradient reaches the router through the top-k gate weights the experts' outputs are scaled by (the top-k
choice itself is piecewise constant), exactly as in router distillation.

Why this objective: it needs one layer and its inputs only, so it streams (peak memory one layer plus the hidden
states). It replaces router KD (after "Router KD", arXiv:2603.02217), which trained every router at once toward the
original model's next-token distribution with a whole-model forward/backward, which cannot stream. The two differ:
the local objective asks each pruned block to reproduce its unpruned output given its (already shifted) inputs; it
does not see how errors compound through later layers, nor weigh them by their effect on the next token. So the
end-to-end next-token KL against the unpruned model is measured as well, before and after, on the same
calibration windows: three hidden-state streams run through the layers (the unpruned model, the pruned model
with its sliced routers, the pruned model with the recalibrated routers), costing two extra forward passes per
layer and two extra sets of hidden states.

Routers are optimised in float32 (a float32 master copy when the layer computes in bf16/fp16), then rounded to
the dtype they are written in, so the reported numbers are those of the written model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moecompress.models.base import MoEArch
from moecompress.progress import ProgressTask

__all__ = ["RouterRefit"]


class RouterRefit:
    """The per-layer work of router recalibration around ``apply_keep``'s surgery (``stages.keep_experts``)."""

    def __init__(self, arch: MoEArch, batches: list[torch.Tensor], steps: int, lr: float,
                 bar: ProgressTask | None = None) -> None:
        """``steps`` / ``lr``: Adam steps per pruned MoE layer and its learning rate (the prune stage's
        ``recalibrate_steps`` / ``recalibrate_lr``); ``bar``: advanced once per optimisation step."""
        self.arch, self.batches, self.steps, self.lr = arch, list(batches), steps, lr
        self.bar = bar
        self.teacher: list[torch.Tensor] | None = None  # hidden states of the unpruned model
        self.plain: list[torch.Tensor] | None = None  # of the pruned model with its sliced routers
        self.layers: list[dict[str, Any]] = []
        self.kl: dict[str, float] = {}

    # ------------------------------------------------------------------ the work per layer
    def layer(self, stream, i: int, cut: Callable[[], None] | None) -> None:
        if self.teacher is None:
            self.teacher = list(stream.hidden)
            self.plain = list(stream.hidden)
        layer = stream.load(i)
        if cut is None:
            _run(stream, i, self.teacher)
            _run(stream, i, self.plain)
            stream.run_layer(i)
            return
        view = self.arch.block(stream.model, i)
        xs, ys = _block_io(stream, i, view.block)  # through the original block, on the pruned model's inputs
        _run(stream, i, self.teacher)
        cut()
        view = self.arch.block(stream.model, i)
        _run(stream, i, self.plain)
        params = _router_params(view)
        report = _fit(view, [p for _, p in params], xs, ys, self.steps, self.lr, self.bar)
        for name, p in params:  # what the sink writes
            p.data = p.data.to(_written_dtype(stream, f"{self.arch.layers}.{i}.{name}", p)).to(p.dtype)
        with torch.no_grad():
            report["error_after"] = _error(view, xs, ys)
        self.layers.append({"layer": i, **report})
        del xs, ys
        stream.run_layer(i)
        del layer

    def end(self, stream) -> None:
        if self.teacher is None:
            return
        stream.load_head()
        kl = {"before": 0.0, "after": 0.0}
        count = 0
        with torch.no_grad():
            for b in range(len(self.batches)):
                logp = _logprobs(stream, self.teacher[b])
                for key, hidden in (("before", self.plain[b]), ("after", stream.hidden[b])):
                    logq = _logprobs(stream, hidden)
                    kl[key] += float((logp.exp() * (logp - logq)).sum(-1).sum())
                count += logp.shape[0] * logp.shape[1]
        self.kl = {k: v / max(count, 1) for k, v in kl.items()}
        self.teacher = self.plain = None

    def report(self) -> dict[str, Any]:
        return {
            "objective": "per MoE layer, sum ||block_pruned(X) - block_original(X)||^2 / sum ||block_original(X)||^2 "
                         "over the calibration tokens (X: the block's inputs in the pruned model); only router "
                         "weights/biases trained; full-batch Adam, best step kept",
            "steps": self.steps, "lr": self.lr,
            "layers": self.layers,
            "kl_before": self.kl.get("before"), "kl_after": self.kl.get("after"),
            "kl_note": "end-to-end next-token KL(unpruned || pruned) per token on the calibration windows, "
                       "with the sliced routers (before) and the recalibrated ones (after)",
        }


# ---------------------------------------------------------------------- helpers
def _run(stream, i: int, hidden: list[torch.Tensor]) -> None:
    """Run layer ``i`` on another set of hidden states (replaced by the outputs), as ``stream.run_layer`` does."""
    layer = stream.layers[i]
    with torch.no_grad():
        for b in range(len(hidden)):
            out = layer(hidden[b].to(stream.device), **stream.kwargs[i][b])
            out = out[0] if isinstance(out, tuple) else out
            hidden[b] = out.cpu() if stream.placement.offload else out


def _block_io(stream, i: int, block: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The MoE block's inputs and outputs per batch while layer ``i`` runs on the stream's hidden states."""
    xs, ys = [], []

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        keep = (lambda t: t.detach().cpu()) if stream.placement.offload else (lambda t: t.detach())
        xs.append(keep(x))
        ys.append(keep(y))

    h = block.register_forward_hook(hook, with_kwargs=True)
    try:
        stream.run_layer(i, store=False)
    finally:
        h.remove()
    return xs, ys


def _router_params(view) -> list[tuple[str, nn.Parameter]]:
    """The router's trainable tensors (weight, and the bias that is part of the logits), by layer-relative name."""
    prefix = f"{view.arch.moe_block}.{view.arch.router}."
    tensors = ((view.arch.router_weight, view.router_weight), (view.arch.router_bias, view.router_bias))
    return [(prefix + path, t) for path, t in tensors if isinstance(t, nn.Parameter)]


def _written_dtype(stream, name: str, t: torch.Tensor) -> torch.dtype:
    """The dtype a tensor is written in (the stored dtype, float32 where the family keeps it so)."""
    stored = stream.source.stored_dtype
    if stored is None or not t.is_floating_point():
        return t.dtype
    plan = stream.model._get_dtype_plan(stored) or {}
    return torch.float32 if any(k in name for k in plan) else stored


def _error(view, xs, ys) -> float:
    """``sum ||block(X) - Y||^2 / sum ||Y||^2`` over the batches."""
    num = den = 0.0
    dev = view.router_weight.device
    for x, y in zip(xs, ys):
        out = view.call_block(x.to(dev)).float()
        y = y.to(dev).float()
        num += float(((out - y) ** 2).sum())
        den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def _fit(view, params: list[nn.Parameter], xs, ys, steps: int, lr: float, bar) -> dict[str, Any]:
    """Adam on ``params`` (float32 masters) to minimise `_error`; returns the errors before and at the best step."""
    dev = view.router_weight.device
    den = sum(float((y.to(dev).float() ** 2).sum()) for y in ys)
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(masters, lr=lr)
    flags = [(p, p.requires_grad) for p in view.block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    best, best_step, first = math.inf, 0, None
    best_values = [m.detach().clone() for m in masters]
    try:
        for step in range(steps + 1):
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
                    p.grad = None
            total = 0.0
            with torch.enable_grad():
                for x, y in zip(xs, ys):
                    out = view.call_block(x.to(dev)).float()
                    loss = ((out - y.to(dev).float()) ** 2).sum() / max(den, 1e-30)
                    if step < steps:
                        loss.backward()
                    total += float(loss.detach())
            if first is None:
                first = total
            if total < best:
                best, best_step = total, step
                best_values = [m.detach().clone() for m in masters]
            if step == steps:
                break
            for p, m in zip(params, masters):
                m.grad = None if p.grad is None else p.grad.detach().float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if bar is not None:
                bar.advance(1, rate=f"layer {view.index} error {total:.4f}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, v in zip(params, best_values):
                p.copy_(v)
                p.grad = None
    return {"error_before": first, "error_best_step": best_step, "error_best": best}


def _logprobs(stream, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, S-1, V]`` next-token log-probabilities of final hidden states (the last position predicts nothing
    in the window)."""
    return stream.logits_of(hidden)[:, :-1].float().log_softmax(-1)
