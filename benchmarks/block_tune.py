#!/usr/bin/env python
"""Does block-output tuning after GPTQ pay? The default `quantize` of a scheme (in memory), then, decoder layer
by decoder layer, one family of parameters tuned so that the quantized layer on the quantized stream matches
the original layer on the original stream (mean squared error of the layer's output hidden states over the
calibration windows), then every held-out window evaluated and compared with llm-compressor's rows.

Variants (``--what``):
- ``none``: the default as is (the reference; the same bytes as ``quantize``).
- ``groups``: a multiplier per quantization group (every quantized weight's scale times a learned factor; codes
  and zeros fixed, so the result is storable in the same format), Adam. The block-level version of the refit
  (AQLM's and PV-tuning's block fine-tuning of continuous parameters, arXiv:2401.06118, 2405.14852).
- ``norms``: the layer's RMSNorm weights only, Adam (Norm Tweaking, arXiv:2309.02784).
- ``round``: each weight's code may move one level up or down (signed gradient descent on a rounding offset with
  the straight-through estimator, SignRound / AutoRound, arXiv:2309.05516), starting from GPTQ's codes; the group
  grid is read back from the dequantized weights (each group's lowest level and step; exact at these widths).

Per layer the JSON records the output error before and after tuning on the training batches and on ``--holdout``
batches kept out of the tuning (both from the calibration windows, never the evaluation split). Shapes: a
quantized weight ``[..., O, C]`` with groups of ``g`` along ``C``; multipliers ``[..., O, C / g]``.

Usage::

    python benchmarks/block_tune.py --what groups --peer-from benchmarks/results/quantize_lowbit_stop23.json \
        --out benchmarks/results/stop30/block_tune_groups_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import compare, evaluate, held_out, paired, peer_nll  # noqa: E402

from moecompress.context import Context  # noqa: E402
from moecompress.io.model import DEMO_MODEL  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402

DROP = ("hidden_states", "cache", "past_key_values", "past_key_value")


class GroupScale(nn.Module):
    """``W_hat * m`` with one multiplier per group of ``g`` columns (``m [..., O, C/g]``, starts at 1)."""

    def __init__(self, w: torch.Tensor, g: int) -> None:
        super().__init__()
        self.g, self.cols = g, w.shape[-1]
        self.m = nn.Parameter(torch.ones(*w.shape[:-1], -(-w.shape[-1] // g)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.m.repeat_interleave(self.g, -1)[..., :self.cols]


class CodeShift(nn.Module):
    """``lo + step * clamp(code + round(v), 0, L)`` per group of ``g`` columns, ``v`` in [-1, 1] (starts at 0;
    straight-through rounding); ``lo``, ``step`` and ``code`` read back from the dequantized ``w``."""

    def __init__(self, w: torch.Tensor, g: int, levels: int) -> None:
        super().__init__()
        self.shape, self.levels = w.shape, levels
        x = w.detach().reshape(-1, g).float()
        srt = x.sort(-1).values
        gaps = srt[:, 1:] - srt[:, :-1]
        span = (srt[:, -1] - srt[:, 0]).clamp_min(1e-12)
        step = torch.where(gaps > 1e-3 * span[:, None], gaps, torch.full_like(gaps, float("inf"))).min(-1).values
        step = torch.where(torch.isinf(step), torch.zeros_like(step), step)[:, None]
        code = torch.where(step > 0, (x - srt[:, :1]) / step.clamp_min(1e-30), torch.zeros_like(x)).round()
        if (srt[:, :1] + step * code - x).abs().max() > 1e-5 * float(x.abs().max()):
            raise ValueError("the weights are not on a per-group uniform grid")
        self.register_buffer("lo", srt[:, :1])
        self.register_buffer("step", step)
        self.register_buffer("code", code)
        self.v = nn.Parameter(torch.zeros_like(x))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shift = self.v + (self.v.round() - self.v).detach()
        return (self.lo + self.step * (self.code + shift).clamp(0, self.levels)).reshape(self.shape)


def layer_inputs(model, arch, batches):
    """Per decoder layer, its input hidden states per batch; and the layers' keyword arguments per batch."""
    layers = arch.decoder_layers(model)
    ins, kws = [[] for _ in layers], []

    def hook(i):
        def pre(mod, args, kwargs):
            ins[i].append((args[0] if args else kwargs["hidden_states"]).detach())
            if i == 0:
                kws.append({k: v for k, v in kwargs.items() if k not in DROP})
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return ins, kws


def run_layer(layer, x, kw):
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def tune_layer(layer, names, xs, ys, kws, train, args, bits):
    """Tune ``layer``'s ``names`` (quantized weights) or norms in place; returns (trainable count, steps)."""
    for p in layer.parameters():
        p.requires_grad_(False)
    modules = dict(layer.named_modules())
    signed, adam = [], []
    if args.what in ("groups", "round"):
        for name in names:
            mod_name, _, pn = name.rpartition(".")
            mod = modules[mod_name]
            w = getattr(mod, pn)
            tuner = GroupScale(w, args.group) if args.what == "groups" else CodeShift(w, args.group, 2 ** bits - 1)
            parametrize.register_parametrization(mod, pn, tuner, unsafe=True)
            (adam if args.what == "groups" else signed).append(tuner.m if args.what == "groups" else tuner.v)
    elif args.what == "norms":
        for mod in modules.values():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                mod.weight.requires_grad_(True)
                adam.append(mod.weight)
    opt = torch.optim.Adam(adam, lr=args.lr) if adam else None
    gen = torch.Generator().manual_seed(args.seed)
    steps = 0
    for _ in range(args.epochs if adam or signed else 0):
        for j in torch.randperm(len(train), generator=gen).tolist():
            j = train[j]
            for p in adam + signed:
                p.grad = None
            ((run_layer(layer, xs[j], kws[j]) - ys[j]) ** 2).mean().backward()
            with torch.no_grad():
                for v in signed:
                    v.sub_(args.lr * v.grad.sign()).clamp_(-1, 1)
            if opt is not None:
                opt.step()
            steps += 1
    for mod in list(modules.values()):
        if parametrize.is_parametrized(mod):
            for pn in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, pn, leave_parametrized=True)
    for p in layer.parameters():
        p.requires_grad_(False)
    return sum(p.numel() for p in adam + signed), steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--scheme", default="w3a16")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--what", choices=["none", "groups", "norms", "round"], default="groups")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (Adam), 5e-3 (round: signed steps)")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=4, help="calibration batches kept out of the tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-from", type=Path, required=True, help="llm-compressor's rows (same model and seed)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.lr = args.lr if args.lr is not None else (5e-3 if args.what == "round" else 1e-3)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    base = load_model(str(args.model))
    arch = base.arch
    tasks, _, windows, owners = held_out(base.tokenizer)
    ref = evaluate(base.model, arch, windows)
    original = {k: v.clone() for k, v in base.model.state_dict().items()}

    q = load_model(str(args.model))
    ctx = Context(q, CalibrationConfig(samples=args.samples, seq_len=256, seed=args.calib_seed), None)
    calib = torch.cat(list(ctx.windows("calib").values()))
    t0 = time.time()
    cfg = QuantizeConfig(scheme=args.scheme)
    STAGES.get("quantize").run(ctx, cfg)
    seconds_quantize = time.time() - t0
    changed = [k for k, v in q.model.state_dict().items() if v.dim() >= 2 and not torch.equal(v, original[k])]

    t0 = time.time()
    batches = list(calib.split(args.batch))
    train = list(range(len(batches) - args.holdout))
    held = list(range(len(batches) - args.holdout, len(batches)))
    fp_in, kws = layer_inputs(base.model, arch, batches)
    xs = layer_inputs(q.model, arch, batches)[0][0]
    prefix = f"{arch.layers}."
    log = []
    for i, (fp_layer, layer) in enumerate(zip(arch.decoder_layers(base.model), arch.decoder_layers(q.model))):
        with torch.no_grad():
            ys = [run_layer(fp_layer, x, kw) for x, kw in zip(fp_in[i], kws)]

        def err(idx):
            with torch.no_grad():
                return sum(float(((run_layer(layer, xs[j], kws[j]) - ys[j]) ** 2).mean()) for j in idx) / len(idx)

        before = (err(train), err(held) if held else None)
        names = [k[len(f"{prefix}{i}."):] for k in changed if k.startswith(f"{prefix}{i}.")]
        count, steps = tune_layer(layer, names, xs, ys, kws, train, args, cfg.bits[0])
        after = (err(train), err(held) if held else None)
        with torch.no_grad():
            xs = [run_layer(layer, x, kw) for x, kw in zip(xs, kws)]
        log.append({"layer": i, "tuned": count, "steps": steps, "train_before": before[0], "train_after": after[0],
                    "holdout_before": before[1], "holdout_after": after[1]})
        print(json.dumps(log[-1]), flush=True)
    seconds_tune = time.time() - t0

    got = evaluate(q.model, arch, windows)
    res = {"model": str(args.model), "scheme": args.scheme, "args": {k: str(v) for k, v in vars(args).items()},
           "seconds_quantize": round(seconds_quantize, 1), "seconds_tune": round(seconds_tune, 1), "layers": log,
           **compare(ref, got, owners, tasks),
           "paired": paired(got[0], peer_nll(args.peer_from, args.scheme), ref[0], owners, tasks)}
    for t in tasks:
        p = res["paired"][t]
        print(f"{t:13s} ours {100 * p['gap_ours']:+.2f} theirs {100 * p['gap_theirs']:+.2f} ratio "
              f"{p['gap_ratio'] if p['gap_ratio'] is None else round(p['gap_ratio'], 2)} ci95 "
              f"[{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
