"""Rotate a model's residual stream by an orthogonal matrix without changing its function (QuaRot), one
decoder layer at a time.

With RMSNorm (``n = x / rms(x) * w``), ``rms(x Q) = rms(x)``, so once each norm's weight is folded into the
linears that read it, every reader ``W`` becomes ``W Q``, every writer into the residual ``W`` becomes
``Q^T W`` (bias ``b Q``), the embeddings ``E Q`` and the LM head ``W_lm diag(w_final) Q``. Readers are found
while the layer runs: a reader's input *is* a norm's output tensor; a writer is a linear of the layer with
``hidden_size`` outputs that reads no norm (attention output, dense/shared MLP down projections), plus the
routed experts' down projections. Families with LayerNorm (mean subtraction) are refused.

The streamed order (`runtime.quantize_run`): the first-layer inputs are computed with the rotated embedding
(`ResidualRotation.embedding` as the stream's ``embed_transform``); each layer is rotated when loaded
(`rotate_layer`, with the readers `norm_readers` saw on its original forward) and checked against the original
layer (`check_layer`: the rotated layer on rotated inputs gives the original outputs rotated); the embedding,
final norm and head are rotated at the end (`rotate_outside`; a tied head is untied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from moecompress.algorithms.rotation import random_orthogonal
from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch, MoEBlockView

__all__ = ["ResidualRotation", "check_layer", "check_rotatable", "norm_readers", "rotate_layer", "rotate_outside"]


class ResidualRotation:
    """The seeded orthogonal ``Q [H, H]`` (float64; `algorithms.rotation.random_orthogonal`)."""

    def __init__(self, hidden: int, seed: int = 0) -> None:
        self.hidden, self.seed = hidden, seed
        self._Q = random_orthogonal(hidden, seed)
        self._on: dict[torch.device, torch.Tensor] = {}

    def Q(self, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cpu":
            return self._Q
        if device not in self._on:
            self._on[device] = self._Q.to(device)
        return self._on[device]

    def embedding(self, weight: torch.Tensor) -> torch.Tensor:
        """``E Q`` in ``E``'s dtype (the stream's ``embed_transform``)."""
        return (weight.double() @ self.Q(weight.device)).to(weight.dtype)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``h Q`` (residual states ``[..., H]``), in ``h``'s dtype."""
        return (h.double() @ self.Q(h.device)).to(h.dtype)

    def undo(self, h: torch.Tensor) -> torch.Tensor:
        """``h Q^T``."""
        return (h.double() @ self.Q(h.device).T).to(h.dtype)


def check_rotatable(layers: Sequence[nn.Module], arch: MoEArch) -> None:
    """Refuse families whose norms subtract the mean (LayerNorm) or carry a bias: a rotation does not commute."""
    for layer in layers:
        for name in (arch.pre_attn_norm, arch.pre_moe_norm):
            norm = getattr(layer, name)
            if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
                raise MoecompressError(f"{arch.name} uses LayerNorm, which a residual rotation does not commute with",
                                       "quantize without --rotate")


@contextlib.contextmanager
def norm_readers(layer: nn.Module, arch: MoEArch) -> Iterator[dict[str, list[nn.Linear]]]:
    """While the layer runs inside the block: ``{"attn": [...], "mlp": [...]}``, the nn.Linear modules whose
    input is the attention norm's / the MLP (MoE) norm's output tensor."""
    out: dict[str, list[nn.Linear]] = {"attn": [], "mlp": []}
    held: dict[str, torch.Tensor] = {}  # the norms' outputs, held so that no other tensor can reuse their memory
    handles = []
    for tag, name in (("attn", arch.pre_attn_norm), ("mlp", arch.pre_moe_norm)):
        handles.append(getattr(layer, name).register_forward_hook(
            lambda m, a, o, tag=tag: held.__setitem__(tag, o)))
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            def pre(mod, args):
                ptr = args[0].data_ptr()
                for tag, o in held.items():
                    if o.data_ptr() == ptr and mod not in out[tag]:
                        out[tag].append(mod)
            handles.append(m.register_forward_pre_hook(pre))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        held.clear()


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> torch.Tensor:
    w = norm.weight.detach().double().clone()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * w).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    return w


@torch.no_grad()
def rotate_layer(layer: nn.Module, arch: MoEArch, view: MoEBlockView | None, readers: dict[str, list[nn.Linear]],
                 rotation: ResidualRotation) -> None:
    """Rotate one decoder layer in place: fold its norms into their readers, readers ``W Q``, writers
    ``Q^T W`` (``view``: its MoE block, whose experts and router are handled through the adapter)."""
    H = rotation.hidden
    Q = rotation.Q(next(layer.parameters()).device)
    attn_readers, mlp_readers = list(readers["attn"]), list(readers["mlp"])
    if view is not None:  # the router is handled through the adapter (its weight may sit in an nn.Linear)
        mlp_readers = [m for m in mlp_readers if m.weight is not view.router_weight]
    _fold_norm(getattr(layer, arch.pre_attn_norm), attn_readers)
    mlp_w = _fold_norm(getattr(layer, arch.pre_moe_norm), mlp_readers)
    if view is not None:  # routed experts read the MoE norm too, through 3-D parameters
        for proj in ("gate", "up"):
            view.experts.set_stacked(proj, view.experts.stacked(proj).double() * mlp_w)
        for proj in ("gate", "up"):
            view.experts.set_stacked(proj, view.experts.stacked(proj).double() @ Q)
        view.experts.set_stacked("down", Q.T @ view.experts.stacked("down").double())
        b = view.experts.bias("down")
        if b is not None:
            b.copy_((b.double() @ Q).to(b.dtype))
        view.router_weight.copy_((view.router_weight.double() * mlp_w @ Q).to(view.router_weight.dtype))
    seen = {id(m) for m in attn_readers + mlp_readers}
    for lin in attn_readers + mlp_readers:
        lin.weight.copy_((lin.weight.double() @ Q).to(lin.weight.dtype))
    experts = set() if view is None else {id(p) for p in view.experts.module.parameters()}
    if view is not None:
        experts.add(id(view.router_weight))
    for m in layer.modules():
        if isinstance(m, nn.Linear) and id(m) not in seen and m.out_features == H and id(m.weight) not in experts:
            m.weight.copy_((Q.T @ m.weight.double()).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.copy_((m.bias.double() @ Q).to(m.bias.dtype))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of `check_layer`: 1e-4 when computing in float32 (or wider); a lower-precision
    compute dtype rounds the rotated weights themselves (bfloat16: about 0.4% per weight)."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def check_layer(arch: MoEArch, index: int, expected: torch.Tensor, got: torch.Tensor,
                ref_topk: torch.Tensor | None = None, new_topk: torch.Tensor | None = None) -> float:
    """Refuse a rotated layer whose outputs on rotated inputs are not the original outputs rotated (``expected``
    = original output ``Q``, ``got``: ``[T, H]``), within `tolerance` relative to the largest output. Tokens whose
    top-k experts changed (a near tie broken the other way by rounding; given as sorted ``[T, K]`` choices) are
    left out of the comparison; more than 1% of them is an error too. Returns the relative change."""
    keep = None
    if ref_topk is not None and new_topk is not None:
        same = (ref_topk == new_topk).all(-1)  # [T]
        if float(same.float().mean()) < 0.99:
            raise MoecompressError(f"rotating {arch.name} changed layer {index}'s routing for "
                                   f"{100 * (1 - float(same.float().mean())):.1f}% of the tokens",
                                   "quantize without --rotate, and report this model type")
        keep = same.to(expected.device)
    e, g = expected.double(), got.double()
    if keep is not None:
        e, g = e[keep], g[keep]
    scale = float(e.abs().max()) if e.numel() else 0.0
    change = float((g - e).abs().max()) / scale if scale > 0 else 0.0
    tol = tolerance(got.dtype)
    if not change <= tol:
        raise MoecompressError(f"rotating {arch.name} changed layer {index}'s outputs (relative {change:.2e}, "
                               f"more than {tol:.0e})", "quantize without --rotate, and report this model type")
    return change


@torch.no_grad()
def rotate_outside(model: nn.Module, arch: MoEArch, rotation: ResidualRotation) -> bool:
    """Rotate the embedding (``E Q``) and the LM head (``W_lm diag(w_final) Q``; final norm weight set to 1) in
    place; a head tied to the embedding gets its own parameter. Returns whether the head was untied (the
    caller sets ``tie_word_embeddings = False`` in the config it writes)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    final = model.get_submodule(arch.final_norm)
    Q = rotation.Q(emb.weight.device)
    w_final = final.weight.detach().double().clone()
    new_head = (head.weight.double() * w_final) @ Q
    tied = head.weight is emb.weight
    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    if tied:  # the head now differs from the embeddings (the final norm weight is folded into it): untie
        head.weight = nn.Parameter(new_head.to(emb.weight.dtype), requires_grad=emb.weight.requires_grad)
    else:
        head.weight.copy_(new_head.to(head.weight.dtype))
    final.weight.fill_(1.0)
    return tied
