"""Layer-wise scale tuning after GPTQ: the group scales of every quantized weight of one decoder layer (attention,
dense and shared linears, routed experts) tuned together by gradient descent toward the original model's layer
outputs, with GPTQ's codes and zeros fixed.

GPTQ and the closed-form refit (`algorithms.refit`) each minimise one linear's output error on its own inputs.
What a layer passes on is the residual stream after attention, routing, the experts' nonlinearity and the gate
weights, where the weights' errors interact. OmniQuant (Shao et al. 2023, arXiv:2308.13137) learns clipping
and smoothing per transformer block against the full-precision block's output, AutoRound (Cheng et al. 2023,
arXiv:2309.05516) tunes rounding offsets and min/max scales per block by signed gradient descent, and
EfficientQAT's Block-AP (Chen et al. 2024, arXiv:2407.11062) trains the quantization parameters block by block.
Here only the scales move (``s = s0 exp(theta)``, ``theta [E, O, G]`` per weight, Adam), so codes and integer
zeros stay valid for the packed format and the scales stay positive. The gradient with respect to ``theta`` is
``sum_{j in g} dL/dW_hat[o, j] W_hat[o, j]`` per group, read from the layer's own parameter gradients in the
expert views' ``[E, O, C]`` layout (no per-architecture code).

Loss: mean squared error of the layer's output (the residual stream) against the original model's output on
the same calibration windows (`runtime.quantize_run`'s second stream). Every fifth calibration batch is held
out; after each pass over the others the held-out loss is measured with the weights as stored (bf16), and the
scales with the lowest held-out loss are kept, GPTQ's own included: tuning never makes the held-out loss worse.
Computes in float32 (the layer is upcast for the tuning and restored after).

Shapes: E experts (1 for a plain linear), O output rows, C input columns, G groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moecompress.algorithms.quant_grid import storable
from moecompress.formats.quant_record import QuantRecord

__all__ = ["Tunable", "as_float", "tune_scales"]

CODE_LR = 10.0  # the rounding offsets' learning rate, relative (they move up to 1 code, the scales a few %)
HOLDOUT_EVERY = 5  # every fifth calibration batch decides which scales are kept


@dataclass
class Tunable:
    """One quantized weight of the layer: its record entry and its storage as ``[E, O, C]``."""

    name: str  # record entry (``NAME.codes`` / ``.scales`` / ``.zeros``)
    read: Callable[[], torch.Tensor]  # [E, O, C] as stored in the layer
    write: Callable[[torch.Tensor], None]  # [E, O, C] into the layer (in place, the storage's dtype)
    maxq: int = 0  # the largest code; > 0: the codes move too (rounding offsets, AutoRound), within +-1 of GPTQ's


@contextlib.contextmanager
def _float32(layer: nn.Module) -> Iterator[list[torch.dtype]]:
    """The layer's floating parameters and buffers in float32 (gradients on the parameters), restored after."""
    tensors = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    flags = [p.requires_grad for p in layer.parameters()]
    for t in tensors:
        t.data = t.data.float()
    for p in layer.parameters():
        p.requires_grad_(True)
    try:
        yield dtypes
    finally:
        for t, d in zip(tensors, dtypes):
            t.data = t.data.to(d)
        for p, f in zip(layer.parameters(), flags):
            p.grad = None
            p.requires_grad_(f)


@contextlib.contextmanager
def _grads_as_data(layer: nn.Module) -> Iterator[None]:
    """Every parameter's gradient in place of its data, so the views read gradients in their own layout."""
    params = list(layer.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p.data)
    try:
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d


def as_float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(as_float(v) for v in x)
    return x


class _Weight:
    """A tunable weight's fixed part (codes minus zeros, per group) and its scales."""

    def __init__(self, t: Tunable, record: QuantRecord, dtype: torch.dtype, device: torch.device) -> None:
        q = record.tensors[f"{t.name}.codes"]
        self.s0 = record.tensors[f"{t.name}.scales"].to(device)
        z = record.tensors[f"{t.name}.zeros"].to(device)
        E, O, C = q.shape
        G = self.s0.shape[-1]
        self.shape, self.gs, self.t, self.dtype = (E, O, C), C // G, t, dtype
        self.q0 = q.to(device).float().view(E, O, G, C // G)
        self.z = z[..., None]
        self.theta = torch.zeros_like(self.s0, requires_grad=True)
        self.v = torch.zeros_like(self.q0, requires_grad=True) if t.maxq else None  # rounding offsets

    def params(self) -> list[torch.Tensor]:
        return [self.theta] + ([self.v] if self.v is not None else [])

    def codes(self) -> torch.Tensor:  # [E, O, G, gs]
        if self.v is None:
            return self.q0
        return (self.q0 + self.v.detach().clamp(-1, 1).round()).clamp(0, self.t.maxq)

    def scales(self) -> torch.Tensor:
        return storable(self.s0 * self.theta.detach().exp())

    def weight(self, scales: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:  # [E, O, C] float32
        return ((self.codes() if codes is None else codes) - self.z).mul(scales[..., None]).view(self.shape)

    def grad(self, g: torch.Tensor) -> None:
        """Set the parameters' gradients from ``g = dL/dW_hat [E, O, C]`` (straight through the rounding)."""
        s = self.s0 * self.theta.detach().exp()
        g = g.view_as(self.q0)
        self.theta.grad = (g * (self.codes() - self.z) * s[..., None]).sum(-1)
        if self.v is not None:
            inside = ((self.q0 + self.v.detach()) >= -0.5) & ((self.q0 + self.v.detach()) <= self.t.maxq + 0.5)
            self.v.grad = g * s[..., None] * inside


@torch.no_grad()
def tune_scales(layer: nn.Module, weights: Sequence[Tunable], record: QuantRecord,
                forward: Callable[[int], torch.Tensor], target: Callable[[int], torch.Tensor], batches: Sequence[int],
                steps: int, lr: float, seed: int = 0) -> dict[str, float]:
    """Tune the scales of ``weights`` (entries of ``record``, already quantized into ``layer``) by ``steps`` Adam
    steps, one calibration batch each; ``forward(b)`` is the layer's output on batch ``b`` (its quantized
    inputs) and ``target(b)`` the original model's. Updates the record's scales and the layer's weights with
    the kept scales; returns the held-out losses before and after, the steps run and whether the tuned scales
    were kept."""
    held = [b for j, b in enumerate(batches) if j % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [b for b in batches if b not in held]
    if steps <= 0 or not held or not train or not weights:
        return {"steps": 0, "kept": False}
    device = next(layer.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    with _float32(layer) as _:
        ws = [_Weight(t, record, t.read().dtype, device) for t in weights]
        stored = {id(w): w.t.read().dtype for w in ws}

        def install(params: list[tuple[torch.Tensor, torch.Tensor]], as_stored: bool) -> None:
            for w, (s, q) in zip(ws, params):
                W = w.weight(s, q)
                w.t.write(W.to(stored[id(w)]).float() if as_stored else W)

        def held_loss() -> float:
            total = 0.0
            for b in held:
                total += float(torch.nn.functional.mse_loss(forward(b).float(), target(b).float()))
            return total / len(held)

        first = [(w.s0, w.q0) for w in ws]
        install(first, True)
        best_loss, best = held_loss(), first
        before = best_loss
        opt = torch.optim.Adam([{"params": [w.theta for w in ws], "lr": lr},
                                {"params": [w.v for w in ws if w.v is not None], "lr": CODE_LR * lr}])
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = [train[k] for k in torch.randperm(len(train), generator=gen).tolist()]
            b = order.pop()
            install([(w.s0 * w.theta.detach().exp(), w.codes()) for w in ws], False)
            for p in layer.parameters():
                p.grad = None
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(forward(b).float(), target(b).float())
                loss.backward()
            with _grads_as_data(layer):
                grads = [w.t.read().float() for w in ws]
            for w, g in zip(ws, grads):
                w.grad(g)
            opt.step()
            if not order or step == steps - 1:  # a pass over the training batches done: held-out check
                cand = [(w.scales(), w.codes()) for w in ws]
                install(cand, True)
                got = held_loss()
                if got < best_loss:
                    best_loss, best = got, cand
        install(best, True)
        for w, (s, q) in zip(ws, best):
            record.tensors[f"{w.t.name}.scales"] = s.float().cpu().contiguous()
            record.tensors[f"{w.t.name}.codes"] = q.view(w.shape).to(torch.uint8).cpu().contiguous()
    return {"steps": steps, "kept": best is not first, "heldout_before": before, "heldout_after": best_loss}
