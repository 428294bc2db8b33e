"""Rotate a model's residual stream by an orthogonal matrix without changing its function (QuaRot).

With RMSNorm (``n = x / rms(x) * w``), ``rms(x Q) = rms(x)``, so once each norm's weight is folded into
the linears that read it, every reader ``W`` becomes ``W Q``, every writer into the residual ``W`` becomes
``Q^T W`` (bias ``b Q``), the embeddings ``E Q`` and the LM head ``W_lm diag(w_final) Q``. Readers and writers
are found by running the model once: a reader's input *is* a norm's output tensor; a writer is a linear of
the layer with ``hidden_size`` outputs that reads no norm (attention output, dense/shared MLP down
projections), plus the routed experts' down projections. Families with LayerNorm (mean subtraction) are
refused. The result is checked against the original logits before it is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from moecompress.algorithms.rotation import random_orthogonal
from moecompress.errors import MoecompressError
from moecompress.models.base import MoEArch

__all__ = ["rotate_residual"]


def _consumers(model: nn.Module, arch: MoEArch) -> dict[int, dict[str, list[nn.Linear]]]:
    """Per layer: the nn.Linear modules reading the attention norm's and the MLP/MoE norm's output."""
    out: dict[int, dict[str, list[nn.Linear]]] = {}
    handles, ptrs = [], {}
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        out[i] = {"attn": [], "mlp": []}
        for tag, name in (("attn", arch.pre_attn_norm), ("mlp", arch.pre_moe_norm)):
            handles.append(getattr(layer, name).register_forward_hook(
                lambda m, a, o, key=(i, tag): ptrs.__setitem__(o.data_ptr(), key)))
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                def pre(mod, args, i=i):
                    key = ptrs.get(args[0].data_ptr())
                    if key is not None and key[0] == i and mod not in out[i][key[1]]:
                        out[i][key[1]].append(mod)
                handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(8)[None] % model.config.vocab_size)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> torch.Tensor:
    w = norm.weight.detach().double().clone()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * w).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    return w


@torch.no_grad()
def rotate_residual(model: nn.Module, arch: MoEArch, seed: int = 0, check: bool = True) -> dict:
    """Rotate ``model`` in place; returns ``{"hidden_size", "max_logit_change"}``."""
    H = model.config.hidden_size
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        for name in (arch.pre_attn_norm, arch.pre_moe_norm):
            norm = getattr(layer, name)
            if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
                raise MoecompressError(f"{arch.name} uses LayerNorm, which a residual rotation does not commute with",
                                       "quantize without --rotate")
    probe = torch.arange(16)[None] % model.config.vocab_size
    before = model(input_ids=probe).logits.double() if check else None
    readers = _consumers(model, arch)
    views = {v.index: v for v in arch.moe_blocks(model)}
    Q = random_orthogonal(H, seed)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    final = model.get_submodule(arch.final_norm)
    w_final = final.weight.detach().double().clone()
    new_head = (head.weight.double() * w_final) @ Q
    for i, layer in enumerate(layers):
        view = views.get(i)
        if view is not None:  # the router is handled through the adapter (its weight may sit in an nn.Linear)
            readers[i]["mlp"] = [m for m in readers[i]["mlp"] if m.weight is not view.router_weight]
        attn_w = _fold_norm(getattr(layer, arch.pre_attn_norm), readers[i]["attn"])
        mlp_norm = getattr(layer, arch.pre_moe_norm)
        mlp_w = _fold_norm(mlp_norm, readers[i]["mlp"])
        del attn_w
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
        seen = {id(m) for m in readers[i]["attn"] + readers[i]["mlp"]}
        for lin in readers[i]["attn"] + readers[i]["mlp"]:
            lin.weight.copy_((lin.weight.double() @ Q).to(lin.weight.dtype))
        experts = set() if view is None else {id(p) for p in view.experts.module.parameters()}
        if view is not None:
            experts.add(id(view.router_weight))
        for m in layer.modules():
            if isinstance(m, nn.Linear) and id(m) not in seen and m.out_features == H and id(m.weight) not in experts:
                m.weight.copy_((Q.T @ m.weight.double()).to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.copy_((m.bias.double() @ Q).to(m.bias.dtype))
    tied = head.weight is emb.weight
    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    if tied:  # the head now differs from the embeddings (the final norm weight is folded into it): untie
        head.weight = nn.Parameter(new_head.to(emb.weight.dtype), requires_grad=emb.weight.requires_grad)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    else:
        head.weight.copy_(new_head.to(head.weight.dtype))
    final.weight.fill_(1.0)
    report = {"hidden_size": H, "untied_lm_head": tied}
    if check:
        after = model(input_ids=probe).logits.double()
        change = float((after - before).abs().max() / before.abs().max())
        report["max_logit_change"] = change
        if change > 1e-3:
            raise MoecompressError(f"rotating {arch.name} changed its outputs (relative {change:.2e})",
                                   "quantize without --rotate, and report this model type")
    return report
