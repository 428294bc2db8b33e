#!/usr/bin/env python
"""Router-logit alignment on the demo model: does a per-row clip ratio chosen on calibration text keep the
routing of held-out text closer to the original than plain min-max quantization of the router?

The router of every MoE layer is quantized alone (per row, asymmetric) at 8, 6, 4, 3 and 2 bits; its inputs
are the original model's hidden states, so only the router's own error is measured. Alignment chooses the
clip ratios on 32 calibration windows x 256 tokens per task; the measurement uses every held-out window of
every task (757 windows). Three routers per layer and bit width: plain min-max (no clipping), aligned with
EAQuant's loss (``objective="topk"``: sum over the original top-k of p log p/q, which can go negative) and
aligned with ours (``objective="topk_rest"``: the same plus the pooled rest's term, a true divergence).
Reported on held-out text: that divergence (EAQuant's loss is no measure, it rewards overshooting) and the
share of tokens whose top-2 expert set is unchanged.

Usage::

    python benchmarks/router_align_demo.py    # about 3 minutes; writes benchmarks/results/router_align_demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moecompress.algorithms.router_align import align_router, topk_agreement, topk_kl
from moecompress.calib import bundled_tasks, read_documents, token_windows
from moecompress.context import Context
from moecompress.recipe import CalibrationConfig
from moecompress.runtime.source import load_model

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def router_inputs(model, views, windows: torch.Tensor, batch: int = 8) -> dict[int, torch.Tensor]:
    """Inputs of every router ``{layer: [T, H]}`` over ``windows [N, S]``."""
    got: dict[int, list[torch.Tensor]] = {v.index: [] for v in views}
    handles = [v.router.register_forward_pre_hook(
        lambda mod, args, i=v.index: got[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for v in views]
    try:
        for i in range(0, len(windows), batch):
            model(input_ids=windows[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(x) for i, x in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--bits", default="8,6,4,3,2")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router_align_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model()
    views = loaded.arch.moe_blocks(loaded.model)
    tok = loaded.tokenizer
    calib = torch.cat(list(Context(loaded, CalibrationConfig(samples=args.samples, seq_len=256), None)
                           .windows("calib").values()))
    held = torch.cat([token_windows(tok, read_documents(t, "eval"), 256) for t in bundled_tasks()])
    xc, xe = router_inputs(loaded.model, views, calib), router_inputs(loaded.model, views, held)
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for v in views:
            W, k = v.router_weight.detach().float(), v.routing.top_k
            ref = xe[v.index] @ W.T
            row = {"bits": bits, "layer": v.index}
            for name, kw in (("plain", {"ratios": torch.ones(1)}), ("eaquant", {"objective": "topk"}),
                             ("ours", {"objective": "topk_rest"})):
                Wq, ratio, _ = align_router(W, xc[v.index], bits, k, **kw)
                logits = xe[v.index] @ Wq.float().T
                row[name] = {"rows_clipped": int((ratio < 1).sum()),
                             "divergence": float(topk_kl(ref, logits, k, objective="topk_rest")),
                             "agreement": topk_agreement(ref, logits, k)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calib_tokens": int(calib.numel()), "heldout_tokens": int(held.numel()),
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
