#!/usr/bin/env python
"""Does refitting the unquantized LM head to the quantized model pay? After the default `quantize` (in memory),
the head ``W [V, H]`` (untied from the embedding) is replaced by GPTAQ's closed form on the final normed hidden
states of the calibration windows, ``W' = W (C + l I)(H_q + l I)^-1`` with ``C = sum h h_q^T`` (original model's
states ``h``, quantized model's ``h_q``) and ``H_q = sum h_q h_q^T``, ``l`` = damp x mean diagonal of ``H_q``
(shrinking ``W'`` toward ``W``): the head then reads the quantized residual stream as the original head reads
the original one, at the same size (the head stays in full precision in both tools). Every held-out window is
compared with llm-compressor's rows. Shapes: ``V`` vocabulary, ``H`` hidden.

Usage::

    python benchmarks/head_refit.py --peer-from benchmarks/results/quantize_lowbit_stop23.json \
        --out benchmarks/results/stop31/head_refit_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_demo import evaluate, held_out, paired, peer_nll  # noqa: E402

from moecompress.context import Context  # noqa: E402
from moecompress.io.model import DEMO_MODEL  # noqa: E402
from moecompress.recipe import CalibrationConfig  # noqa: E402
from moecompress.runtime.source import load_model  # noqa: E402
from moecompress.stages import STAGES  # noqa: E402
from moecompress.stages.quantize import QuantizeConfig  # noqa: E402


@torch.no_grad()
def final_states(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The final normed hidden states ``[N * (S - 1), H]`` (the positions whose next token is known)."""
    out = []
    for i in range(0, len(ids), batch):
        h = model(input_ids=ids[i:i + batch], output_hidden_states=True).hidden_states[-1]
        out.append(h[:, :-1].reshape(-1, h.shape[-1]).float())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--scheme", default="w3a16")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--peer-from", required=True, help="a quantize_demo JSON with llm-compressor's rows, same seed")
    ap.add_argument("--damps", default="0,0.01,0.1")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    theirs = peer_nll(args.peer_from, args.scheme, args.calib_seed)  # a wrong file stops before any work
    torch.manual_seed(0)
    base_m = load_model(args.model)
    arch, tok = base_m.arch, base_m.tokenizer
    tasks, _, windows, owners = held_out(tok)
    base = evaluate(base_m.model, arch, windows)
    q = load_model(args.model)
    ctx = Context(q, CalibrationConfig(samples=32, seq_len=256, seed=args.calib_seed), None)
    calib = torch.cat(list(ctx.windows("calib").values()))
    STAGES.get("quantize").run(ctx, QuantizeConfig(scheme=args.scheme))
    h, hq = final_states(base_m.model, calib), final_states(q.model, calib)
    Hq, C = hq.T @ hq, h.T @ hq
    head = q.model.get_output_embeddings()
    W = head.weight.detach().float().clone()
    head.weight = torch.nn.Parameter(W.clone().to(head.weight.dtype), requires_grad=False)  # untied
    out = {"command": " ".join(sys.argv), "scheme": args.scheme, "calib_seed": args.calib_seed,
           "final_state_relative_error": float(((h - hq) ** 2).sum() / (h ** 2).sum()), "runs": []}
    eye = torch.eye(Hq.shape[0])
    for damp in [None] + [float(d) for d in args.damps.split(",")]:
        if damp is None:
            new = W
        else:
            lam = damp * Hq.diagonal().mean()
            new = W @ (C + lam * eye) @ torch.linalg.inv(Hq + lam * eye)
        with torch.no_grad():
            head.weight.copy_(new.to(head.weight.dtype))
        got = evaluate(q.model, arch, windows)
        pp = paired(got[0], theirs, base[0], owners, tasks)
        out["runs"].append({"damp": damp, "paired": pp, "window_nll": got[0].tolist()})
        print("head as is" if damp is None else f"refit, damp {damp}",
              " ".join(f"{t} {100 * pp[t]['gap_ours']:+.2f} ({pp[t]['gap_ratio'] or 0:.2f})" for t in tasks),
              f"sum {sum(100 * pp[t]['gap_ours'] for t in tasks):.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
