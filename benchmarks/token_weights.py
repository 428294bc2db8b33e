#!/usr/bin/env python
"""Does weighting calibration tokens by their effect on the loss pay? Each decoder layer's Hessians (and the
sequential pairing's products) weight token ``t`` by the squared norm of the loss gradient at that layer's
output in the original model, ``w_t = |dL/dh_t|^2`` (an empirical-Fisher proxy for how much an error in token
``t``'s output costs; the scalar-per-token version of GuidedQuant's objective, arXiv:2505.07004), then the
default `quantize` runs in memory and every held-out window is compared with llm-compressor's rows.

Variants (``--variants``, comma-separated ``name=alpha[:per-window][:dense|experts]``):
- ``alpha``: ``w_t ** alpha`` (0: unweighted, the default quantizer's bytes), normalised to mean 1 per layer;
- ``per-window``: each window's weights normalised to mean 1 first (so tasks keep their share of the Hessian
  and only the tokens inside a window are reweighted);
- ``dense`` / ``experts``: weight only the attention and dense linears, or only the routed experts.

The gradients come from one forward and backward pass of the original model per calibration batch (in memory;
the token weights reach the statistics through `runtime.token_weights`, set per batch by the layer stream).
Shapes: ``T`` tokens of a batch (windows x sequence, batch-major), ``H`` hidden.

Usage::

    python benchmarks/token_weights.py --peer-from benchmarks/results/quantize_lowbit_stop23.json \
        --out benchmarks/results/stop31/token_weights_demo_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import compare, evaluate, held_out, paired, peer_nll  # noqa: E402

from moecompress.context import Context  # noqa: E402
from moecompress.io.model import DEMO_MODEL  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime import executor, token_weights  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402


def gradient_weights(model, arch, batches: list[torch.Tensor], alpha: float, per_window: bool) -> list[list]:
    """``w[layer][batch] [T]``: ``|dL/dh|^2`` at each decoder layer's output, to the power ``alpha``, mean 1 per
    layer over every batch (``per_window``: first mean 1 per window)."""
    layers = model.get_submodule(arch.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    W: list[list] = [[None] * len(batches) for _ in layers]
    for b, ids in enumerate(batches):
        outs: list[torch.Tensor] = []

        def keep(m, a, kw, out):
            o = out[0] if isinstance(out, tuple) else out
            o.retain_grad()
            outs.append(o)

        hooks = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        for h in hooks:
            h.remove()
        for i, o in enumerate(outs):
            g2 = (o.grad.float() ** 2).sum(-1)  # [windows, S]
            if per_window:
                g2 = g2 / g2.mean(1, keepdim=True)
            W[i][b] = g2.reshape(-1)
    for row in W:
        m = torch.cat(row).mean()
        row[:] = [(w / m) ** alpha for w in row]
        m = torch.cat(row).mean()
        row[:] = [w / m for w in row]
    return W


def run_variant(path: str, scheme: str, seed: int, alpha: float, per_window: bool, only: str | None, fp, arch):
    """The default quantizer with these token weights; returns (model, seconds)."""
    init = executor.LayerStream.__init__
    current = token_weights.current

    def patched_init(self, source, batches, *a, **kw):
        init(self, source, batches, *a, **kw)
        if alpha and self.batches and not self.batches[0].is_floating_point():  # token ids: the calibration stream
            W = gradient_weights(fp, arch, self.batches, alpha, per_window)
            self.token_weights = lambda i, b: W[i][b]

    def only_current(device=None):  # the statistics of one kind of linear only (by the collecting function)
        caller = sys._getframe(1).f_code.co_name
        kind = "dense" if caller in ("_accumulate", "pre") else "experts"
        return current(device) if only in (None, kind) else None

    executor.LayerStream.__init__ = patched_init
    token_weights.current = only_current
    try:
        q = load_model(path)
        ctx = Context(q, CalibrationConfig(samples=32, seq_len=256, seed=seed), None)
        t0 = time.time()
        STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=scheme))
        return q, time.time() - t0
    finally:
        executor.LayerStream.__init__ = init
        token_weights.current = current


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--scheme", default="w3a16")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", required=True, help="a quantize_demo JSON with llm-compressor's rows, same seed")
    ap.add_argument("--variants", default="none=0,global=1,window=1:per-window,window-sqrt=0.5:per-window,"
                                          "window-dense=1:per-window:dense,window-experts=1:per-window:experts")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    theirs = peer_nll(args.peer_from, args.scheme, args.calib_seed)  # a wrong file stops before any work
    torch.manual_seed(0)
    base_m = load_model(args.model)
    arch, tok = base_m.arch, base_m.tokenizer
    tasks, _, windows, owners = held_out(tok)
    base = evaluate(base_m.model, arch, windows)
    out = {"command": " ".join(sys.argv), "model": args.model, "scheme": args.scheme, "calib_seed": args.calib_seed,
           "peer_from": args.peer_from, "base_window_nll": base[0].tolist(), "runs": []}
    for spec in args.variants.split(","):
        name, _, rest = spec.partition("=")
        parts = rest.split(":")
        alpha, per_window = float(parts[0]), "per-window" in parts[1:]
        only = next((p for p in parts[1:] if p in ("dense", "experts")), None)
        q, secs = run_variant(args.model, args.scheme, args.calib_seed, alpha, per_window, only, base_m.model, arch)
        got = evaluate(q.model, arch, windows)
        res = compare(base, got, owners, tasks)
        pp = paired(got[0], theirs, base[0], owners, tasks)
        row = {"variant": name, "alpha": alpha, "per_window": per_window, "only": only, "seconds": secs,
               "tasks": res["tasks"], "paired": pp, "window_nll": got[0].tolist()}
        if out["runs"]:  # against the first variant (the unweighted default), paired by window
            ref = torch.tensor(out["runs"][0]["window_nll"])
            row["vs_first"] = {}
            for k, t in enumerate(tasks):
                d = (got[0] - ref)[owners == k]
                half = 1.96 * float(d.std()) / len(d) ** 0.5
                row["vs_first"][t] = [float(d.mean()), float(d.mean() - half), float(d.mean() + half)]
        out["runs"].append(row)
        print(name, " ".join(f"{t} {100 * pp[t]['gap_ours']:+.2f} ({pp[t]['gap_ratio'] or 0:.2f})" for t in tasks),
              f"sum {sum(100 * pp[t]['gap_ours'] for t in tasks):.2f}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
